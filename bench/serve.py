#!/usr/bin/env python3
"""Load test of `bitdlm serve`: N streaming requests from C concurrent clients
against one or several servers on this machine (loopback only), bounded in
count and time.

Reports requests/s, generated tokens/s, time to first token and request latency
(mean, p50, p90, p99), overall and per endpoint, and each server's tokens per
forward pass, as JSON. With several endpoints (--url repeated, or --replicas)
every request goes to the next endpoint in turn: a client-side round robin
standing in for a load balancer (Ray Serve's proxy in production, see
docs/scaling.md).

    # against a running server (or several: --url A --url B)
    python bench/serve.py --url http://127.0.0.1:8000 -n 64 -c 16 --max-tokens 64
    # or start one (killed at the end); --server-arg passes flags through
    python bench/serve.py --model tiny.bin -n 32 -c 8 --server-arg=--threads=2 --out serve.json
    # or R replicas of T threads each, pinned to disjoint cores (taskset -c), what one
    # Ray replica per NUMA-free slice of a machine runs
    python bench/serve.py --model m.bin --replicas 4 --threads 4 --pin -n 64 -c 16
"""
import argparse
import asyncio
import collections
import functools
import itertools
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_REQUESTS = 10_000

DEFAULT_PROMPT = ("Write a short story about a robot who learns to paint, "
                  "in three sentences.")


