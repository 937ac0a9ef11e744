"""The FastAPI app: routes, request parsing and the SSE responses.

Heavy request work (parsing a big JSON body, tokenizing, rendering the chat
template) runs in a small thread pool, never on the event loop; the engine
thread (engine_loop.py) runs the forwards.
"""
# (no `from __future__ import annotations`: FastAPI resolves the route
# annotations, and `Request` is imported inside create_app)
import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor

from .engine_loop import EngineLoop
from .errors import APIError, bad
from .jobs import SSE_DONE, ClientGone, Job, sse, usage
from .metrics import Metrics
from .middleware import Gate
from .schemas import (check_prompt_ids, reject_unsupported, schemas, to_sampling_params,
                      validation_error)

log = logging.getLogger("bitdlm.server")

MAX_BODY_BYTES = 32 << 20  # far above any prompt that fits a context
OFF_LOOP_BYTES = 64 << 10  # bodies / texts past this are parsed / tokenized in the pool
WORKERS = 2                # threads of that pool: a bound on concurrent heavy parsing


@dataclasses.dataclass
class ServerConfig:
    served_model_name: str
    max_model_len: int
    vocab_size: int
    max_batch: int = 16
    max_queue: int = 64
    api_key: "str | None" = None
    default_params: dict = dataclasses.field(default_factory=dict)  # SamplingParams defaults
    max_body_bytes: int = MAX_BODY_BYTES


