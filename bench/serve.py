#!/usr/bin/env python3
"""Load test of `bitdlm serve`: N streaming requests from C concurrent clients
against a server on this machine (loopback only), bounded in count and time.

Reports requests/s, generated tokens/s, time to first token and request latency
(mean, p50, p99), and the server's tokens per forward pass, as JSON.

    # against a running server
    python bench/serve.py --url http://127.0.0.1:8000 -n 64 -c 16 --max-tokens 64
    # or start one (killed at the end); --server-arg passes flags through
    python bench/serve.py --model tiny.bin -n 32 -c 8 --server-arg=--threads=2 --out serve.json
"""
import argparse
import asyncio
import json
import os
import re
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
    return {"mean": sum(xs) / len(xs), "p50": percentile(xs, 0.5), "p99": percentile(xs, 0.99),
            "min": min(xs), "max": max(xs)}


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
    return {"ttft": ttft, "latency": time.perf_counter() - t0, "tokens": tokens or 0}


async def run_load(base, args):
    import httpx

    chat = args.chat
    url = base + ("/v1/chat/completions" if chat else "/v1/completions")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    body = {"model": args.served_model_name, "max_tokens": args.max_tokens,
            "temperature": args.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if args.served_model_name is None:
        del body["model"]
    if chat:
        body["messages"] = [{"role": "user", "content": args.prompt}]
    else:
        body["prompt"] = args.prompt
    for k in ("threshold", "small_block_size"):
        if getattr(args, k) is not None:
            body[k] = getattr(args, k)

    deadline = time.monotonic() + args.time_limit
    todo = iter(range(args.num_requests))
    results = []
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
        async def worker():
            for _ in todo:
                if time.monotonic() > deadline:
                    return
                results.append(await one_request(client, url, body, headers, deadline))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - t0
        metrics = {}
        try:
            r = await client.get(base + "/metrics", headers=headers, timeout=10)
            for name in ("bitdlm_tokens_per_forward", "bitdlm_engine_steps_total"):
                m = re.search(rf"^{name} (\S+)$", r.text, re.M)
                if m:
                    metrics[name] = float(m.group(1))
        except Exception:
            pass

    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    toks = sum(r["tokens"] for r in ok)
    return {
        "label": args.label,
        "url": url,
        "num_requests": len(results),
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "completed": len(ok),
        "errors": len(errors),
        "first_errors": errors[:5],
        "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall else None,
        "tokens_per_s": toks / wall if wall else None,
        "completion_tokens": toks,
        "ttft_s": summary([r["ttft"] for r in ok if r["ttft"] is not None]),
        "latency_s": summary([r["latency"] for r in ok]),
        "server_metrics": metrics,
    }


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args):
    port = free_port()
    cmd = [sys.executable, "-m", "bitdlm.cli", "serve", "--model", args.model,
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
           "--max-batch", str(args.concurrency)] + list(args.server_arg)
    env = dict(os.environ)
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python")
    env["PYTHONPATH"] = here + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(cmd, env=env)
    base = f"http://127.0.0.1:{port}"
    import httpx

    t_end = time.monotonic() + 120
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=1, trust_env=False).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become healthy in 120 s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="running server (loopback)")
    p.add_argument("--model", help="start a server on this model instead of using --url")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra flag for the started server (repeatable)")
    p.add_argument("-n", "--num-requests", type=int, default=32)
    p.add_argument("-c", "--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--small-block-size", type=int, default=None)
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
    if urlparse(args.url).hostname not in LOOPBACK:
        p.error("--url must point at this machine (127.0.0.1, localhost or ::1)")

    proc = None
    base = args.url.rstrip("/")
    if args.model:
        proc, base = start_server(args)
    try:
        res = asyncio.run(run_load(base, args))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if res["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
