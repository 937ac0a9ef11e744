"""bitdlm replicas on Ray Serve: `bitdlm serve --replicas N` and `bitdlm.ray:app`.

Each replica is a Ray actor that builds the single-process server's app
(`bitdlm.server.cli.build_from_args` -> `create_app`: the same routes, SSE, API key
and errors) around its own engine on `threads` cores, and hands it to Ray Serve
through `@serve.ingress()` with a late-bound app (`__serve_build_asgi_app__`),
so the app is built inside the replica and never pickled. Ray's HTTP proxy
spreads requests over the replicas and the controller restarts dead ones. See
docs/scaling.md.

Ray is an optional extra (`pip install ".[ray]"` from the checkout): this module is imported
by the CLI for every `bitdlm serve` (bitdlm/serve_cli.py composes it with the
server), so `ray` is imported only inside the functions that deploy (and, being
absolute, `import ray` here is the package, not this module).
"""
from __future__ import annotations

import argparse
import inspect
import logging
import os
import signal
import threading

from .server.cli import UsageError, add_serve_args, build_from_args, check_args

log = logging.getLogger("bitdlm.ray")

APP_NAME = "bitdlm"
# Flags of this module; every other `bitdlm serve` flag is the replicas' (passed on as is).
_RAY_DESTS = ("replicas", "ray_address", "min_replicas", "max_replicas",
              "target_ongoing_requests", "ray_object_store_mb")
# Headers every replica adds to its responses: which replica answered, and its
# process id (what a test kills, what an operator greps for in `ps`).
REPLICA_HEADER = "x-bitdlm-replica"
PID_HEADER = "x-bitdlm-pid"


# --------------------------------------------------------------------- CLI


def add_ray_args(p: argparse.ArgumentParser) -> None:
    """The Ray flags of `bitdlm serve` (none of them given: the single-process server)."""
    g = p.add_argument_group("scale out with Ray Serve (needs Ray: `pip install \".[ray]\"` in the "
                             "bitdlm checkout)")
    g.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="serve N replicas behind Ray Serve's HTTP proxy on --host/--port, each "
                        "its own engine on --threads cores (default: none, the single-process server; --threads then defaults to cores / N)")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (e.g. `auto`, `ray://head:10001`); bitdlm must "
                        "be installed on every node (default: start a local Ray instance)")
    g.add_argument("--min-replicas", type=int, default=None, metavar="N",
                   help="autoscale between --min-replicas and --max-replicas (default: no "
                        "autoscaling, a fixed --replicas)")
    g.add_argument("--max-replicas", type=int, default=None, metavar="N",
                   help="upper bound of the autoscaled replicas (default: no autoscaling)")
    g.add_argument("--target-ongoing-requests", type=float, default=None, metavar="R",
                   help="autoscaling target of requests per replica (default: --max-batch)")
    g.add_argument("--ray-object-store-mb", type=int, default=None, metavar="MB",
                   help="object store of the local Ray instance (default: Ray's, 30%% of RAM; "
                        "requests and responses are small, 100 is plenty)")


def wants_ray(args) -> bool:
    return any(getattr(args, k, None) is not None
               for k in ("replicas", "min_replicas", "max_replicas", "ray_address"))


def serve_with_ray(args) -> int | None:
    """Run `bitdlm serve` on Ray Serve when a Ray flag asks for it, until
    SIGINT/SIGTERM; None when no Ray flag is given (the caller serves alone)."""
    if not wants_ray(args):
        for k in ("target_ongoing_requests", "ray_object_store_mb"):
            if getattr(args, k, None) is not None:
                raise SystemExit(f"bitdlm serve: --{k.replace('_', '-')} is for Ray Serve; "
                                 "give --replicas N (or --min/--max-replicas) too")
        return None
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    application = _application(args)  # checks the flags and that Ray is installed
    import ray
    from ray import serve

    local = args.ray_address is None
    if local:
        # our private instance: token auth as Ray's default, said explicitly (else
        # Ray warns about it at every start); an operator's RAY_AUTH_MODE wins
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    else:
        log.info("joining the Ray cluster at %s", args.ray_address)
        _check_reachable(args.ray_address)
    init = {"address": args.ray_address or "local", "log_to_driver": True,
            "logging_level": logging.WARNING}
    if local:
        # a private instance: no dashboard (one more process on every node); bitdlm
        # importable by its workers through the inherited PYTHONPATH / install
        init["include_dashboard"] = False
        if args.ray_object_store_mb is not None:
            init["object_store_memory"] = args.ray_object_store_mb << 20
    # A signal during start-up must not leave half a Ray instance behind: it only
    # asks for the shutdown that follows the start. Set again after ray.init, whose
    # core worker installs a crash handler that aborts the driver on SIGTERM.
    stop = threading.Event()

    def on_signals():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())

    on_signals()
    try:
        try:
            ray.init(**init)
        except Exception as e:  # refused driver, version mismatch, auth: one line, not 40
            msg = str(e).strip().splitlines()
            raise SystemExit(f"bitdlm serve: cannot {'start' if local else 'join'} Ray "
                             f"{'' if local else 'at ' + args.ray_address + ' '}"
                             f"({type(e).__name__}): {msg[0] if msg else ''}") from None
        on_signals()
        if local:  # replicas that cannot be placed would leave serve.run waiting forever
            cpus = ray.cluster_resources().get("CPU", 0)
            n, t = _initial_replicas(args), _threads(args)
            if n * t > cpus:
                raise SystemExit(f"bitdlm serve: {n} replicas x {t} threads need {n * t} "
                                 f"CPUs, this machine has {cpus:g}; lower --replicas or "
                                 "--threads")
        serve.start(http_options={"host": args.host, "port": args.port},
                    logging_config=_serve_logging(args))
        serve.run(application, name=APP_NAME, route_prefix="/")
        log.info("serving %s on http://%s:%d with Ray Serve (%s replicas x %d threads)",
                    _served_name(args), args.host, args.port, _replica_desc(args),
                    _threads(args))
        stop.wait()
        log.info("shutting down")
    finally:
        try:
            if not ray.is_initialized():
                pass
            elif local:
                serve.shutdown()
            else:  # leave the cluster's Serve instance to its other applications
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()
    return 0