def render_chat(tokenizer, messages) -> list[int]:
    """Token ids of `messages` rendered with the model's chat template plus the
    assistant generation prompt."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if isinstance(out, str):
        return list(tokenizer.encode(out, add_special_tokens=False))
    return list(out)


def create_app(engine, tokenizer, config: ServerConfig, *, model=None):
    """The FastAPI app serving `engine` (also what a Ray Serve replica wraps).
    The engine thread starts and stops with the app's lifespan; `app.state`
    holds engine_loop, metrics and config."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .. import __version__

    CompletionRequest, ChatRequest = schemas()
    if model is None:
        model = getattr(engine, "model", None)
    engine_loop = EngineLoop(engine, max_batch=config.max_batch, max_queue=config.max_queue)
    metrics = Metrics(weakref.ref(engine_loop), model=model)
    engine_loop.metrics = metrics
    created = int(time.time())
    fingerprint = f"bitdlm-{__version__}"
    pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="bitdlm-parse")
    max_text_chars = None
    if getattr(tokenizer, "max_token_chars", None):
        # a text longer than this cannot fit the context: refused before tokenizing
        max_text_chars = config.max_model_len * int(tokenizer.max_token_chars)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine_loop.start()
        try:
            yield
        finally:
            # the graceful part (draining) happened before (cli.Server); what is
            # still in flight now gets the shutdown 503
            await asyncio.to_thread(engine_loop.stop)
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="bitdlm", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine_loop = engine_loop
    app.state.metrics = metrics
    app.state.config = config

    def error_response(e: APIError):
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(APIError(500, f"Internal server error: {type(exc).__name__}"))

    app.add_middleware(Gate, metrics=metrics, engine_loop=engine_loop, api_key=config.api_key)

    # -- helpers
    async def off_loop(big: bool, fn, *args):
        if not big:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def too_large():
        return APIError(413, f"The request body is larger than {config.max_body_bytes} bytes.",
                        code="request_too_large")

    async def read_body(request: Request, schema):
        try:
            size = int(request.headers.get("content-length") or 0)
        except ValueError:
            size = 0
        if size > config.max_body_bytes:
            raise too_large()
        # count what arrives: a chunked upload has no Content-Length to trust
        chunks, got = [], 0
        async for chunk in request.stream():
            got += len(chunk)
            if got > config.max_body_bytes:
                raise too_large()
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
            try:
                return schema.model_validate(data)
            except ValidationError as e:
                raise validation_error(e)

        return await off_loop(len(raw) > OFF_LOOP_BYTES, parse)

    def check_text_size(n_chars, what):
        if max_text_chars is not None and n_chars > max_text_chars:
            raise bad(f"This model's maximum context length is {config.max_model_len} tokens, "
                      f"and the {what} has {n_chars} characters, more than that many tokens can "
                      f"hold ({max_text_chars}).", param="prompt" if what == "prompt"
                      else "messages", code="context_length_exceeded")

    async def encode(text):
        check_text_size(len(text), "prompt")
        return await off_loop(len(text) > OFF_LOOP_BYTES // 8,
                              lambda: list(tokenizer.encode(text)))

    def check_model(name):
        if name is not None and name != config.served_model_name:
            raise APIError(404, f"The model `{name}` does not exist "
                           f"(this server serves `{config.served_model_name}`).",
                           param="model", code="model_not_found")

    def sampling_params(req, max_tokens, n_prompt):
        return to_sampling_params(req, max_tokens=max_tokens, n_prompt=n_prompt,
                                  max_model_len=config.max_model_len,
                                  defaults=config.default_params)

    def check_ids(ids, what):
        check_prompt_ids(ids, what, max_model_len=config.max_model_len,
                         vocab_size=config.vocab_size)

    async def start_job(request, prefix, prompts, params) -> Job:
        job = Job(engine_loop, f"{prefix}-{uuid.uuid4().hex}", len(prompts))
        job.submit(prompts, params)
        job.watch(request)
        try:
            await job.wait_admitted()
        except BaseException:
            job.close()
            raise
        return job

    def stream_response(job, gen):
        async def body():
            try:
                async for chunk in gen:
                    yield chunk
            except ClientGone:
                return
            except APIError as e:  # mid-stream: OpenAI clients raise on an error event
                yield sse(e.body())
                yield SSE_DONE
            except Exception as e:  # a bug of ours: end this stream alone, cleanly
                log.exception("stream of %s failed", job.rid)
                yield sse(APIError(500, f"Internal server error: {type(e).__name__}").body())
                yield SSE_DONE
            finally:
                job.close()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

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

    # -- routes
    @app.get("/health")
    async def health():
        if not engine_loop.alive():
            raise APIError(503, "The engine is not running.", code="unavailable")
        out = {"status": "ok"}
        if model is not None and getattr(model, "threads", None):
            out["threads"] = int(model.threads)
            out["forward_threads"] = int(getattr(model, "forward_threads", 0))
        return out

    @app.get("/metrics")
    async def get_metrics():
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    def model_card():
        return {"id": config.served_model_name, "object": "model", "created": created,
                "owned_by": "bitdlm", "max_model_len": config.max_model_len}

    @app.get("/generation/algorithms")
    async def generation_algorithms():
        from .. import decoding  # the unmasking rules and cache strategies a request may pick

        return decoding.describe()

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        check_model(model_id)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_body(request, CompletionRequest)
        check_model(req.model)
        reject_unsupported(req, chat=False)
        p = req.prompt
        if isinstance(p, str):
            prompts = [await encode(p)]
        elif not p:
            raise bad("The prompt is empty.", param="prompt")
        elif isinstance(p[0], int):
            prompts = [list(p)]
        elif isinstance(p[0], str):
            prompts = [await encode(s) for s in p]
        else:
            prompts = [list(x) for x in p]
        for ids in prompts:
            check_ids(ids, "prompt")
        max_tokens = req.max_tokens if req.max_tokens is not None else 16  # OpenAI's default
        params = sampling_params(req, max_tokens, max(len(ids) for ids in prompts))
        return await run(request, req, "cmpl", prompts, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_body(request, ChatRequest)
        check_model(req.model)
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
        check_text_size(n_chars, "conversation")
        from jinja2 import TemplateError

        try:
            ids = await off_loop(n_chars > OFF_LOOP_BYTES // 8, render_chat, tokenizer, messages)
        except (ValueError, TemplateError) as e:  # no template; raise_exception() in it
            raise bad(f"Could not apply the chat template: {e}", param="messages")
        check_ids(ids, "conversation")
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = sampling_params(req, max_tokens, len(ids))
        return await run(request, req, "chatcmpl", [ids], params, chat=True)

    async def run(request, req, prefix, prompts, params, chat):
        try:
            job = await start_job(request, prefix, prompts, params)
        except ClientGone:
            return Response(status_code=499)
        n = len(prompts)
        name = config.served_model_name
        if not req.stream:
            try:
                texts, reasons, use = await collect(job, n)
            except ClientGone:
                return Response(status_code=499)
            if chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": texts[i],
                                                   "refusal": None},
                            "logprobs": None, "finish_reason": reasons[i]} for i in range(n)]
            else:
                choices = [{"index": i, "text": texts[i], "logprobs": None,
                            "finish_reason": reasons[i]} for i in range(n)]
            return {"id": job.rid, "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()), "model": name,
                    "system_fingerprint": fingerprint, "choices": choices, "usage": use}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        obj = "chat.completion.chunk" if chat else "text_completion"
        t_created = int(time.time())

        def chunk(choices, use=None):
            c = {"id": job.rid, "object": obj, "created": t_created, "model": name,
                 "system_fingerprint": fingerprint, "choices": choices}
            if include_usage:
                c["usage"] = use
            return sse(c)

        def choice(i, text, finish, first=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if first else (
                    {"content": text} if text else {})
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}

        async def gen():
            prompt_toks = [len(ids) for ids in prompts]
            gen_toks = [0] * n
            if chat:
                for i in range(n):
                    yield chunk([choice(i, "", None, first=True)])
            async for i, out in job.events():
                prompt_toks[i] = out.num_prompt_tokens
                gen_toks[i] = out.num_generated_tokens
                if out.text:
                    yield chunk([choice(i, out.text, None)])
                if out.finished:
                    yield chunk([choice(i, "", out.finish_reason)])
            if include_usage:
                yield chunk([], usage(sum(prompt_toks), sum(gen_toks)))
            yield SSE_DONE

        return stream_response(job, gen())

    return app
