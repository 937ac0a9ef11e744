"""OpenAI-compatible HTTP server (`bitdlm serve`).

One engine thread owns the `Engine` and steps every active request together
(continuous batching); HTTP handlers hand requests to it through a locked
command queue, and it hands results back to asyncio with
`loop.call_soon_threadsafe`. A request that finishes, fails or whose client
goes away leaves between two steps without stalling the others. See
docs/server.md.

This module is imported by the CLI for every command, so FastAPI, pydantic,
uvicorn and the model are imported only when the server is actually built.
"""
import argparse
import collections
import dataclasses
import functools
import hmac
import json
import logging
import os
import threading
import time
import uuid
from typing import Any

log = logging.getLogger("bitdlm.server")

# Wait this long for in-flight requests on SIGINT/SIGTERM before cancelling them.
SHUTDOWN_TIMEOUT_S = 30
MAX_BODY_BYTES = 32 << 20  # far above any prompt that fits a context


# --------------------------------------------------------------------- CLI


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The flags of `bitdlm serve` (shared with scripts/serve_dlm_native.py)."""
    p.add_argument("--model", default=None,
                   help="model .bin file (default: the packaged default model)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--block-size", type=int, default=None,
                   help="diffusion block size (default: the model's)")
    p.add_argument("--small-block-size", type=int, default=None,
                   help="default sub-block size of a request (default: the model's)")
    p.add_argument("--threshold", type=float, default=None,
                   help="default confidence threshold of a request (default: the model's)")
    p.add_argument("--max-batch", type=int, default=16, help="requests stepped together")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting beyond --max-batch before answering 429")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + completion limit (default: max_position_embeddings)")
    p.add_argument("--kv-budget-gb", type=float, default=None, help="KV cache budget")
    p.add_argument("--api-key", default=os.environ.get("BITDLM_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every route but /health "
                        "(default: $BITDLM_API_KEY)")
    p.add_argument("--served-model-name", default=None,
                   help="model id clients pass (default: the file name without extension)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--profile", action="store_true",
                   help="time every forward phase and export it on /metrics as "
                        "bitdlm_forward_phase_seconds{phase=...} (also BITDLM_PROFILE=1)")


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server",
                              description="Serve a model over the OpenAI HTTP API.")
    add_serve_args(p)
    p.set_defaults(func=_cmd_serve)


def main(argv=None) -> int:
    """Entry point of scripts/serve_dlm_native.py (the same flags as `bitdlm serve`)."""
    p = argparse.ArgumentParser(prog="serve_dlm_native.py", description=__doc__.split("\n")[0])
    add_serve_args(p)
    args = p.parse_args(argv)
    try:
        return int(_cmd_serve(args) or 0)
    except KeyboardInterrupt:
        return 130


def _check_args(args) -> None:
    for name in ("max_batch", "port"):
        if getattr(args, name) < 1:
            raise SystemExit(f"bitdlm serve: --{name.replace('_', '-')} must be >= 1")
    if args.max_queue < 0:
        raise SystemExit("bitdlm serve: --max-queue must be >= 0")
    for name in ("threads", "block_size", "small_block_size", "max_model_len"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise SystemExit(f"bitdlm serve: --{name.replace('_', '-')} must be >= 1")
    if args.threshold is not None and not 0.0 < args.threshold <= 1.0:
        raise SystemExit("bitdlm serve: --threshold must be in (0, 1]")


def _resolve_model_path(path):
    if path:
        return path
    from .model import default_model_path

    path = default_model_path()  # $BITDLM_MODEL, else the packaged model, else None
    if not path:
        raise SystemExit("bitdlm serve: no --model given and no packaged default model found")
    return str(path)


def build_from_args(args):
    """Load the model and the engine described by the flags -> (app, config)."""
    _check_args(args)
    path = _resolve_model_path(args.model)
    from .engine import Engine
    from .model import load

    try:
        model = load(path, threads=args.threads, kv_budget_gb=args.kv_budget_gb)
    except (OSError, ValueError) as e:  # missing file, bad format (ModelFormatError)
        raise SystemExit(f"bitdlm serve: cannot load {path}: {e}")
    if getattr(args, "profile", False):
        model.set_profile(True)
    meta = model.meta
    max_pos = int(meta["max_position_embeddings"])
    if args.max_model_len is not None and args.max_model_len > max_pos:
        raise SystemExit(f"bitdlm serve: --max-model-len {args.max_model_len} exceeds the "
                         f"model's max_position_embeddings {max_pos}")
    tok = getattr(model, "tokenizer", None)
    if tok is None and meta.get("tokenizer_json"):
        from .tokenizer import Tokenizer

        tok = Tokenizer.from_meta(meta)
    if tok is None:
        raise SystemExit("bitdlm serve: the model file has no tokenizer")
    try:
        engine = Engine(model, max_batch=args.max_batch, block_size=args.block_size,
                        tokenizer=tok)
    except ValueError as e:
        raise SystemExit(f"bitdlm serve: {e}")
    defaults = {}
    if args.threshold is not None:
        defaults["threshold"] = args.threshold
    if args.small_block_size is not None:
        defaults["small_block_size"] = args.small_block_size
    name = args.served_model_name or os.path.splitext(os.path.basename(path))[0]
    config = ServerConfig(
        served_model_name=name,
        max_model_len=args.max_model_len or max_pos,
        vocab_size=int(meta["vocab_size"]),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        api_key=args.api_key,
        default_params=defaults,
    )
    return create_app(engine, tok, config, model=model), config


def _cmd_serve(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    app, config = build_from_args(args)
    import uvicorn

    log.info("serving %s on http://%s:%d (max batch %d, max queue %d, max len %d)",
             config.served_model_name, args.host, args.port, config.max_batch,
             config.max_queue, config.max_model_len)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S)
    return 0


# ------------------------------------------------------------------ errors


class APIError(Exception):
    """An error answered as OpenAI's error JSON."""

    _TYPES = {429: "rate_limit_error"}

    def __init__(self, status: int, message: str, *, param=None, code=None, type=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or self._TYPES.get(
            status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


def _bad(message, param=None, code=None):
    return APIError(400, message, param=param, code=code)


# ----------------------------------------------------------- engine thread


@dataclasses.dataclass
class ServerConfig:
    served_model_name: str
    max_model_len: int
    vocab_size: int
    max_batch: int = 16
    max_queue: int = 64
    api_key: str | None = None
    default_params: dict = dataclasses.field(default_factory=dict)  # SamplingParams defaults
    max_body_bytes: int = MAX_BODY_BYTES


class _Sink:
    """Where the engine thread delivers the events of one (sub-)request:
    `(index, kind, payload)` onto an asyncio.Queue, kind in ack/out/error."""

    __slots__ = ("aloop", "queue", "index")

    def __init__(self, aloop, queue, index):
        self.aloop, self.queue, self.index = aloop, queue, index

    def put(self, kind, payload=None):
        try:
            self.aloop.call_soon_threadsafe(self.queue.put_nowait, (self.index, kind, payload))
        except RuntimeError:  # event loop closed (shutdown): nobody is listening
            pass


def _put_all(items):
    for queue, item in items:
        queue.put_nowait(item)


class _Batch:
    """The events of one engine step, handed over with one
    call_soon_threadsafe per event loop (one wake-up per step, not per request)."""

    def __init__(self):
        self.by_loop: dict = {}

    def put(self, sink, kind, payload=None):
        self.by_loop.setdefault(sink.aloop, []).append((sink.queue, (sink.index, kind, payload)))

    def flush(self):
        for aloop, items in self.by_loop.items():
            try:
                aloop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # event loop closed (shutdown)
                pass
        self.by_loop = {}


class _Active:
    __slots__ = ("sink", "t_submit", "t_first", "n_prompt")

    def __init__(self, sink, t_submit, n_prompt):
        self.sink, self.t_submit, self.t_first, self.n_prompt = sink, t_submit, None, n_prompt


class EngineLoop:
    """The engine thread. Only this thread touches the Engine; other threads
    talk to it through `submit` / `abort` (a locked deque + condition)."""

    def __init__(self, engine, *, max_batch: int, max_queue: int, metrics=None):
        self.engine = engine
        self.max_batch = max_batch
        self.capacity = max_batch + max_queue
        self.metrics = metrics
        self._cv = threading.Condition()
        self._cmds: collections.deque = collections.deque()
        self._inflight = 0            # submitted and not finished (under _cv)
        self._active: dict[str, _Active] = {}  # engine thread only
        self._stopping = False
        self.dead: BaseException | None = None
        self.running = 0              # requests in the engine's batch (engine thread writes)
        self._last_forwards = 0
        self._thread = threading.Thread(target=self._run, name="bitdlm-engine", daemon=True)

    # -- called from the event loop
    def start(self):
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive() and self.dead is None and not self._stopping

    @property
    def queued(self) -> int:
        with self._cv:
            return max(0, self._inflight - self.running)

    def submit(self, rid: str, prompt_ids: list[int], params, sink: _Sink) -> None:
        with self._cv:
            if self._stopping or self.dead is not None or not self._thread.is_alive():
                raise APIError(503, "The server is shutting down or its engine stopped.",
                               code="unavailable")
            if self._inflight >= self.capacity:
                raise APIError(429, f"The server is at capacity ({self.capacity} requests "
                               "running or queued); retry later.", code="queue_full")
            self._inflight += 1
            self._cmds.append(("add", rid, prompt_ids, params, sink))
            self._cv.notify()

    def abort(self, rid: str) -> None:
        with self._cv:
            self._cmds.append(("abort", rid))
            self._cv.notify()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the thread
    def _release(self):
        with self._cv:
            self._inflight -= 1

    def _run(self):
        try:
            while True:
                with self._cv:
                    while not self._cmds and not self._active and not self._stopping:
                        self._cv.wait()
                    if self._stopping:
                        break
                    cmds = list(self._cmds)
                    self._cmds.clear()
                aborted = False
                for cmd in cmds:
                    if cmd[0] == "add":
                        self._add(*cmd[1:])
                    else:
                        aborted |= self._abort(cmd[1])
                # a step also collects the engine's abort outputs, so an idle
                # engine is left clean
                if self._active or aborted:
                    self._step()
                self._update_running()
        except BaseException as e:  # a bug in this loop: fail everyone, report unhealthy
            log.exception("engine thread died")
            self.dead = e
        finally:
            self._shutdown()

    def _update_running(self):
        n = len(self._active)
        try:
            n = min(n, int(self.engine.num_running()))
        except Exception:
            n = min(n, self.max_batch)
        self.running = n

    def _add(self, rid, prompt_ids, params, sink):
        try:
            self.engine.add_request(rid, prompt_ids, params)
        except ValueError as e:
            self._release()
            sink.put("error", _bad(str(e)))
            self._count_finish("rejected")
            return
        except Exception as e:
            log.exception("add_request(%s) failed", rid)
            self._release()
            sink.put("error", APIError(500, f"engine error: {e}"))
            self._count_finish("error")
            return
        self._active[rid] = _Active(sink, time.monotonic(), len(prompt_ids))
        sink.put("ack")

    def _abort(self, rid):
        a = self._active.pop(rid, None)
        if a is None:  # already finished (or never admitted)
            return False
        try:
            self.engine.abort(rid)
        except Exception:
            log.exception("abort(%s) failed", rid)
        self._release()
        self._count_finish("abort")
        return True

    def _step(self):
        t0 = time.perf_counter()
        try:
            outs = self.engine.step()
        except Exception as e:
            # The engine does not say which request broke the batch: fail the
            # requests of this step (their state is unknown), keep serving.
            log.exception("engine step failed; failing %d request(s)", len(self._active))
            for rid in list(self._active):
                a = self._active.pop(rid)
                try:
                    self.engine.abort(rid)
                except Exception:
                    pass
                self._release()
                a.sink.put("error", APIError(500, f"engine error: {type(e).__name__}: {e}"))
                self._count_finish("error")
            return
        now = time.monotonic()
        m = self.metrics
        if m is not None:
            m.step_latency.observe(time.perf_counter() - t0)
            m.steps.inc()
            fw = getattr(getattr(self.engine, "stats", None), "forwards", None)
            if fw is not None:
                m.forwards.inc(max(0, fw - self._last_forwards))
                self._last_forwards = fw
        batch = _Batch()
        for out in outs:
            a = self._active.get(out.request_id)
            if a is None:
                continue
            if out.new_token_ids and a.t_first is None:
                a.t_first = now
                if m is not None:
                    m.ttft.observe(now - a.t_submit)
            if m is not None and out.new_token_ids:
                m.generation_tokens.inc(len(out.new_token_ids))
            err = getattr(out, "error", None)
            if err:  # the engine dropped this request (e.g. out of KV cache memory)
                batch.put(a.sink, "error", APIError(500, f"engine error: {err}",
                                                    code="engine_error"))
            else:
                batch.put(a.sink, "out", out)
            if out.finished or err:
                del self._active[out.request_id]
                self._release()
                if err:
                    self._count_finish("error")
                else:
                    self._count_finish(out.finish_reason or "stop", out, a, now)
        batch.flush()

    def _count_finish(self, reason, out=None, a=None, now=None):
        m = self.metrics
        if m is None:
            return
        m.finished.labels(reason=reason).inc()
        if out is not None:
            m.finished_request(out, now - a.t_submit)

    def _shutdown(self):
        with self._cv:
            self._stopping = True
            cmds = list(self._cmds)
            self._cmds.clear()
        err = APIError(503, "The server is shutting down.", code="unavailable")
        for cmd in cmds:
            if cmd[0] == "add":
                self._release()
                cmd[4].put("error", err)
        for rid, a in list(self._active.items()):
            try:
                self.engine.abort(rid)
            except Exception:
                pass
            self._release()
            a.sink.put("error", err)
        self._active.clear()
        self.running = 0


# ----------------------------------------------------------------- metrics


class _PhaseCollector:
    """Forward time per phase (Model.profile(), cumulative since load) as a counter."""

    def __init__(self, model):
        self.model = model

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        prof = dict(self.model.profile())
        prof.pop("calls", None)
        c = CounterMetricFamily("bitdlm_forward_phase_seconds",
                                "Wall time of model forwards by phase (GEMMs, attention, lm_head, ...)",
                                labels=["phase"])
        for phase, sec in prof.items():
            c.add_metric([phase], sec)
        yield c


class _Metrics:
    """Prometheus metrics in a registry of their own (one per app)."""

    def __init__(self, loop_ref, model=None):
        from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                                       disable_created_metrics)

        disable_created_metrics()  # no *_created series: they double the output for nothing

        r = self.registry = CollectorRegistry()
        self.requests = Counter("bitdlm_http_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.finished = Counter(
            "bitdlm_requests_finished",
            "Generation requests leaving the engine, by reason "
            "(stop, length, abort = cancelled or client gone, error, rejected)",
            ["reason"], registry=r)
        self.prompt_tokens = Counter("bitdlm_prompt_tokens", "Prompt tokens of finished requests",
                                     registry=r)
        self.generation_tokens = Counter("bitdlm_generation_tokens", "Generated (final) tokens",
                                         registry=r)
        self.steps = Counter("bitdlm_engine_steps", "Engine steps (each advances every running "
                             "request)", registry=r)
        self.forwards = Counter("bitdlm_forward_passes",
                                "Batched model forward calls made by the engine", registry=r)
        self.request_forwards = Counter(
            "bitdlm_request_forward_passes",
            "Forward passes summed over finished requests (each request counts the passes "
            "it took part in)", registry=r)
        self.tokens_per_forward_hist = Histogram(
            "bitdlm_request_tokens_per_forward",
            "Generated tokens per forward pass of each finished request",
            buckets=(0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 16, 32), registry=r)
        tpf = Gauge("bitdlm_tokens_per_forward",
                    "Generated tokens / forward passes over all finished requests", registry=r)
        tpf.set_function(self._tokens_per_forward)
        self._lock = threading.Lock()
        self._finished_tokens = 0
        self._finished_forwards = 0
        self.step_latency = Histogram(
            "bitdlm_step_latency_seconds", "Latency of one engine step",
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.ttft = Histogram(
            "bitdlm_time_to_first_token_seconds", "Submission to first final token",
            buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.e2e = Histogram(
            "bitdlm_request_latency_seconds", "Submission to the last token",
            buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)
        g = Gauge("bitdlm_requests_running", "Requests in the engine's batch", registry=r)
        g.set_function(lambda: loop_ref().running if loop_ref() else 0)
        g = Gauge("bitdlm_requests_queued", "Requests accepted and waiting for a batch slot",
                  registry=r)
        g.set_function(lambda: loop_ref().queued if loop_ref() else 0)
        if model is not None and hasattr(model, "kv_bytes_used"):
            g = Gauge("bitdlm_kv_cache_bytes", "KV cache bytes in use", registry=r)
            g.set_function(lambda: float(model.kv_bytes_used()))
        if model is not None and getattr(model, "profiling", False):
            r.register(_PhaseCollector(model))

    def finished_request(self, out, latency):
        fw = int(out.forwards or 0)
        self.prompt_tokens.inc(out.num_prompt_tokens)
        self.request_forwards.inc(fw)
        self.e2e.observe(latency)
        if fw:
            self.tokens_per_forward_hist.observe(out.num_generated_tokens / fw)
            with self._lock:
                self._finished_tokens += out.num_generated_tokens
                self._finished_forwards += fw

    def _tokens_per_forward(self):
        with self._lock:
            fw, toks = self._finished_forwards, self._finished_tokens
        return toks / fw if fw else 0.0

    def render(self):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ----------------------------------------------------------- request schemas


@functools.lru_cache(maxsize=None)
def _schemas():
    """The pydantic request models (strict: wrong JSON types are errors, not coerced)."""
    from typing import Literal, Optional, Union

    from pydantic import BaseModel, ConfigDict, Field

    strict = ConfigDict(strict=True, extra="forbid")

    class StreamOptions(BaseModel):
        model_config = ConfigDict(strict=True, extra="ignore")
        include_usage: bool = False

    class _Common(BaseModel):
        model_config = strict
        model: Optional[str] = None
        max_tokens: Optional[int] = Field(default=None, ge=1)
        temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
        top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
        n: int = 1
        stream: bool = False
        stream_options: Optional[StreamOptions] = None
        stop: Union[str, list[str], None] = None
        seed: Optional[int] = None
        presence_penalty: float = 0.0
        frequency_penalty: float = 0.0
        logit_bias: Optional[dict[str, float]] = None
        user: Optional[str] = None  # accepted and ignored
        # bitdlm extras (Fast-dLLM v2 decoding)
        threshold: Optional[float] = Field(default=None, gt=0.0, le=1.0)
        small_block_size: Optional[int] = Field(default=None, ge=1)
        use_block_cache: Optional[bool] = None
        ignore_eos: Optional[bool] = None  # as vLLM: keep generating past EOS (benchmarks)
        # decoding algorithm and cache per request, as the LLaDA-style servers took them
        # (bitdlm.decoding; SamplingParams.validate range-checks them)
        generation_algorithm: Optional[str] = None
        factor: Optional[float] = None
        credit_alpha: Optional[float] = None
        boost_gamma: Optional[float] = None
        decay_beta: Optional[float] = None
        use_cache: Optional[bool] = None  # false: cache "none" (recompute every step)
        use_dual_cache: Optional[bool] = None  # true: cache "dual" (the sub-block cache)
        block_length: Optional[int] = Field(default=None, ge=1)

    class CompletionRequest(_Common):
        prompt: Union[str, list[int], list[str], list[list[int]]]
        echo: bool = False
        best_of: Optional[int] = None
        logprobs: Optional[int] = None
        suffix: Optional[str] = None

    class ContentPart(BaseModel):
        model_config = strict
        type: Literal["text"]
        text: str

    class Message(BaseModel):
        model_config = ConfigDict(strict=True, extra="ignore")
        role: Literal["system", "developer", "user", "assistant", "tool"]
        content: Union[str, list[ContentPart], None] = None
        name: Optional[str] = None

    class ChatRequest(_Common):
        messages: list[Message]
        max_completion_tokens: Optional[int] = Field(default=None, ge=1)
        logprobs: Optional[bool] = None
        top_logprobs: Optional[int] = None
        tools: Optional[list[Any]] = None
        tool_choice: Optional[Any] = None
        response_format: Optional[dict[str, Any]] = None
        parallel_tool_calls: Optional[bool] = None  # accepted and ignored
        metadata: Optional[dict[str, Any]] = None   # accepted and ignored
        store: Optional[bool] = None                # accepted and ignored

    return CompletionRequest, ChatRequest


def _validation_error(exc) -> APIError:
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ())]
    param = loc[0] if loc else None
    if err.get("type") == "extra_forbidden":
        return _bad(f"Unrecognized request argument supplied: {'.'.join(loc)}", param=param)
    where = ".".join(loc) if loc else "body"
    return _bad(f"Invalid value for '{where}': {err.get('msg')} (got {err.get('input')!r:.60}).",
                param=param, code="invalid_type" if err.get("type", "").endswith("_type")
                else "invalid_value")


def _reject_unsupported(req, chat: bool) -> None:
    """400 for OpenAI parameters this server does not implement (never ignore them silently)."""
    def no(param, why):
        raise _bad(f"Unsupported parameter '{param}': {why}.", param=param,
                   code="unsupported_parameter")

    if req.n != 1:
        no("n", "only n=1 is supported")
    if req.presence_penalty or req.frequency_penalty:
        no("presence_penalty" if req.presence_penalty else "frequency_penalty",
           "penalties are not supported")
    if req.logit_bias:
        no("logit_bias", "not supported")
    if req.stream_options is not None and not req.stream:
        raise _bad("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                   param="stream_options")
    if chat:
        if req.logprobs or req.top_logprobs:
            no("logprobs", "log probabilities are not supported")
        if req.tools or req.tool_choice not in (None, "none"):
            no("tools", "tool calling is not supported")
        if req.response_format not in (None, {"type": "text"}):
            no("response_format", "only text responses are supported")
    else:
        if req.logprobs:
            no("logprobs", "log probabilities are not supported")
        if req.echo:
            no("echo", "not supported")
        if req.best_of not in (None, 1):
            no("best_of", "only best_of=1 is supported")
        if req.suffix:
            no("suffix", "not supported")


# --------------------------------------------------------------- the app


class _Job:
    """One HTTP generation request: one engine request per prompt, their
    events merged on one asyncio.Queue, cancelled together."""

    def __init__(self, engine_loop: EngineLoop, rid: str, n: int):
        import asyncio

        self.engine_loop = engine_loop
        self.rid = rid
        self.sub_ids = [rid if n == 1 else f"{rid}-{i}" for i in range(n)]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.aloop = asyncio.get_running_loop()
        self.open: set[int] = set()   # submitted and not finished
        self.watcher = None
        self.closed = False
        self.gone = False  # the client disconnected
        self._early: collections.deque = collections.deque()

    def submit(self, prompts, params):
        try:
            for i, ids in enumerate(prompts):
                self.engine_loop.submit(self.sub_ids[i], ids, params,
                                        _Sink(self.aloop, self.queue, i))
                self.open.add(i)
        except APIError:
            self.close()
            raise

    def watch(self, request):
        """Abort when the client disconnects (the body has been read, so the
        next ASGI message is the disconnect)."""
        import asyncio

        async def _watch():
            while True:
                msg = await request.receive()
                if msg["type"] == "http.disconnect":
                    break
            if self.open:
                log.info("client of %s went away: aborting", self.rid)
            self.gone = True
            self.close(from_watcher=True)
            self.queue.put_nowait((None, "gone", None))

        self.watcher = asyncio.ensure_future(_watch())

    def _raise_failure(self, idx, kind, payload):
        """A queue item that ends the job: the client went away or the engine failed."""
        if kind == "gone":
            raise _ClientGone()
        if kind == "error":
            self.open.discard(idx)
            raise payload

    async def events(self):
        """Yield (index, RequestOutput) until every sub-request has finished;
        raises APIError on an engine error and _ClientGone on a disconnect."""
        while True:
            if self.gone:
                raise _ClientGone()
            if not self.open:
                return
            if self._early:
                idx, kind, payload = self._early.popleft()
            else:
                idx, kind, payload = await self.queue.get()
            self._raise_failure(idx, kind, payload)
            if kind == "ack":
                continue
            if payload.finished:
                self.open.discard(idx)
                if payload.finish_reason == "abort":
                    raise APIError(503, "The request was aborted by the server.", code="aborted")
            yield idx, payload

    async def wait_admitted(self):
        """Wait until every sub-request was accepted by the engine (so that a
        ValueError of add_request is still a 400 before any stream starts);
        outputs arriving meanwhile are kept for `events`, in order."""
        acked: set[int] = set()
        while len(acked) < len(self.sub_ids):
            item = await self.queue.get()
            idx, kind, payload = item
            self._raise_failure(idx, kind, payload)
            if kind == "ack":
                acked.add(idx)
            else:
                self._early.append(item)

    def close(self, from_watcher=False):
        if not from_watcher and self.watcher is not None:
            self.watcher.cancel()
        if self.closed:
            return
        self.closed = True
        for i in sorted(self.open):
            self.engine_loop.abort(self.sub_ids[i])
        self.open.clear()


class _ClientGone(Exception):
    pass


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n\n"


def _usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def create_app(engine, tokenizer, config: ServerConfig, *, model=None):
    """The FastAPI app serving `engine`. The engine thread starts and stops
    with the app's lifespan."""
    import asyncio
    import contextlib
    import weakref

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from . import __version__

    CompletionRequest, ChatRequest = _schemas()
    engine_loop = EngineLoop(engine, max_batch=config.max_batch, max_queue=config.max_queue)
    metrics = _Metrics(weakref.ref(engine_loop), model=model)
    engine_loop.metrics = metrics
    created = int(time.time())
    fingerprint = f"bitdlm-{__version__}"

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine_loop.start()
        try:
            yield
        finally:
            # uvicorn has already waited for in-flight requests (graceful part).
            await asyncio.to_thread(engine_loop.stop)

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
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(APIError(500, f"Internal server error: {type(exc).__name__}"))

    app.add_middleware(_Gate, metrics=metrics, api_key=config.api_key)

    # -- helpers
    async def read_body(request: Request, schema):
        try:
            size = int(request.headers.get("content-length") or 0)
        except ValueError:
            size = 0
        if size > config.max_body_bytes:
            raise APIError(413, f"The request body is larger than {config.max_body_bytes} bytes.",
                           code="request_too_large")
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise _bad(f"We could not parse the JSON body of your request: {e}.",
                       code="invalid_json")
        if not isinstance(data, dict):
            raise _bad("The request body must be a JSON object.", code="invalid_json")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e)

    def check_model(name):
        if name is not None and name != config.served_model_name:
            raise APIError(404, f"The model `{name}` does not exist "
                           f"(this server serves `{config.served_model_name}`).",
                           param="model", code="model_not_found")

    def sampling_params(req, max_tokens, n_prompt):
        from .llm import SamplingParams

        if max_tokens is None:
            max_tokens = config.max_model_len - n_prompt
        if n_prompt + max_tokens > config.max_model_len:
            raise _bad(f"This model's maximum context length is {config.max_model_len} tokens. "
                       f"However, you requested {n_prompt + max_tokens} tokens ({n_prompt} in "
                       f"the prompt, {max_tokens} for the completion). Please reduce the "
                       "prompt or the completion length.", param="max_tokens",
                       code="context_length_exceeded")
        kw = dict(config.default_params)
        kw["max_tokens"] = max_tokens
        for k in ("temperature", "top_p", "seed", "threshold", "small_block_size",
                  "use_block_cache", "ignore_eos", "generation_algorithm", "factor", "credit_alpha",
                  "boost_gamma", "decay_beta", "block_length"):
            v = getattr(req, k)
            if v is not None:
                kw[k] = v
        if req.use_cache is False and req.use_dual_cache:
            raise _bad("use_dual_cache needs the cache: it contradicts use_cache=false.",
                       param="use_dual_cache")
        if req.use_cache is False:
            kw["cache"], kw["use_block_cache"] = "none", False
        elif req.use_dual_cache is not None:
            kw["cache"] = "dual" if req.use_dual_cache else "prefix"
            kw["use_block_cache"] = bool(req.use_dual_cache)
        if req.stop is not None:
            kw["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
        try:
            sp = SamplingParams(**kw)
            if hasattr(sp, "validate"):
                sp.validate()
            return sp
        except (ValueError, TypeError) as e:
            param = "generation_algorithm" if "generation_algorithm" in str(e) else None
            raise _bad(f"Invalid sampling parameters: {e}", param=param)

    def check_ids(ids, what):
        if not ids:
            raise _bad(f"The {what} is empty.", param="prompt")
        if len(ids) >= config.max_model_len:
            raise _bad(f"This model's maximum context length is {config.max_model_len} tokens, "
                       f"and the {what} alone has {len(ids)} tokens.", param="prompt",
                       code="context_length_exceeded")
        for t in ids:
            if not 0 <= t < config.vocab_size:
                raise _bad(f"Token id {t} is out of range [0, {config.vocab_size}).",
                           param="prompt")

    async def start_job(request, prefix, prompts, params) -> _Job:
        job = _Job(engine_loop, f"{prefix}-{uuid.uuid4().hex}", len(prompts))
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
            except _ClientGone:
                return
            except APIError as e:  # mid-stream: OpenAI clients raise on an error event
                yield _sse(e.body())
                yield "data: [DONE]\n\n"
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
        return ["".join(t) for t in texts], reasons, _usage(sum(prompt_toks), sum(gen_toks))

    # -- routes
    @app.get("/health")
    async def health():
        if not engine_loop.alive():
            raise APIError(503, "The engine is not running.", code="unavailable")
        return {"status": "ok"}

    @app.get("/generation/algorithms")
    async def generation_algorithms():
        from . import decoding

        return decoding.describe()

    @app.get("/metrics")
    async def get_metrics():
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    def model_card():
        return {"id": config.served_model_name, "object": "model", "created": created,
                "owned_by": "bitdlm", "max_model_len": config.max_model_len}

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
        _reject_unsupported(req, chat=False)
        p = req.prompt
        if isinstance(p, str):
            prompts = [list(tokenizer.encode(p))]
        elif not p:
            raise _bad("The prompt is empty.", param="prompt")
        elif isinstance(p[0], int):
            prompts = [list(p)]
        elif isinstance(p[0], str):
            prompts = [list(tokenizer.encode(s)) for s in p]
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
        _reject_unsupported(req, chat=True)
        if not req.messages:
            raise _bad("'messages' must contain at least one message.", param="messages",
                       code="empty_array")
        messages = []
        for m in req.messages:
            c = m.content
            if isinstance(c, list):
                c = "".join(part.text for part in c)
            messages.append({"role": "system" if m.role == "developer" else m.role,
                             "content": c or ""})
        from jinja2 import TemplateError

        try:
            ids = render_chat(tokenizer, messages)
        except (ValueError, TemplateError) as e:  # no template; raise_exception() in it
            raise _bad(f"Could not apply the chat template: {e}", param="messages")
        check_ids(ids, "conversation")
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = sampling_params(req, max_tokens, len(ids))
        return await run(request, req, "chatcmpl", [ids], params, chat=True)

    async def run(request, req, prefix, prompts, params, chat):
        try:
            job = await start_job(request, prefix, prompts, params)
        except _ClientGone:
            return Response(status_code=499)
        n = len(prompts)
        name = config.served_model_name
        if not req.stream:
            try:
                texts, reasons, usage = await collect(job, n)
            except _ClientGone:
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
                    "system_fingerprint": fingerprint, "choices": choices, "usage": usage}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        obj = "chat.completion.chunk" if chat else "text_completion"
        t_created = int(time.time())

        def chunk(choices, usage=None):
            c = {"id": job.rid, "object": obj, "created": t_created, "model": name,
                 "system_fingerprint": fingerprint, "choices": choices}
            if include_usage:
                c["usage"] = usage
            return _sse(c)

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
                yield chunk([], _usage(sum(prompt_toks), sum(gen_toks)))
            yield "data: [DONE]\n\n"

        return stream_response(job, gen())

    return app


class _Gate:
    """Bearer auth (every route but /health) and per-route status counting, as
    a pure ASGI middleware (BaseHTTPMiddleware would get in the way of
    streaming and of disconnect detection)."""

    ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app, metrics, api_key=None):
        self.app = app
        self.metrics = metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in self.ROUTES else (
            "/v1/models/{id}" if path.startswith("/v1/models/") else "other")

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route=route, status=str(message["status"])).inc()
            await send(message)

        if self.expected is not None and path != "/health":
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                from starlette.responses import JSONResponse

                msg = ("Missing API key: pass it as 'Authorization: Bearer KEY'." if not got
                       else "Incorrect API key provided.")
                resp = JSONResponse(APIError(401, msg, code="invalid_api_key").body(),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, counting_send)
        await self.app(scope, receive, counting_send)


def render_chat(tokenizer, messages) -> list[int]:
    """Token ids of `messages` rendered with the model's chat template plus the
    assistant generation prompt."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if isinstance(out, str):
        return list(tokenizer.encode(out, add_special_tokens=False))
    return list(out)