# How long the driver waits for a TCP answer from --ray-address before giving up
# (ray.init itself retried silently for ~200 s where nothing listens).
CONNECT_TIMEOUT_S = 10.0


def _check_reachable(address: str) -> None:
    """SystemExit with one line when nothing answers at a host:port address
    (`auto` and `local` are left to ray.init, which fails fast for them)."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    if address in ("auto", "local") or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except (OSError, ValueError) as e:
        raise SystemExit(f"bitdlm serve: cannot join Ray at {address}: nothing answers there "
                         f"within {CONNECT_TIMEOUT_S:g} s ({getattr(e, 'strerror', None) or e})") from None


def _served_name(args):
    return (args.served_model_name or [None])[0] or (
        os.path.splitext(os.path.basename(args.model))[0] if args.model else "default model")


def _replica_desc(args):
    if args.min_replicas is None and args.max_replicas is None:
        return str(args.replicas)
    return f"{args.min_replicas}..{args.max_replicas} (autoscaled)"


# ------------------------------------------------------------ application


class _OptionError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a ValueError for app(), not a process exit
        raise _OptionError(message)


def _option_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bitdlm.ray.app", add_help=False)
    add_serve_args(p)
    add_ray_args(p)
    return p


def _options(opts: dict) -> argparse.Namespace:
    """`bitdlm serve` options from keyword arguments or `serve run ... key=value`
    strings, converted and checked by the CLI's own parser."""
    p = _option_parser()
    flags = {a.dest: a for a in p._actions}  # noqa: SLF001
    argv = []
    for key, value in opts.items():
        dest = str(key).replace("-", "_")
        if dest not in flags:
            raise _OptionError(f"unknown option {key!r} (the options are those of "
                               f"`bitdlm serve`: {', '.join(sorted(flags))})")
        if value is None:
            continue
        flag = flags[dest].option_strings[-1]
        if flags[dest].nargs == 0:  # store_true
            if str(value).lower() in ("1", "true", "yes", "on"):
                argv.append(flag)
            elif str(value).lower() not in ("0", "false", "no", "off"):
                raise _OptionError(f"option {key!r} takes true or false, not {value!r}")
        else:
            argv += [flag, str(value)]
    return p.parse_args(argv)


