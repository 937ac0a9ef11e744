"""The serving class: what the routes do. It reads and validates a request
(heavy parsing, tokenizing and chat rendering in a small thread pool, never on
the event loop), submits it to the engine thread as a Job, and answers through
responses.py."""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor

from pydantic import ValidationError
from starlette.responses import Response

from .config import ServerConfig
from .engine_loop import EngineLoop
from .errors import APIError, bad
from .jobs import SSE_DONE, ClientGone, Job, usage
from .metrics import Metrics
from .responses import Chunks, completion_body, json_response, stream_response
from .schemas import (ChatRequest, CompletionRequest, GenerateParams, GenerateRequest, check_prompt_ids,
                      reject_unsupported, to_sampling_params, validation_error)

OFF_LOOP_BYTES = 64 << 10  # bodies / texts past this are parsed / tokenized in the pool
OFF_LOOP_IDS = 8192        # token-id prompts past this many ids are checked in the pool
WORKERS = 2                # threads of that pool: a bound on concurrent heavy parsing
OLD_GENERATE_MAX_TOKENS = 128  # /generate's default in the users' old server
# a \uD800-\uDFFF escape: maybe half of a surrogate pair, maybe a lone one
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def lone_surrogate(data) -> bool:
    """Whether a parsed JSON value holds a string with a lone UTF-16 surrogate
    (`"\ud800"`): not Unicode, so no tokenizer or UTF-8 encoder takes it."""
    stack = [data]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(v for v in x if not isinstance(v, int))
    return False


