"""The single-process server: its flags, loading the model and the engine
(`build_from_args`), and uvicorn with the graceful shutdown of docs/server.md
(`serve`). The `bitdlm serve` command (bitdlm/serve_cli.py) composes this with
the Ray Serve launcher (bitdlm/ray.py), which builds the same app per replica."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time

from .http import HEADER_TIMEOUT_S

log = logging.getLogger("bitdlm.server")

SHUTDOWN_TIMEOUT_S = 10.0  # --shutdown-timeout default
MODEL_WATCH_S = 0.5        # how often the served model file is checked for in-place changes
MODEL_CHANGED_EXIT = 3     # exit status when it was
FLUSH_TIMEOUT_S = 5.0      # after that, time for the final 503s / [DONE]s to reach clients



class UsageError(ValueError):
    """A bad `bitdlm serve` flag value (the message names the flag)."""


def add_serve_args(p: argparse.ArgumentParser, old_spellings: bool = False) -> None:
    """The flags of `bitdlm serve` (shared with scripts/serve_dlm_native.py, which
    passes old_spellings: the users' old servers' `--model-path`, `-m`, `-p`, `-h`
    (host), `--max-sequences` as aliases; its parser then has no -h for help)."""
    from .._cpu import MAX_THREADS, default_threads, threads_arg
    from .config import MAX_BODY_BYTES

    def old(*names):
        return names if old_spellings else ()

    p.add_argument("--model", *old("--model-path", "-m"), default=None, metavar="M.bin",
                   help="model .bin file (default: $BITDLM_MODEL, else the packaged default model)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="Hugging Face tokenizer folder (tokenizer.json, optionally "
                        "tokenizer_config.json / special_tokens_map.json) used instead of the "
                        "tokenizer stored in the model, after a check that it fits the model's "
                        "vocabulary and special tokens (default: the model's own)")
    p.add_argument("--host", *old("-h"), default="127.0.0.1",
                   help="bind address: 127.0.0.1 accepts clients of this machine only; 0.0.0.0 accepts "
                        "remote ones (then set --api-key) (default: 127.0.0.1)")
    p.add_argument("--port", *old("-p"), type=int, default=8000, help="TCP port, 1-65535 (default: %(default)s)")
    p.add_argument("--threads", type=threads_arg, default=None,
                   help=f"OpenMP threads of every forward, at most {MAX_THREADS}, applied on the "
                        "engine thread that runs them (default: $OMP_NUM_THREADS, else the physical cores: "
                        f"{default_threads()} here)")
    p.add_argument("--block-size", type=int, default=None,
                   help="diffusion block size, 1 = autoregressive (default: the model's)")
    p.add_argument("--small-block-size", type=int, default=None,
                   help="default sub-block size of a request (default: the model's)")
    p.add_argument("--threshold", type=float, default=None,
                   help="default unmasking confidence threshold of a request, in (0, 1] "
                        "(default: the model's)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="default decoding rule of a request that names none: LLaDA's fixed rate, N "
                        "steps per block (generation_algorithm \"steps\"); unset: the threshold rule "
                        "(default: %(default)s)")
    for name, what in (("repetition-penalty", "> 0; 1 = off"), ("presence-penalty", "in [-2, 2]; 0 = off"),
                       ("frequency-penalty", "in [-2, 2]; 0 = off")):
        p.add_argument(f"--{name}", type=float, default=None, metavar="X",
                       help=f"default {name.replace('-', '_')} of a request that sets none ({what}; "
                            "docs/server.md \"Sampling penalties\") (default: off)")
    p.add_argument("--decode-policy", choices=["fixed", "adaptive"], default="fixed",
                   help="fixed: a request decodes as its parameters say; adaptive (opt-in): a request "
                        "that sets none of block_length, small_block_size, generation_algorithm, "
                        "steps is assigned AR or diffusion by the load, from forward costs timed at "
                        "start-up, which may change its output; the x-bitdlm-decode-mode response "
                        "header says which (default: %(default)s)")
    p.add_argument("--max-batch", *old("--max-sequences"), type=int, default=16,
                   help="requests stepped together by the engine (default: 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests accepted beyond --max-batch; more get 429 (default: 64)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="limit on prompt + max_tokens (default: the model's "
                        "max_position_embeddings)")
    p.add_argument("--kv-budget-gb", type=float, default=None,
                   help="KV cache memory budget in GiB (default: a quarter of the RAM)")
    p.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / (1 << 20),
                   help="largest request body in MiB, counted as it arrives (chunked uploads "
                        f"too); more gets 413 (default: {MAX_BODY_BYTES >> 20})")
    p.add_argument("--api-key", default=os.environ.get("BITDLM_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every route but /health "
                        "(default: $BITDLM_API_KEY, else no key)")
    p.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                   help="a model id clients may pass; repeat it for more ids (the first one is the id "
                        "answers carry) (default: the file name without extension)")
    p.add_argument("--default-max-tokens", type=int, default=None, metavar="N",
                   help="max_tokens of a request that sets none; unset: OpenAI's defaults, 16 for "
                        "/v1/completions and the rest of the context for /v1/chat/completions, and 128 "
                        "for /generate, as the users' old server (default: %(default)s)")
    p.add_argument("--mask-token-id", type=int, default=None, metavar="ID",
                   help="the diffusion mask token, instead of the one stored in the model "
                        "(default: the model's)")
    p.add_argument("--health-status", choices=["ok", "healthy"], default="ok",
                   help="the \"status\" /health answers (\"healthy\": what the users' old server "
                        "answered) (default: %(default)s)")
    p.add_argument("--shutdown-timeout", type=float, default=SHUTDOWN_TIMEOUT_S,
                   help="on SIGTERM/SIGINT, seconds in-flight requests may still run before they "
                        "are ended with a 503; new requests get 503 meanwhile "
                        f"(default: {SHUTDOWN_TIMEOUT_S:g})")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking every tensor's crc32 and that float tensors are finite "
                        "at start (the check reads the whole file: ~1 s per GB here; default: "
                        "checked)")
    p.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT_S,
                   help="seconds a client may take to send a request's head, and a request body "
                        "between two reads; then the connection is closed (slowloris; "
                        f"default: {HEADER_TIMEOUT_S:g})")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="server and uvicorn logging (default: info)")
    p.add_argument("--profile", action="store_true",
                   help="time every forward phase and export it on /metrics as "
                        "bitdlm_forward_phase_seconds_total{phase=...}, and the parallel regions as "
                        "bitdlm_parallel_region_seconds_total{kind=...,part=...} (also BITDLM_PROFILE=1; "
                        "default: off)")


def fail(msg: str):
    """A setup error: one line on stderr, exit status 2, no traceback."""
    print(f"bitdlm serve: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def check_args(args) -> None:
    """The checks of the server flags that need no model; raises UsageError. Called by
    build_from_args, and by the Ray driver before Ray starts."""
    if args.max_batch < 1:
        raise UsageError("--max-batch must be >= 1")
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be in [1, 65535], got {args.port}")
    if args.max_queue < 0:
        raise UsageError("--max-queue must be >= 0")
    for name in ("threads", "block_size", "small_block_size", "max_model_len", "steps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.threshold is not None and not 0.0 < args.threshold <= 1.0:
        raise UsageError("--threshold must be in (0, 1]")
    if not args.shutdown_timeout >= 0:
        raise UsageError("--shutdown-timeout must be >= 0")
    if not args.max_body_mb > 0:
        raise UsageError("--max-body-mb must be > 0")
    if args.default_max_tokens is not None and args.default_max_tokens < 1:
        raise UsageError("--default-max-tokens must be >= 1")
    if args.mask_token_id is not None and args.mask_token_id < 0:
        raise UsageError("--mask-token-id must be >= 0")
    if not 0 < getattr(args, "header_timeout", HEADER_TIMEOUT_S) < float("inf"):
        raise UsageError("--header-timeout must be > 0")


def listen(host: str, port: int):
    """The listening socket, bound before the model loads: a port in use is a
    setup error (one line, exit 2, as docs/server.md says) found at once."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        fail(f"cannot listen on {host}:{port}: {e.strerror or e}")
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        fail(f"cannot listen on {host}:{port}: {e.strerror or e}")
    sock.set_inheritable(True)
    return sock