def _check(args) -> None:
    """What the driver can check before Ray starts (a bad flag must not become a
    replica failing to start, retried by the controller)."""
    try:
        check_args(args)  # the server's own flags, as its single-process run checks them
    except UsageError as e:
        raise SystemExit(f"bitdlm serve: {e}") from None
    for name in ("replicas", "min_replicas", "max_replicas"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise SystemExit(f"bitdlm serve: --{name.replace('_', '-')} must be >= 1")
    lo, hi = args.min_replicas, args.max_replicas
    if (lo is None) != (hi is None):
        raise SystemExit("bitdlm serve: give both --min-replicas and --max-replicas")
    if lo is not None and lo > hi:
        raise SystemExit("bitdlm serve: --min-replicas must be <= --max-replicas")
    if args.target_ongoing_requests is not None and args.target_ongoing_requests <= 0:
        raise SystemExit("bitdlm serve: --target-ongoing-requests must be > 0")
    if args.model and args.ray_address is None and not os.path.isfile(args.model):
        raise SystemExit(f"bitdlm serve: cannot load {args.model}: no such file")


def _serve_logging(args) -> dict:
    """--log-level for Serve's own logs too (its per-request access log is INFO)."""
    level = args.log_level.upper()
    return {"log_level": level, "enable_access_log": level in ("INFO", "DEBUG")}


def _initial_replicas(args) -> int:
    if args.min_replicas is None:
        return args.replicas or 1
    return min(max(args.replicas or args.min_replicas, args.min_replicas), args.max_replicas)


def _threads(args) -> int:
    """--threads, else this machine's cores shared by the (most) replicas."""
    n = args.max_replicas or _initial_replicas(args)
    return args.threads or max(1, (os.cpu_count() or 1) // n)


def _application(args):
    """The Serve Application for `bitdlm serve` flags (a Namespace)."""
    _check(args)
    try:
        from ray import serve
    except ImportError:
        raise SystemExit("bitdlm serve --replicas: Ray is not installed "
                         '(pip install ".[ray]" in the bitdlm checkout, or pip install "ray[serve]")')

    autoscale = args.min_replicas is not None
    n = _initial_replicas(args)
    threads = _threads(args)
    replica_opts = {k: v for k, v in vars(args).items()
                    if k not in _RAY_DESTS and k not in ("func", "command")}
    replica_opts["threads"] = threads
    scaling = {"num_replicas": n}
    if autoscale:
        scaling = {"num_replicas": "auto", "autoscaling_config": {
            "min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
            "initial_replicas": n,
            "target_ongoing_requests": args.target_ongoing_requests or args.max_batch}}
    deployment = serve.deployment(
        _replica_class(), name="BitdlmReplica",
        # Ray's accounting gets the replica's cores, so replicas never share one
        ray_actor_options={"num_cpus": threads},
        # the replica's own batch and queue (and its 429 beyond them) decide, not
        # Ray's default of 5 requests per replica
        max_ongoing_requests=args.max_batch + args.max_queue,
        health_check_period_s=2, health_check_timeout_s=30,
        logging_config=_serve_logging(args),
        **scaling)
    return deployment.bind(replica_opts)


def app(args: dict | None = None, /, **kwargs):
    """A Ray Serve Application of bitdlm replicas.

    Options are those of `bitdlm serve` (`model`, `threads`, `replicas`,
    `max_batch`, `api_key`, `min_replicas`/`max_replicas`, ...), as keywords
    from Python (`serve.run(bitdlm.ray.app(model="m.bin", threads=4, replicas=2))`)
    or as the one dict Ray passes to an application builder
    (`serve run bitdlm.ray:app model=m.bin threads=4 replicas=2`)."""
    opts = dict(args or {})
    opts.update(kwargs)
    try:
        return _application(_options(opts))
    except SystemExit as e:  # the CLI's checks: an exception for a library call
        raise ValueError(str(e)) from None


# Ray's `serve run module:builder k=v` calls a builder with exactly one parameter
# (the dict of k=v); advertise that signature, keep the keywords for Python callers.
app.__signature__ = inspect.Signature(
    [inspect.Parameter("args", inspect.Parameter.POSITIONAL_ONLY, annotation=dict)])


# ---------------------------------------------------------------- replica


class _ReplicaHeaders:
    """ASGI middleware: `x-bitdlm-replica` and `x-bitdlm-pid` on every response."""

    def __init__(self, app, replica: str, pid: int):
        self.app = app
        self.headers = [(REPLICA_HEADER.encode(), replica.encode()),
                        (PID_HEADER.encode(), str(pid).encode())]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged_send(message):
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers") or []) + self.headers
            await send(message)

        await self.app(scope, receive, tagged_send)


def _replica_class():
    """The deployment class (defined here, not at import, because it needs ray)."""
    from ray import serve

    @serve.ingress()  # late bound: the app comes from __serve_build_asgi_app__
    class BitdlmReplica:
        def __init__(self, opts: dict):
            try:
                replica = serve.get_replica_context().replica_id.unique_id
            except Exception:  # outside a replica (never in Serve)
                replica = f"pid{os.getpid()}"
            logging.getLogger("bitdlm").setLevel(opts.get("log_level", "info").upper())
            try:
                self._app, self._config = build_from_args(argparse.Namespace(**opts))
            except SystemExit as e:  # a flag the driver could not check (e.g. on a cluster)
                raise RuntimeError(str(e)) from None
            self._app.add_middleware(_ReplicaHeaders, replica=replica, pid=os.getpid())
            self.replica, self.pid = replica, os.getpid()

        def __serve_build_asgi_app__(self):
            return self._app

        def check_health(self):
            # Serve's health check: a dead engine thread gets the replica replaced
            if not self._app.state.engine_loop.alive():
                raise RuntimeError("the bitdlm engine thread is not running")

    return BitdlmReplica