def render_chat(tokenizer, messages) -> list[int]:
    """Token ids of `messages` rendered with the model's chat template plus the
    assistant generation prompt."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if isinstance(out, str):
        return list(tokenizer.encode(out, add_special_tokens=False))
    return list(out)


class OpenAIServing:
    """The OpenAI routes over one engine: owns the engine thread (EngineLoop), the
    metrics and the parse pool; `start`/`stop` follow the app's lifespan."""

    def __init__(self, engine, tokenizer, config: ServerConfig, *, model=None):
        from .. import __version__

        self.tokenizer = tokenizer
        self.config = config
        self.model = getattr(engine, "model", None) if model is None else model
        self.engine_loop = EngineLoop(engine, max_batch=config.max_batch, max_queue=config.max_queue)
        self.metrics = Metrics(weakref.ref(self.engine_loop), model=self.model, engine=engine)
        self.engine = engine
        self.engine_loop.metrics = self.metrics
        self.created = int(time.time())
        self.fingerprint = f"bitdlm-{__version__}"
        self.pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="bitdlm-parse")
        self.max_text_chars = None
        if getattr(tokenizer, "max_token_chars", None):
            # a text longer than this cannot fit the context: refused before tokenizing
            self.max_text_chars = config.max_model_len * int(tokenizer.max_token_chars)

    def start(self) -> None:
        self.engine_loop.start()

    async def ready(self) -> None:
        """Wait (off the event loop) until the engine thread serves."""
        await asyncio.to_thread(self.engine_loop.wait_ready)

    async def stop(self) -> None:
        # the graceful part (draining) happened before (cli.Server); what is
        # still in flight now gets the shutdown 503
        await asyncio.to_thread(self.engine_loop.stop)
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ reading
    async def off_loop(self, big: bool, fn, *args):
        if not big:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than {self.config.max_body_bytes} bytes.",
                        code="request_too_large")

    async def read_body(self, request, schema):
        limit = self.config.max_body_bytes
        try:
            size = int(request.headers.get("content-length") or 0)
        except ValueError:
            size = 0
        if size > limit:
            raise self.too_large()
        # count what arrives: a chunked upload has no Content-Length to trust
        chunks, got = [], 0
        async for chunk in request.stream():
            got += len(chunk)
            if got > limit:
                raise self.too_large()
            chunks.append(chunk)
        raw = b"".join(chunks)

        def parse():
            try:
                data = json.loads(raw)
            except (ValueError, RecursionError) as e:
                raise bad(f"We could not parse the JSON body of your request: {e}.",
                          code="invalid_json")
            if not isinstance(data, dict):
                raise bad("The request body must be a JSON object.", code="invalid_json")
            if _SURROGATE_ESCAPE.search(raw) and lone_surrogate(data):
                raise bad("The request body holds a lone UTF-16 surrogate escape (such as "
                          "\"\\ud800\") in a string: that is not Unicode text.",
                          code="invalid_json")
            try:
                return schema.model_validate(data)
            except ValidationError as e:
                raise validation_error(e)

        return await self.off_loop(len(raw) > OFF_LOOP_BYTES, parse)

    def check_text_size(self, n_chars, what):
        if self.max_text_chars is not None and n_chars > self.max_text_chars:
            raise bad(f"This model's maximum context length is {self.config.max_model_len} tokens, "
                      f"and the {what} has {n_chars} characters, more than that many tokens can "
                      f"hold ({self.max_text_chars}).", param="prompt" if what == "prompt"
                      else "messages", code="context_length_exceeded")

    async def encode(self, text):
        self.check_text_size(len(text), "prompt")
        return await self.off_loop(len(text) > OFF_LOOP_BYTES // 8,
                                   lambda: list(self.tokenizer.encode(text)))

    def check_model(self, name):
        served = self.config.served_model_name
        if name is not None and name not in self.config.model_names():
            raise APIError(404, f"The model `{name}` does not exist (this server serves `{served}`).",
                           param="model", code="model_not_found")

    def sampling_params(self, req, max_tokens, n_prompt):
        return to_sampling_params(req, max_tokens=max_tokens, n_prompt=n_prompt,
                                  max_model_len=self.config.max_model_len,
                                  defaults=self.config.default_params)

    def token_prompts(self, lists) -> list[list[int]]:
        prompts = [list(x) for x in lists]
        for ids in prompts:
            self.check_ids(ids, "prompt")
        return prompts

    def check_ids(self, ids, what):
        check_prompt_ids(ids, what, max_model_len=self.config.max_model_len,
                         vocab_size=self.config.vocab_size)

    # ------------------------------------------------------------- routes
    def health(self) -> dict:
        if not self.engine_loop.alive():
            raise APIError(503, "The engine is not running.", code="unavailable")
        out = {"status": self.config.health_status}
        model = self.model
        if model is not None and getattr(model, "threads", None):
            out["threads"] = int(model.threads)
            out["forward_threads"] = int(getattr(model, "forward_threads", 0))
        policy = getattr(self.engine, "decode_policy", None)
        if isinstance(policy, str):
            out["decode_policy"] = policy
            adaptive = getattr(self.engine, "policy", None)
            if adaptive is not None:
                out["decode_policy_state"] = adaptive.summary()
        # the users' old server's fields: its clients read them
        out.update(native_kernel=model is not None, mode="dlm_block_diffusion")
        return out

    def model_card(self, name=None) -> dict:
        return {"id": name or self.config.served_model_name, "object": "model", "created": self.created,
                "owned_by": "bitdlm", "max_model_len": self.config.max_model_len}

    def model_cards(self) -> list:
        return [self.model_card(n) for n in self.config.model_names()]

    async def completions(self, request):
        req = await self.read_body(request, CompletionRequest)
        self.check_model(req.model)
        reject_unsupported(req, chat=False)
        p = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not p:
            raise bad("The prompt is empty.", param="prompt")
        if isinstance(p[0], str):
            prompts, big = [await self.encode(s) for s in p], False
        else:  # token ids: a long list is copied and checked in the pool
            prompts = [p] if isinstance(p[0], int) else p
            big = sum(map(len, prompts)) > OFF_LOOP_IDS
        prompts = await self.off_loop(big, self.token_prompts, prompts)
        max_tokens = (req.max_tokens if req.max_tokens is not None
                      else self.config.default_max_tokens or 16)  # 16: OpenAI's default
        params = self.sampling_params(req, max_tokens, max(len(ids) for ids in prompts))
        return await self.run(request, req, "cmpl", prompts, params, chat=False)

    async def chat_completions(self, request):
        req = await self.read_body(request, ChatRequest)
        self.check_model(req.model)
        reject_unsupported(req, chat=True)
        if not req.messages:
            raise bad("'messages' must contain at least one message.", param="messages",
                      code="empty_array")
        messages = []
        for m in req.messages:
            c = m.content
            if isinstance(c, list):
                c = "".join(part.text for part in c)
            messages.append({"role": "system" if m.role == "developer" else m.role,
                             "content": c or ""})
        n_chars = sum(len(m["content"]) for m in messages)
        self.check_text_size(n_chars, "conversation")
        from jinja2 import TemplateError

        try:
            # always in the pool: a template is code, and one that loops runs until its
            # deadline (tokenizer.RENDER_SECONDS) while the event loop goes on
            ids = await self.off_loop(True, render_chat, self.tokenizer, messages)
        except (ValueError, TemplateError) as e:  # no template; raise_exception() in it
            raise bad(f"Could not apply the chat template: {e}", param="messages")
        self.check_ids(ids, "conversation")
        # none set: --default-max-tokens, else the rest of the context (as OpenAI / vLLM)
        max_tokens = req.max_completion_tokens or req.max_tokens or self.config.default_max_tokens
        params = self.sampling_params(req, max_tokens, len(ids))
        return await self.run(request, req, "chatcmpl", [ids], params, chat=True)

    async def generate(self, request):
        """SGLang-style /generate of the users' old server: `text` (or `prompt`), max
        tokens as `max_new_tokens` / `max_tokens` at the top level or in
        `sampling_params` -> {"text", "meta_info": {latency, completion_tokens,
        tok_per_sec, prompt_tokens, finish_reason}}."""
        t0 = time.perf_counter()
        req = await self.read_body(request, GenerateRequest)
        self.check_model(req.model)
        text = req.text if req.text is not None else req.prompt
        if not isinstance(text, str):
            raise bad("'text' (or 'prompt') must be a string.", param="text")
        ids = await self.encode(text)
        self.check_ids(ids, "prompt")
        sp = req.sampling_params or GenerateParams()
        max_tokens = (req.max_new_tokens or req.max_tokens or sp.max_new_tokens
                      or self.config.default_max_tokens or OLD_GENERATE_MAX_TOKENS)
        params = self.sampling_params(req.merged(sp), max_tokens, len(ids))
        try:
            job = await self.start_job(request, "gen", [ids], params)
            texts, reasons, use = await self.collect(job, 1)
        except ClientGone:
            return Response(status_code=499)
        latency = time.perf_counter() - t0
        n = use["completion_tokens"]
        return json_response(job, {"text": texts[0], "meta_info": {
            "id": job.rid, "prompt_tokens": use["prompt_tokens"], "completion_tokens": n,
            "finish_reason": reasons[0], "latency": latency, "tok_per_sec": n / latency if latency > 0 else 0.0,
            "decode_mode": job.modes[0]}})

    # ------------------------------------------------------------ running
    async def start_job(self, request, prefix, prompts, params) -> Job:
        job = Job(self.engine_loop, f"{prefix}-{uuid.uuid4().hex}", len(prompts))
        job.submit(prompts, params)
        job.watch(request)
        try:
            await job.wait_admitted()
        except BaseException:
            job.close()
            raise
        return job

    @staticmethod
    async def collect(job, n):
        texts = [[] for _ in range(n)]
        reasons = [None] * n
        prompt_toks = [0] * n
        gen_toks = [0] * n
        try:
            async for i, out in job.events():
                if out.text:
                    texts[i].append(out.text)
                prompt_toks[i] = out.num_prompt_tokens
                gen_toks[i] = out.num_generated_tokens
                if out.finished:
                    reasons[i] = out.finish_reason
        finally:
            job.close()
        return ["".join(t) for t in texts], reasons, usage(sum(prompt_toks), sum(gen_toks))

    async def run(self, request, req, prefix, prompts, params, chat):
        try:
            job = await self.start_job(request, prefix, prompts, params)
        except ClientGone:
            return Response(status_code=499)
        n = len(prompts)
        name = self.config.served_model_name
        if not req.stream:
            try:
                texts, reasons, use = await self.collect(job, n)
            except ClientGone:
                return Response(status_code=499)
            return json_response(job, completion_body(job.rid, chat, name, self.fingerprint, texts,
                                                      reasons, use))

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunks = Chunks(job.rid, chat, name, self.fingerprint, include_usage)

        async def gen():
            prompt_toks = [len(ids) for ids in prompts]
            gen_toks = [0] * n
            if chat:
                for i in range(n):
                    yield chunks.chunk([chunks.choice(i, "", None, first=True)])
            async for i, out in job.events():
                prompt_toks[i] = out.num_prompt_tokens
                gen_toks[i] = out.num_generated_tokens
                if out.text:
                    yield chunks.chunk([chunks.choice(i, out.text, None)])
                if out.finished:
                    yield chunks.chunk([chunks.choice(i, "", out.finish_reason)])
            if include_usage:
                yield chunks.chunk([], usage(sum(prompt_toks), sum(gen_toks)))
            yield SSE_DONE

        return stream_response(job, gen())