def _resolve_model_path(path):
    if path:
        return path
    from ..model import default_model_path

    path = default_model_path()  # $BITDLM_MODEL, else the packaged model, else None
    if not path:
        fail("no --model given and no packaged default model found")
    return str(path)


def load_tokenizer(model, tokenizer_dir=None):
    """The tokenizer to serve with: `tokenizer_dir` checked against the model,
    else the model's own. Raises ValueError (TokenizerMismatchError) / None."""
    from ..tokenizer import Tokenizer, model_tokenizer

    embedded = model_tokenizer(model)
    if tokenizer_dir is None:
        return embedded
    return Tokenizer.from_dir(tokenizer_dir, model.meta, embedded=embedded)


def build_from_args(args):
    """Load the model and the engine described by the flags -> (app, config)."""
    from .app import create_app
    from .config import ServerConfig

    try:
        check_args(args)
    except UsageError as e:
        fail(str(e))
    path = _resolve_model_path(args.model)
    from ..engine import Engine
    from ..model import load

    try:
        model = load(path, threads=args.threads, kv_budget_gb=args.kv_budget_gb,
                     verify=getattr(args, "verify", True))
    except (OSError, ValueError) as e:  # missing file, bad format (ModelFormatError)
        fail(f"cannot load {path}: {e}")
    if getattr(args, "profile", False):
        model.set_profile(True)
    meta = model.meta
    max_pos = int(meta["max_position_embeddings"])
    if args.max_model_len is not None and args.max_model_len > max_pos:
        fail(f"--max-model-len {args.max_model_len} exceeds the model's "
             f"max_position_embeddings {max_pos}")
    try:
        tok = load_tokenizer(model, getattr(args, "tokenizer", None))
    except ValueError as e:
        fail(f"--tokenizer {args.tokenizer}: {e}")
    if tok is None:
        fail("the model file has no tokenizer (pass --tokenizer DIR)")
    if args.mask_token_id is not None and args.mask_token_id != meta.get("mask_token_id"):
        if args.mask_token_id >= int(meta["vocab_size"]):
            fail(f"--mask-token-id {args.mask_token_id} is outside the vocabulary [0, {meta['vocab_size']})")
        log.warning("--mask-token-id %d replaces the model's mask token %s", args.mask_token_id,
                    meta.get("mask_token_id"))
        meta["mask_token_id"] = args.mask_token_id  # this process only: the engine reads it from meta
    try:
        engine = Engine(model, max_batch=args.max_batch, block_size=args.block_size,
                        tokenizer=tok, decode_policy=getattr(args, "decode_policy", "fixed"))
    except ValueError as e:
        fail(str(e))
    defaults = {}
    if args.threshold is not None:
        defaults["threshold"] = args.threshold
    if args.small_block_size is not None:
        defaults["small_block_size"] = args.small_block_size
    if getattr(args, "steps", None) is not None:
        from .. import decoding

        try:  # a default every request would fail with is a setup error
            decoding.make("steps", steps=args.steps).configure(
                engine.block_size, args.small_block_size or engine.default_sbs)
        except ValueError as e:
            fail(f"--steps {args.steps}: {e}")
        defaults.update(generation_algorithm="steps", steps=args.steps)
    pen = {k: getattr(args, k, None) for k in ("repetition_penalty", "presence_penalty", "frequency_penalty")}
    pen = {k: v for k, v in pen.items() if v is not None}
    if pen:
        from ..sampling_params import SamplingParamError, SamplingParams

        try:  # a default every request would fail with is a setup error
            SamplingParams(**pen).validate()
        except SamplingParamError as e:
            fail(f"--{e.param.replace('_', '-')}: {e}")
        defaults.update(pen)
    names = list(args.served_model_name or [os.path.splitext(os.path.basename(path))[0]])
    names += [n for n in getattr(args, "model_aliases", ()) if n not in names]
    config = ServerConfig(
        served_model_name=names[0],
        aliases=tuple(names[1:]),
        default_max_tokens=args.default_max_tokens,
        health_status=args.health_status,
        max_model_len=args.max_model_len or max_pos,
        vocab_size=int(meta["vocab_size"]),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        api_key=args.api_key,
        default_params=defaults,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
    )
    return create_app(engine, tok, config, model=model), config


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn with our shutdown: the first SIGTERM/SIGINT/SIGHUP refuses new
        requests (503) while in-flight ones run for up to `shutdown_timeout`
        seconds; then what is left is ended with the documented 503 (JSON, or
        an SSE error event + [DONE]) and the process exits 0. A second signal
        exits at once."""

        def __init__(self, config, engine_loop, shutdown_timeout, model_file=None):
            super().__init__(config)
            self.engine_loop = engine_loop
            self.shutdown_timeout = shutdown_timeout
            self.model_file = model_file
            self.exit_code = 0
            self._aloop = None
            self._draining = False

        async def startup(self, sockets=None):
            self._aloop = asyncio.get_running_loop()
            # SIGHUP (the terminal closed, or `kill -HUP` meant as "reload") drains like
            # SIGTERM: its default action killed the process with streams cut mid-way
            if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGHUP, self.handle_exit)
            await super().startup(sockets)
            if self.model_file is not None and getattr(self.model_file, "_file", None) is not None:
                asyncio.ensure_future(self._watch_model(self.model_file))

        async def _watch_model(self, mf):
            """The mapped model file rewritten in place (cp over it, truncate):
            the weights in memory are no longer the ones checked at start, and
            a read past a truncated end is SIGBUS. Stop: in-flight requests end
            with the 503 error, exit status 3. (A file replaced by rename, `mv`,
            is another inode: the old one stays mapped and served.)"""
            fd = mf._file.fileno()
            first = os.fstat(fd)
            while not self._draining:
                await asyncio.sleep(MODEL_WATCH_S)
                st = os.fstat(fd)
                if (st.st_size, st.st_mtime_ns) != (first.st_size, first.st_mtime_ns):
                    log.error("the model file %s was modified in place while being served (%d -> "
                              "%d bytes): stopping; restart to load the new weights, and replace "
                              "model files with mv, never by writing over them", mf.path,
                              first.st_size, st.st_size)
                    self.exit_code = MODEL_CHANGED_EXIT
                    self.shutdown_timeout = 0.0
                    self.handle_exit(None, None)
                    return

        def handle_exit(self, sig, frame):  # a signal handler: only flags and a callback
            if self._draining or self._aloop is None:
                self.should_exit = True
                if self._draining:
                    self.force_exit = True
                return
            self._draining = True
            self.engine_loop.drain()
            self._aloop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

        async def _drain(self):
            n = self.engine_loop.inflight
            log.info("shutting down: %d request(s) in flight, waiting up to %gs", n,
                     self.shutdown_timeout)
            deadline = time.monotonic() + self.shutdown_timeout
            while self.engine_loop.inflight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.engine_loop.inflight:
                log.warning("shutdown timeout: ending %d request(s) with 503",
                            self.engine_loop.inflight)
            await asyncio.to_thread(self.engine_loop.stop)
            self.should_exit = True

    return Server


def serve(args) -> int:
    """Run the single-process server until SIGTERM/SIGINT/SIGHUP (then the graceful
    shutdown); the exit status."""
    try:
        check_args(args)
    except UsageError as e:
        fail(str(e))
    sock = listen(args.host, args.port)
    app, config = build_from_args(args)
    import uvicorn

    from .http import protocol_class, raise_open_files_limit

    log.info("serving %s on http://%s:%d (max batch %d, max queue %d, max len %d, %s threads)",
             config.served_model_name, args.host, args.port, config.max_batch,
             config.max_queue, config.max_model_len, app.state.engine_loop.model.threads
             if getattr(app.state.engine_loop.model, "threads", None) else "?")
    if args.host in ("127.0.0.1", "localhost", "::1"):
        log.info("only clients on this machine can connect; to accept remote clients pass "
                 "--host 0.0.0.0 (and --api-key KEY)")
    ucfg = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                          timeout_graceful_shutdown=FLUSH_TIMEOUT_S,
                          http=protocol_class(args.header_timeout))
    raise_open_files_limit()
    server = _server_class()(ucfg, app.state.engine_loop, args.shutdown_timeout,
                             getattr(app.state.engine_loop.model, "file", None))
    server.run(sockets=[sock])
    return server.exit_code if server.started else 1