def percentile(xs, q):
    """Linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return None
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(xs):
    if not xs:
        return None
    return {"mean": sum(xs) / len(xs), "p50": percentile(xs, 0.5), "p90": percentile(xs, 0.9),
            "p99": percentile(xs, 0.99), "min": min(xs), "max": max(xs)}


async def one_request(client, url, body, headers, deadline):
    """Stream one request; returns dict(ttft, latency, tokens, error)."""
    t0 = time.perf_counter()
    ttft = None
    tokens = None
    try:
        timeout = max(0.1, deadline - time.monotonic())
        async with client.stream("POST", url, json=body, headers=headers,
                                 timeout=timeout) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                return {"error": f"HTTP {r.status_code}: {text[:200]}"}
            mode = r.headers.get("x-bitdlm-decode-mode")  # ar | diffusion (--decode-policy)
            async for line in r.aiter_lines():
                if time.monotonic() > deadline:
                    return {"error": "deadline"}
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                ev = json.loads(data)
                if "error" in ev:
                    return {"error": ev["error"].get("message")}
                for ch in ev.get("choices", []):
                    piece = ch.get("text") if "text" in ch else ch.get("delta", {}).get("content")
                    if piece and ttft is None:
                        ttft = time.perf_counter() - t0
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
    except Exception as e:  # connection errors, timeouts: counted, not fatal
        return {"error": f"{type(e).__name__}: {e}"}
    return {"ttft": ttft, "latency": time.perf_counter() - t0, "tokens": tokens or 0, "mode": mode}


def request_body(args):
    chat = args.chat
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    body = {"model": args.served_model_name, "max_tokens": args.max_tokens,
            "temperature": args.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.served_model_name is None:
        del body["model"]
    if chat:
        body["messages"] = [{"role": "user", "content": args.prompt}]
    elif args.prompt_ids:
        # token ids (4.. skips the specials): the same work on any tokenizer, e.g.
        # the word-level one of bench/make_synthetic_model.py
        body["prompt"] = [4 + (i * 37) % 997 for i in range(args.prompt_ids)]
    else:
        body["prompt"] = args.prompt
    for k in ("threshold", "small_block_size"):
        if getattr(args, k) is not None:
            body[k] = getattr(args, k)
    if args.ignore_eos:
        body["ignore_eos"] = True
    body.update(getattr(args, "extra_body", None) or {})  # e.g. the decoding rule (bench/e2e.py)
    return body


def stats(results, wall):
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    toks = sum(r["tokens"] for r in ok)
    return {
        "num_requests": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "first_errors": errors[:5],
        "requests_per_s": len(ok) / wall if wall else None,
        "tokens_per_s": toks / wall if wall else None,
        "completion_tokens": toks,
        "ttft_s": summary([r["ttft"] for r in ok if r["ttft"] is not None]),
        "latency_s": summary([r["latency"] for r in ok]),
        "decode_modes": dict(collections.Counter(r["mode"] for r in ok if r.get("mode"))),
    }


def parse_metrics(text: str) -> dict:
    """Every bitdlm_* sample of a /metrics text: {'name{labels}': value}."""
    out = {}
    for line in text.splitlines():
        if line.startswith("bitdlm_"):
            key, _, val = line.rpartition(" ")
            try:
                out[key] = float(val)
            except ValueError:
                pass
    return out


async def server_metrics(client, base, headers):
    try:
        r = await client.get(base + "/metrics", headers=headers, timeout=10)
        samples = parse_metrics(r.text)
    except Exception:
        return {}
    return {name: samples[name] for name in ("bitdlm_tokens_per_forward", "bitdlm_engine_steps_total")
            if name in samples}


async def run_load(bases, args):
    """The load over `bases` (one URL each) in round robin; stats overall and per endpoint."""
    import httpx

    path = "/v1/chat/completions" if args.chat else "/v1/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    body = request_body(args)
    deadline = time.monotonic() + args.time_limit
    todo = iter(range(args.num_requests))
    turn = itertools.cycle(range(len(bases)))
    results = [[] for _ in bases]
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
        async def worker():
            for _ in todo:
                if time.monotonic() > deadline:
                    return
                i = next(turn)
                results[i].append(await one_request(client, bases[i] + path, body, headers,
                                                    deadline))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - t0
        metrics = [await server_metrics(client, b, headers) for b in bases]

    res = {"label": args.label, "urls": [b + path for b in bases], "endpoints": len(bases),
           "concurrency": args.concurrency, "max_tokens": args.max_tokens, "wall_s": wall}
    res.update(stats([r for rs in results for r in rs], wall))
    res["per_endpoint"] = [dict(url=b + path, server_metrics=m, **stats(rs, wall))
                           for b, m, rs in zip(bases, metrics, results)]
    if len(bases) == 1:
        res["server_metrics"] = metrics[0]
    return res


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def core_slices(replicas, threads):
    """Disjoint core lists, one per replica: `threads` consecutive CPUs this
    process may use (the first replicas * threads of them)."""
    cpus = sorted(os.sched_getaffinity(0))
    if replicas * threads > len(cpus):
        raise SystemExit(f"--replicas {replicas} x --threads {threads} needs "
                         f"{replicas * threads} cores, this process may use {len(cpus)}")
    return [cpus[i * threads:(i + 1) * threads] for i in range(replicas)]


def bitdlm_src() -> str:
    """The folder holding the bitdlm this process would import (an installed one
    before the checkout's python/), for the PYTHONPATH of child processes."""
    spec = importlib.util.find_spec("bitdlm")
    if spec and spec.origin:
        return os.path.dirname(os.path.dirname(spec.origin))
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")


def start_servers(args):
    """args.replicas servers on free ports (each pinned to its own cores with
    --pin); returns (procs, bases) once all are healthy."""
    import httpx

    slices = core_slices(args.replicas, args.threads) if args.pin else [None] * args.replicas
    env = dict(os.environ)
    env["PYTHONPATH"] = bitdlm_src() + os.pathsep + env.get("PYTHONPATH", "")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    # each server gets the whole load's batch: it may receive every request at once
    # when the round robin and the request lengths line up
    max_batch = args.max_batch or args.concurrency
    procs, bases = [], []
    try:
        for cores in slices:
            port = free_port()
            cmd = [sys.executable, "-m", "bitdlm.cli", "serve", "--model", args.model,
                   "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                   "--max-batch", str(max_batch)] + list(args.server_arg)
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            kw = {}
            if cores is not None:
                if shutil.which("taskset"):
                    cmd = ["taskset", "-c", ",".join(map(str, cores))] + cmd
                else:  # what taskset does, on a machine without util-linux
                    kw["preexec_fn"] = functools.partial(os.sched_setaffinity, 0, set(cores))
            procs.append(subprocess.Popen(cmd, env=env, **kw))
            bases.append(f"http://127.0.0.1:{port}")
        t_end = time.monotonic() + args.start_timeout
        pending = list(zip(procs, bases))
        while pending and time.monotonic() < t_end:
            for proc, base in list(pending):
                if proc.poll() is not None:
                    raise SystemExit(f"server {base} exited with code {proc.returncode}")
                try:
                    if httpx.get(base + "/health", timeout=1, trust_env=False).status_code == 200:
                        pending.remove((proc, base))
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        if pending:
            raise SystemExit(f"{len(pending)} server(s) not healthy in {args.start_timeout:.0f} s")
    except BaseException:
        stop_servers(procs)
        raise
    return procs, bases, slices


def stop_servers(procs):
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", action="append", default=None,
                   help="running server (loopback); repeat it to spread the load over several "
                        "(default http://127.0.0.1:8000)")
    p.add_argument("--model", help="start server(s) on this model instead of using --url")
    p.add_argument("--replicas", type=int, default=1, help="servers started with --model")
    p.add_argument("--threads", type=int, default=None,
                   help="--threads of each started server (default: the server's)")
    p.add_argument("--pin", action="store_true",
                   help="pin started server i to cores [i*threads, (i+1)*threads) (taskset -c)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="--max-batch of each started server (default: -c)")
    p.add_argument("--start-timeout", type=float, default=180.0,
                   help="seconds for the started servers to become healthy")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra flag for the started server (repeatable)")
    p.add_argument("-n", "--num-requests", type=int, default=32)
    p.add_argument("-c", "--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--prompt-ids", type=int, default=None,
                   help="send N token ids as the prompt instead of --prompt (completions)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate --max-tokens every time (same work per request)")
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--small-block-size", type=int, default=None)
    p.add_argument("--extra-body", type=json.loads, default=None,
                   help='JSON object merged into every request body, e.g. \'{"block_length": 1}\'')
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--api-key", default=os.environ.get("BITDLM_API_KEY"))
    p.add_argument("--time-limit", type=float, default=600.0, help="stop after this many s")
    p.add_argument("--label", default="", help="free text stored in the JSON (e.g. 'noisy')")
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args(argv)
    if not 1 <= args.num_requests <= MAX_REQUESTS:
        p.error(f"--num-requests must be in [1, {MAX_REQUESTS}]")
    if not 1 <= args.concurrency <= 1024:
        p.error("--concurrency must be in [1, 1024]")
    urls = args.url or ["http://127.0.0.1:8000"]
    for url in urls:
        if urlparse(url).hostname not in LOOPBACK:
            p.error("--url must point at this machine (127.0.0.1, localhost or ::1)")
    if args.replicas < 1 or (args.threads is not None and args.threads < 1):
        p.error("--replicas and --threads must be >= 1")
    if args.pin and not (args.model and args.threads):
        p.error("--pin needs --model and --threads")
    if args.chat and args.prompt_ids:
        p.error("--prompt-ids is for completions, not --chat")

    procs, slices = [], None
    bases = [u.rstrip("/") for u in urls]
    if args.model:
        procs, bases, slices = start_servers(args)
    try:
        res = asyncio.run(run_load(bases, args))
    finally:
        stop_servers(procs)
    if args.model:
        res.update(replicas=args.replicas, threads_per_replica=args.threads,
                   cores=slices if args.pin else None)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if res["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
