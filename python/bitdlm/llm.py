"""Offline API: `LLM(model).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import collections
import itertools
import os
import threading
import time
import uuid
from dataclasses import dataclass, field

from .sampling_params import SamplingParams  # noqa: F401  (re-exported: bitdlm.llm.SamplingParams)


@dataclass
class Generation:
    """The result of one prompt."""
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    prompt_token_ids: list[int]
    stats: dict = field(default_factory=dict)  # forwards, tokens_per_forward, seconds
    # "ar" | "diffusion": the mode it was admitted in (decode_policy); stats["decode_mode_at_end"]
    # differs where the adaptive policy moved it from diffusion to AR when a block closed
    decode_mode: str = "diffusion"


class LLM:
    """`LLM(model=None, threads=None)`: model is a `.bin` path, a loaded
    `bitdlm.model.Model`, or None for the default model (bitdlm.model.default_model_path():
    $BITDLM_MODEL or the packaged one). `block_size` overrides the model's (1 = AR).
    `verify` checks every tensor's crc32 and that float tensors are finite at load.
    `decode_policy`: "fixed" (a request decodes as its SamplingParams say) or "adaptive"
    (opt-in: a request that leaves the decoding unset is assigned AR or diffusion by the
    load, which may change its output; `Generation.decode_mode` says which; docs/server.md).

    One LLM may be shared by threads: its calls take turns (a lock around each
    generate / generate_stream, held until the stream is exhausted or closed);
    to decode in parallel, put the prompts in one generate() call, which batches
    them. Interleaving a generate_stream with another call in the same thread
    raises RuntimeError (it would steal the stream's outputs)."""

    def __init__(self, model=None, threads: int | None = None, max_batch: int = 16,
                 block_size: int | None = None, kv_budget_gb: float | None = None, kv_dtype: str | None = None,
                 verify: bool = True, decode_policy: str = "fixed"):
        from .engine import Engine

        if not (model is None or isinstance(model, (str, os.PathLike))
                or hasattr(model, "meta") and hasattr(model, "forward")):
            raise TypeError(f"LLM(model=...) takes a .bin path, a bitdlm Model or None, "
                            f"got {type(model).__name__}")
        if model is None or isinstance(model, (str, os.PathLike)):
            path = model
            if path is not None and not os.path.exists(path):
                raise FileNotFoundError(f"model file not found: {path}")
            from . import model as _model_mod

            if path is None:
                path = getattr(_model_mod, "default_model_path", lambda: None)()
                if path is None or not os.path.exists(path):
                    raise FileNotFoundError("no packaged default model is installed; pass a .bin path "
                                            "(LLM(model='model.bin') / --model)")
            model = _model_mod.load(os.fspath(path), threads=threads, kv_budget_gb=kv_budget_gb,
                                    kv_dtype=kv_dtype, verify=verify)
        self.model = model
        from .tokenizer import model_tokenizer

        tok = model_tokenizer(model)
        self.tokenizer = tok
        self.engine = Engine(model, max_batch=max_batch, block_size=block_size, tokenizer=tok,
                             decode_policy=decode_policy)
        self._lock = threading.Lock()
        self._owner = None  # the thread in a call

    def _enter(self) -> None:
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError("this LLM is already generating in this thread (an unfinished "
                               "generate_stream?): finish or close it first")
        self._lock.acquire()
        self._owner = me

    def _exit(self) -> None:
        self._owner = None
        self._lock.release()

    # ---------------------------------------------------------------- prompts
    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("empty prompt")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt)
        try:
            ids = list(map(int, prompt))
        except (TypeError, ValueError):
            raise ValueError("a prompt is a string or a list of token ids") from None
        if bool in set(map(type, prompt)):  # (isinstance(t, bool): bool has no subclasses)
            raise ValueError("a prompt is a string or a list of token ids")
        return ids

    def chat_prompt(self, messages) -> list[int]:
        """Token ids of `messages` rendered with the model's chat template."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)

    # ------------------------------------------------------------- generation
    def generate(self, prompts, params: SamplingParams | list | None = None) -> list[Generation]:
        """Generate for a prompt or a list of prompts (strings or token-id lists),
        all decoded together. Returns one Generation per prompt, in order."""
        self._enter()
        try:
            return self._generate(prompts, params)
        finally:
            self._exit()

    def _generate(self, prompts, params) -> list[Generation]:
        single = isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts))
        plist = [prompts] if single else list(prompts)
        if not plist:
            return []
        if isinstance(params, (list, tuple)):
            if len(params) != len(plist):
                raise ValueError("one SamplingParams per prompt, or a single one")
            plist_params = list(params)
        else:
            plist_params = [params or SamplingParams()] * len(plist)
        eng = self.engine
        # everything that can be wrong with a prompt or its params, before any work
        for sp in {id(sp): sp for sp in plist_params}.values():
            if not isinstance(sp, SamplingParams):
                raise TypeError(f"params must be SamplingParams, got {type(sp).__name__}")
            sp.validate()
        encoded = [eng.check_prompt(self._encode(p)) for p in plist]
        base = f"gen-{uuid.uuid4().hex}-"  # (one random id per call, numbered: a uuid4 per prompt costs ~2 us)
        ids = [base + str(i) for i in range(len(plist))]
        # requests enter the engine a window at a time as others finish: admission
        # stays linear and memory bounded for 10^6 prompts, and decoding starts at once
        backlog = collections.deque(zip(ids, encoded, plist_params))
        window = max(4 * eng.max_batch, 64)
        t0 = time.perf_counter()
        modes, done = {}, {}
        live: dict[str, list] = {}  # a running request's outputs (kept as they come: one append per step)
        try:
            while live or backlog:
                while backlog and len(live) < window:
                    rid, enc, sp = backlog.popleft()
                    modes[rid] = eng.add_checked(rid, enc, sp, final_only=True,  # (all checked above)
                                                 arriving=min(len(backlog), window - len(live) - 1))
                    live[rid] = []
                for out in eng.step():  # (once per request and step)
                    outs = live.get(out.request_id)
                    if outs is None:
                        continue
                    outs.append(out)
                    if out.finished:
                        del live[out.request_id]
                        if out.error:
                            raise RuntimeError(f"request failed: {out.error}")
                        done[out.request_id] = (list(itertools.chain.from_iterable(o.new_token_ids for o in outs)),
                                                "".join([o.text for o in outs]), out.finish_reason, out.forwards,
                                                time.perf_counter() - t0, out.decode_mode)
        except BaseException:
            for rid in live:
                eng.abort(rid)
            self._drain(set(live))
            raise
        res = []
        for rid, enc in zip(ids, encoded):
            toks, text, reason, forwards, t, end_mode = done[rid]
            n = len(toks)
            res.append(Generation(text=text, token_ids=toks, finish_reason=reason, prompt_token_ids=enc.tolist(),
                                  stats=dict(forwards=forwards, generated_tokens=n,
                                             tokens_per_forward=n / forwards if forwards else 0.0,
                                             seconds=t, decode_mode_at_end=end_mode), decode_mode=modes[rid]))
        return res

    def generate_stream(self, prompt, params: SamplingParams | None = None):
        """Yield text deltas for one prompt as soon as a contiguous prefix of the
        current block is final. The finished Generation is `.result` of the
        generator's StopIteration (use `yield from`), also kept in `self.last`."""
        self._enter()
        try:
            return (yield from self._stream(prompt, params))
        finally:
            self._exit()

    def _stream(self, prompt, params):
        eng = self.engine
        enc = self._encode(prompt)
        rid = f"gen-{uuid.uuid4().hex}"
        mode = eng.add_request(rid, enc, params or SamplingParams())
        t0 = time.perf_counter()
        ids, texts, reason, forwards, end_mode = [], [], None, 0, mode
        try:
            while reason is None:
                for out in eng.step():
                    if out.request_id != rid:
                        continue
                    ids += out.new_token_ids
                    forwards, end_mode = out.forwards, out.decode_mode
                    if out.finished:
                        reason = out.finish_reason
                        if out.error:
                            raise RuntimeError(f"request failed: {out.error}")
                    if out.text:
                        texts.append(out.text)
                        yield out.text
        finally:
            if reason is None:  # consumer stopped early
                eng.abort(rid)
                self._drain({rid})
        n = len(ids)
        self.last = Generation(text="".join(texts), token_ids=ids, finish_reason=reason, prompt_token_ids=enc,
                               stats=dict(forwards=forwards, generated_tokens=n,
                                          tokens_per_forward=n / forwards if forwards else 0.0,
                                          seconds=time.perf_counter() - t0, decode_mode_at_end=end_mode),
                               decode_mode=mode)
        return self.last

    def _drain(self, rids: set) -> None:
        """Consume the abort outputs of `rids` so the engine is clean again."""
        self.engine.drop_outputs(rids)
