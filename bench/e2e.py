"""End to end: when does block diffusion beat token-by-token decoding, as a user sees it?

One command, JSON + PNG. On the 2B-shaped synthetic model (bench/make_synthetic_model.py,
random ternary weights, int8 lm_head) it measures, at every thread count of --threads:

  offline   the real `LLM.generate` path, one request: generated tokens/s with LLaDA's
            fixed-rate rule (`steps`: a block of 32 in `steps` deciding forwards and one
            commit, 32 / (steps + 1) tokens per forward) at each of --tpf, with the prefix
            cache and the sub-block cache,
            beside autoregressive decoding (`block_length` 1); per run the forwards, the
            achieved tokens per forward (commit and prefill forwards included), and the
            time per forward spent outside `_core.forward` (the Python side: scheduler,
            numpy, detokenizer); the end-to-end break-even tokens per forward (diffusion
            beats AR above it: where its tokens/s over the measured tokens per forward
            reaches AR's, interpolated);
  server    `bitdlm serve` under --concurrency parallel streaming requests (bench/serve.py),
            AR against the fixed-rate rule at each of --server-tpf, generated tokens/s, and
            `--decode-policy adaptive` with that rule as its default (`--steps`): the policy
            assigns each request AR or the rule by the load (the modes it chose are counted);
            with --server-profile the servers run with --profile and each row also gets its
            loads' engine step (ms) and its forwards' phases and parallel regions (fork + work
            + imbalance + join), from /metrics;
  llama.cpp the same weights as GGUF (TQ2_0, Q8_0 output layer): `llama-bench` tg for one
            stream and `llama-batched-bench` for the parallel streams, both built from the
            trimmed source of bench/llama_trim.py (skipped without --llama-archive);
  (--json X.json also writes X.md: the same figures as Markdown tables for the README)
  spin      AR tokens/s at the largest thread count with bitdlm's bounded OpenMP spin
            (the default) and with libgomp's own (GOMP_SPINCOUNT=300000): what bounding the
            spin costs on an idle machine.

    # the full run (Sapphire Rapids, ~7 min with the builds): bench/device_e2e.sh
    python bench/e2e.py --threads 8,16 --llama-archive bench/out/llama-cpu.tar.gz \\
        --json e2e.json --plot e2e.png
    # seconds, on any machine (a test runs it): tiny model, 1 thread, no llama.cpp
    python bench/e2e.py --tiny --json /tmp/e2e.json --plot /tmp/e2e.png
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.append(os.path.join(ROOT, "python"))  # the checkout, unless PYTHONPATH / an install has bitdlm

BLOCK, SUB = 32, 8
LIBGOMP_SPIN = "300000"  # libgomp's own default spin count (OMP_WAIT_POLICY unset)


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def steps_for(tpf: float, block: int = BLOCK, sub: int = SUB) -> int:
    """Steps per block for `tpf` tokens per forward (at least one per sub-block): a block takes its
    `steps` deciding forwards plus the forward that commits it (with shift that one carries the next
    block's first token), so block / (steps + 1) tokens per forward: steps 15 gives 2.0, where
    steps 16 gave 1.88."""
    return max(-(-block // sub), min(block, round(block / tpf) - 1))


def child_env(threads: int | None = None, **extra) -> dict:
    env = dict(os.environ)
    from serve import bitdlm_src  # bench/serve.py

    env["PYTHONPATH"] = bitdlm_src() + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- model
def make_model(workdir: str, tiny: bool) -> str:
    path = os.path.join(workdir, "synth-tiny-i8.bin" if tiny else "synth2b-i8.bin")
    if not os.path.exists(path):
        cmd = [sys.executable, os.path.join(HERE, "make_synthetic_model.py"), path, "--lm-head", "i8"]
        subprocess.run(cmd + (["--shape", "tiny"] if tiny else []), check=True, env=child_env(),
                       stdout=subprocess.DEVNULL)
    return path


# ----------------------------------------------------------------------------- offline
class TimedCore:
    """Stands in for `Model._core`: times every forward, delegates everything else."""

    def __init__(self, core):
        self._c, self.seconds, self.calls = core, 0.0, 0

    def forward(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return self._c.forward(*a, **kw)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1

    def __getattr__(self, name):
        return getattr(self._c, name)

    def __setattr__(self, name, value):
        if name in ("_c", "seconds", "calls"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._c, name, value)


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(4, vocab - 8, n).tolist()  # no specials, no mask


def offline(model: str, threads: list[int], tpfs: list[float], max_tokens: int, prompt_len: int,
            reps: int) -> list[dict]:
    import bitdlm
    from bitdlm import SamplingParams

    rows = []
    for t in sorted(threads, reverse=True):  # the most threads first: a run cut short keeps them
        m = bitdlm.load(model, threads=t)
        core = m._core = TimedCore(m._core)
        llm = bitdlm.LLM(m)
        prompt = prompt_ids(prompt_len, m.vocab_size)
        base = dict(max_tokens=max_tokens, ignore_eos=True)
        configs = [("ar", "prefix", None, SamplingParams(block_length=1, **base))]
        for cache in ("prefix", "dual"):
            for k in tpfs:
                s = steps_for(k)
                configs.append((f"steps{s}", cache, k, SamplingParams(generation_algorithm="steps", steps=s,
                                                                      cache=cache, **base)))
        llm.generate(prompt, SamplingParams(max_tokens=BLOCK, ignore_eos=True))  # page in the weights
        for mode, cache, k, sp in configs:
            runs = []
            for _ in range(reps):
                core.seconds, core.calls = 0.0, 0
                t0 = time.perf_counter()
                g = llm.generate(prompt, sp)[0]
                wall = time.perf_counter() - t0
                runs.append(dict(wall=wall, core=core.seconds, calls=core.calls, tokens=len(g.token_ids),
                                 forwards=g.stats["forwards"]))
            r = min(runs, key=lambda x: x["wall"])  # the least disturbed repetition
            row = dict(threads=t, mode=mode, cache=cache, tpf_target=k, steps=sp.steps,
                       tokens=r["tokens"], forwards=r["forwards"], tpf=r["tokens"] / r["forwards"],
                       seconds=r["wall"], tok_s=r["tokens"] / r["wall"],
                       ms_per_forward=1e3 * r["wall"] / r["calls"],
                       outside_ms_per_forward=1e3 * (r["wall"] - r["core"]) / r["calls"],
                       outside_share=(r["wall"] - r["core"]) / r["wall"],
                       tok_s_reps=[x["tokens"] / x["wall"] for x in runs])
            rows.append(row)
            print(f"offline {t:>3} thr {mode:>8} {cache:>6}: {row['tok_s']:8.1f} tok/s  tpf {row['tpf']:5.2f}  "
                  f"{row['ms_per_forward']:7.2f} ms/forward, {row['outside_ms_per_forward']:6.3f} ms outside "
                  f"the core", flush=True)
        m.close()
    return rows


def crossing(points: list[tuple[float, float]], level: float) -> tuple[float, str]:
    """The tokens per forward where diffusion's tokens/s (`points`: (tpf, tokens/s)) reaches `level`
    (AR's), linear between the measured points; outside them, the line of the nearest two (or the
    one point's tokens/s per forward held constant): (tpf, "interpolated" | "extrapolated")."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if y0 < level <= y1:
            return x0 + (x1 - x0) * (level - y0) / (y1 - y0), "interpolated"
    if len(pts) >= 2:
        (x0, y0), (x1, y1) = pts[:2] if pts[0][1] >= level else pts[-2:]
        if y1 != y0:
            return x0 + (x1 - x0) * (level - y0) / (y1 - y0), "extrapolated"
    x, y = pts[0]
    return x * level / y, "extrapolated"


def break_even(rows: list[dict]) -> list[dict]:
    """Per thread count and cache: the tokens per forward from which diffusion's end-to-end tokens/s
    reaches AR's (`crossing` over the measured points), and beside it the old cost ratio (median
    seconds per diffusion forward / seconds per AR token; it mixes the forward kinds of every
    point: a block's full passes and commit weigh more at high tokens per forward)."""
    out = []
    for t in sorted({r["threads"] for r in rows}):
        ar = [r for r in rows if r["threads"] == t and r["mode"] == "ar"]
        if not ar:
            continue
        s_tok = ar[0]["seconds"] / ar[0]["tokens"]
        for cache in ("prefix", "dual"):
            d = [r for r in rows if r["threads"] == t and r["cache"] == cache and r["mode"] != "ar"]
            if d:
                s_fwd = med([r["seconds"] / r["forwards"] for r in d])
                best = max(d, key=lambda r: r["tok_s"])
                tpf, how = crossing([(r["tpf"], r["tok_s"]) for r in d], ar[0]["tok_s"])
                out.append(dict(threads=t, cache=cache, ar_tok_s=ar[0]["tok_s"], ms_per_diffusion_forward=1e3 * s_fwd,
                                ms_per_ar_token=1e3 * s_tok, break_even_tpf=tpf, break_even_how=how,
                                cost_ratio=s_fwd / s_tok, best_tok_s=best["tok_s"], best_tpf=best["tpf"]))
    return out


# ----------------------------------------------------------------------------- server
def server(model: str, threads: list[int], concurrency: list[int], tpfs: list[float], max_tokens: int,
           prompt_len: int, time_limit: float, rounds: int = 4, min_requests: int = 0,
           repeats: int = 1, profile: bool = False) -> list[dict]:
    """Closed-loop loads through the server: per thread count, one fixed-policy server (AR and each
    fixed rate from the request) and one adaptive server per rate, all started before any load.
    Each (concurrency, mode) load runs `repeats` times, the modes interleaved (the order rotates
    every repeat), so a drift of the machine's state (another tenant, the clock, the page cache)
    lands on every mode alike; a row carries the median tokens/s of its repeats and all of them.
    profile: the servers run with --profile and a row also carries, per engine step of its loads,
    the forwards' phases and parallel regions (`per_step`: server_profile)."""
    import asyncio
    import statistics

    import serve as load  # bench/serve.py

    steps = [steps_for(k) for k in tpfs]
    # the fixed policy's server takes each mode from the request; an adaptive server per rate has
    # that fixed-rate rule as its default (--steps) and assigns each request AR or it by the load
    setups = [([], [("ar", {"block_length": 1})] + [
        (f"steps{n}", {"generation_algorithm": "steps", "steps": n}) for n in steps])] + [
        (["--decode-policy", "adaptive", "--steps", str(n)], [(f"adaptive-steps{n}", {})]) for n in steps]
    rows = []
    for t in sorted(threads, reverse=True):  # (the most threads first: a run cut short keeps them)
        servers = []  # (procs, base, adaptive?, modes)
        try:
            for flags, modes in setups:
                args = SimpleNamespace(model=model, replicas=1, threads=t, pin=False, max_batch=max(concurrency),
                                       start_timeout=300.0,
                                       server_arg=["--max-queue", str(4 * max(concurrency))] + flags
                                       + (["--profile"] if profile else []),
                                       chat=False, api_key=None, served_model_name=None, max_tokens=max_tokens,
                                       temperature=0.0, prompt=None, prompt_ids=prompt_len, threshold=None,
                                       small_block_size=None, ignore_eos=True, time_limit=time_limit, label="")
                procs, bases, _ = load.start_servers(args)
                servers.append((procs, bases, bool(flags), modes, args))
            loads = [(bases, adaptive, mode, extra, args) for _, bases, adaptive, modes, args in servers
                     for mode, extra in modes]
            for c in concurrency:
                results = {mode: [] for _, _, mode, _, _ in loads}
                prof = {mode: {} for _, _, mode, _, _ in loads}  # summed /metrics differences over its loads
                last = {}
                for k in range(max(1, repeats)):
                    for bases, adaptive, mode, extra, args in loads[k % len(loads):] + loads[:k % len(loads)]:
                        # `rounds` requests per client, closed loop: a rate at that concurrency, not
                        # the ramp of one burst (whose first arrival finds an idle engine)
                        # (at least min_requests: a 1-client load long enough to outlast what the
                        # adaptive policy remembers of the load before it)
                        args.concurrency, args.num_requests, args.extra_body = c, max(rounds * c, min_requests), extra
                        asyncio.run(load.run_load(bases, SimpleNamespace(**{**vars(args), "num_requests": 1,
                                                                             "concurrency": 1})))  # warm
                        before = scrape(bases[0]) if profile else {}
                        res = asyncio.run(load.run_load(bases, args))
                        if profile:
                            for k, v in scrape(bases[0]).items():
                                prof[mode][k] = prof[mode].get(k, 0.0) + v - before.get(k, 0.0)
                        results[mode].append(res)
                        last[mode] = policy_state(bases[0]) if adaptive else None
                for bases, adaptive, mode, extra, args in loads:
                    runs = results[mode]
                    rates = [r.get("tokens_per_s") or 0.0 for r in runs]
                    modes_seen: dict = {}
                    for r in runs:
                        for m, n in (r.get("decode_modes") or {}).items():
                            modes_seen[m] = modes_seen.get(m, 0) + n
                    row = dict(threads=t, concurrency=c, mode=mode, repeats=len(runs),
                               requests=sum(r.get("completed") or 0 for r in runs),
                               errors=sum(r.get("errors") or 0 for r in runs),
                               first_errors=[e for r in runs for e in (r.get("first_errors") or [])][:5],
                               tok_s=statistics.median(rates), tok_s_all=rates,
                               wall_s=sum(r.get("wall_s") or 0.0 for r in runs),
                               latency_p50=statistics.median([(r.get("latency_s") or {}).get("p50") or 0.0
                                                              for r in runs]),
                               decode_modes=modes_seen)
                    if adaptive:  # the adaptive policy's state after its last load: cost curves, tokens/forward
                        row["policy_state"] = last.get(mode)
                    if profile:
                        row["per_step"] = server_profile(prof[mode])
                    rows.append(row)
                    ps = row.get("policy_state") or {}
                    why = (f"; policy tpf {ps['tokens_per_forward']}, s by requests: AR {ps['cost_ar_seconds']}, "
                           f"diffusion {ps['cost_diffusion_seconds']}, scaled by {ps.get('cost_scale')}"
                           if ps.get("calibrated") else "")
                    spread = f" (of {', '.join(f'{x:.1f}' for x in rates)})" if len(rates) > 1 else ""
                    print(f"server  {t:>3} thr c={c:>3} {mode:>8}: {row['tok_s'] or 0:8.1f} tok/s{spread} "
                          f"({row['errors']} errors; modes {row['decode_modes']}{why})", flush=True)
                    if row.get("per_step"):
                        print(f"        per step: {row['per_step']['summary']}", flush=True)
        finally:
            for procs, *_ in servers:
                load.stop_servers(procs)
    return rows


def scrape(base: str) -> dict:
    """Every bitdlm_* sample of the server's /metrics: {'name{labels}': value} (empty on failure)."""
    import httpx

    import serve as load  # bench/serve.py

    try:
        return load.parse_metrics(httpx.get(base + "/metrics", timeout=10, trust_env=False).text)
    except httpx.HTTPError:
        return {}


def server_profile(d: dict) -> dict:
    """Per engine step of some loads (d: their /metrics differences, servers run with --profile): ms of
    the step (the engine's step latency), of its forwards' phases, and of its parallel regions by kind as
    wall = fork + work + imbalance + join: where a serving step's time goes beside the bare forward."""
    steps = d.get("bitdlm_engine_steps_total", 0.0)
    if steps <= 0:
        return {}

    def per(v):
        return round(1e3 * v / steps, 3)

    phases = {k.split('phase="')[1].split('"')[0]: per(v) for k, v in d.items()
              if k.startswith("bitdlm_forward_phase_seconds_total{") and v > 0}
    regions: dict = {}
    for k, v in d.items():
        if k.startswith("bitdlm_parallel_region_seconds_total{"):
            kind = k.split('kind="')[1].split('"')[0]
            part = k.split('part="')[1].split('"')[0]
            regions.setdefault(kind, {})[part] = per(v)
    out = {"steps": int(steps), "forwards": int(d.get("bitdlm_forward_passes_total", 0.0)),
           "step_ms": per(d.get("bitdlm_step_latency_seconds_sum", 0.0)),
           "forward_phases_ms": phases, "regions_ms": regions}
    reg = "; ".join(f"{kind} {r.get('wall', 0):.2f} = fork {r.get('fork', 0):.2f} + work {r.get('work', 0):.2f} "
                    f"+ imbalance {r.get('imbalance', 0):.2f} + join {r.get('join', 0):.2f}"
                    for kind, r in regions.items())
    out["summary"] = (f"{out['step_ms']:.2f} ms a step, its forwards' phases {sum(phases.values()):.2f} ms; "
                      f"regions (ms a step): {reg}")
    return out


def policy_state(base: str):
    """/health's decode_policy_state (the adaptive policy's cost curves, its tokens per forward
    estimate, the modes it assigned), or None: why it chose as it did, for the JSON."""
    import httpx

    try:
        return httpx.get(base + "/health", timeout=5, trust_env=False).json().get("decode_policy_state")
    except (httpx.HTTPError, ValueError):
        return None


# ----------------------------------------------------------------------------- llama.cpp
def build_llama(archive: str, build_dir: str) -> str:
    bindir = os.path.join(build_dir, "build", "bin")
    if not all(os.path.exists(os.path.join(bindir, x)) for x in ("llama-bench", "llama-batched-bench")):
        subprocess.run(["bash", os.path.join(HERE, "build_llama_bench.sh"), archive, build_dir], check=True)
    return bindir


def llama(bindir: str, gguf: str, threads: list[int], parallel: list[int], max_tokens: int,
          prompt_len: int) -> list[dict]:
    rows = []
    for t in sorted(threads, reverse=True):  # the most threads first: a run cut short keeps them
        cmd = [os.path.join(bindir, "llama-bench"), "-m", gguf, "-p", "0", "-n", str(max_tokens), "-t", str(t),
               "-r", "3", "-o", "json", "-ngl", "0"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if p.returncode:
            raise RuntimeError(f"llama-bench failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
        for rec in json.loads(p.stdout):
            if rec.get("n_gen"):
                rows.append(dict(threads=t, parallel=1, tool="llama-bench", tok_s=rec["avg_ts"]))
        ctx = max(parallel) * (prompt_len + max_tokens) + 256  # enough also without a unified KV cache
        cmd = [os.path.join(bindir, "llama-batched-bench"), "-m", gguf, "-c", str(ctx), "-b", "2048", "-ub", "512",
               "-npp", str(prompt_len), "-ntg", str(max_tokens), "-npl", ",".join(map(str, parallel)),
               "-t", str(t), "-tb", str(t), "-ngl", "0", "-pps"]  # one shared prompt: minutes saved
        p = subprocess.run(cmd + ["--output-format", "jsonl"], capture_output=True, text=True, timeout=600)
        if p.returncode:  # a build without --output-format: its Markdown table
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if p.returncode:
            raise RuntimeError(f"llama-batched-bench failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
        for rec in batched_rows(p.stdout):
            # speed_tg: generated tokens/s of the pl streams (what the server's tokens/s counts);
            # speed: prompt + generation together
            rows.append(dict(threads=t, parallel=int(rec["pl"]), tool="llama-batched-bench", tok_s=rec["speed_tg"],
                             tok_s_with_prompt=rec["speed"]))
        for r in rows[-len(parallel) - 1:]:
            print(f"llama   {t:>3} thr p={r['parallel']:>3} {r['tool']:>19}: {r['tok_s']:8.1f} tok/s", flush=True)
    return rows


BATCHED_KEYS = ("pp", "tg", "pl", "n_kv", "t_pp", "speed_pp", "t_tg", "speed_tg", "t", "speed")


def batched_rows(text: str) -> list[dict]:
    """llama-batched-bench's results: its JSONL lines, else the rows of its Markdown table."""
    rows = [json.loads(ln) for ln in text.splitlines() if ln.startswith("{")]
    if rows:
        return rows
    for ln in text.splitlines():
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if len(cells) >= len(BATCHED_KEYS) and cells[0].isdigit():
            rows.append({k: float(v) for k, v in zip(BATCHED_KEYS, cells)})
    return rows


# ----------------------------------------------------------------------------- OpenMP spin
SPIN_WORKER = r"""
import json, sys, time
import bitdlm
from bitdlm import SamplingParams
llm = bitdlm.LLM(sys.argv[1], threads=int(sys.argv[2]))
p = list(range(4, 4 + int(sys.argv[4])))
sp = SamplingParams(block_length=1, max_tokens=int(sys.argv[3]), ignore_eos=True)
llm.generate(p, sp)
best = 0.0
for _ in range(3):
    t0 = time.perf_counter(); n = len(llm.generate(p, sp)[0].token_ids); best = max(best, n / (time.perf_counter() - t0))
print("RESULT " + json.dumps(best))
"""


def spin(model: str, threads: int, max_tokens: int, prompt_len: int) -> list[dict]:
    rows = []
    for label, extra in (("bounded (bitdlm default)", {}), ("libgomp default", {"GOMP_SPINCOUNT": LIBGOMP_SPIN})):
        env = child_env(threads, **extra)
        if not extra:
            for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "KMP_BLOCKTIME"):
                env.pop(k, None)
        p = subprocess.run([sys.executable, "-c", SPIN_WORKER, model, str(threads), str(max_tokens), str(prompt_len)],
                           env=env, capture_output=True, text=True, timeout=600)
        res = [json.loads(x[7:]) for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if not res:
            raise RuntimeError(f"spin worker failed:\n{p.stderr[-2000:]}")
        rows.append(dict(threads=threads, spin=label, ar_tok_s=res[0]))
        print(f"spin    {threads:>3} thr {label:>24}: AR {res[0]:8.1f} tok/s", flush=True)
    return rows


# ----------------------------------------------------------------------------- report
def machine() -> dict:
    info = {"cpu": "", "cpus": os.cpu_count(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except (OSError, StopIteration):
        pass
    return info


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for t in doc["threads"]:
        for cache, style in (("prefix", "o-"), ("dual", "s-")):
            rs = sorted((r for r in doc["offline"] if r["threads"] == t and r["cache"] == cache and r["mode"] != "ar"),
                        key=lambda r: r["tpf"])
            if rs:
                ax[0].plot([r["tpf"] for r in rs], [r["tok_s"] for r in rs], style,
                           label=f"diffusion, {cache} cache, {t} thr")
        for r in doc["offline"]:
            if r["threads"] == t and r["mode"] == "ar":
                ax[0].axhline(r["tok_s"], ls="--", lw=1, color="k" if t == max(doc["threads"]) else "gray")
                ax[0].annotate(f"AR {t} thr", (0.1, r["tok_s"]), xycoords=("axes fraction", "data"), fontsize=7)
        for r in doc["llama"]:
            if r["threads"] == t and r["parallel"] == 1:
                ax[0].axhline(r["tok_s"], ls=":", lw=1, color="r")
                ax[0].annotate(f"llama.cpp tg {t} thr", (0.55, r["tok_s"]), xycoords=("axes fraction", "data"),
                               fontsize=7, color="r")
    ax[0].set_xlabel("tokens per forward (achieved, commit forwards included)")
    ax[0].set_ylabel("generated tokens/s (LLM.generate, one request)")
    ax[0].legend(fontsize=7)
    ax[0].set_title("one stream")
    t = max(doc["threads"])
    for mode in sorted({r["mode"] for r in doc["server"]}):
        rs = sorted((r for r in doc["server"] if r["threads"] == t and r["mode"] == mode), key=lambda r: r["concurrency"])
        ax[1].plot([r["concurrency"] for r in rs], [r["tok_s"] or 0 for r in rs], "o-", label=f"bitdlm serve {mode}")
    ll = sorted((r for r in doc["llama"] if r["threads"] == t), key=lambda r: r["parallel"])
    if ll:
        ax[1].plot([r["parallel"] for r in ll], [r["tok_s"] for r in ll], "x--", color="r", label="llama.cpp")
    ax[1].set_xscale("log", base=2)
    ax[1].set_xlabel("concurrent requests")
    ax[1].set_ylabel("generated tokens/s")
    ax[1].set_title(f"server, {t} threads")
    ax[1].legend(fontsize=7)
    fig.suptitle(f"{doc['machine'].get('cpu', '')}  {doc['machine']['date_utc']} UTC", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(doc: dict) -> str:
    """The tables for README's results: one stream (offline), break-even, server beside llama.cpp."""
    m = doc["machine"]
    out = [f"{m.get('cpu', '')}, {m.get('cpus')} CPUs, {m['date_utc']} UTC, load {m.get('loadavg')}; "
           f"`{doc['command']}`", "",
           "| threads | decoding | cache | tokens/forward | tokens/s | ms/forward | ms outside the core |",
           "|---:|---|---|---:|---:|---:|---:|"]
    for r in doc["offline"]:
        name = "AR (block 1)" if r["mode"] == "ar" else f"steps {r['steps']} ({r['tpf_target']}/forward)"
        out.append(f"| {r['threads']} | {name} | {r['cache'] if r['mode'] != 'ar' else '-'} | {r['tpf']:.2f} | "
                   f"{r['tok_s']:.1f} | {r['ms_per_forward']:.2f} | {r['outside_ms_per_forward']:.3f} |")
    out += ["", "| threads | cache | break-even tokens/forward | how | ms per diffusion forward / per AR token |",
            "|---:|---|---:|---|---:|"]
    out += [f"| {r['threads']} | {r['cache']} | {r['break_even_tpf']:.2f} | {r['break_even_how']} | "
            f"{r['ms_per_diffusion_forward']:.2f} / "
            f"{r['ms_per_ar_token']:.2f} |" for r in doc["break_even"]]
    conc = sorted({r["concurrency"] for r in doc["server"]} | {r["parallel"] for r in doc["llama"]})
    if conc:
        out += ["", "generated tokens/s by concurrent requests", "",
                "| threads | engine | " + " | ".join(map(str, conc)) + " |", "|---:|---|" + "---:|" * len(conc)]
        series = {}
        for r in doc["server"]:
            series.setdefault((r["threads"], f"bitdlm serve {r['mode']}"), {})[r["concurrency"]] = r["tok_s"]
        for r in doc["llama"]:
            series.setdefault((r["threads"], "llama.cpp"), {})[r["parallel"]] = r["tok_s"]
        for (t, name), v in sorted(series.items()):
            out.append(f"| {t} | {name} | " + " | ".join("-" if v.get(c) is None else f"{v[c]:.1f}" for c in conc)
                       + " |")
        out += adaptive_vs_fixed(doc["server"])
    if doc["spin"]:
        out += ["", "AR tokens/s, OpenMP spin: " + ", ".join(f"{r['spin']} {r['ar_tok_s']:.1f}" for r in doc["spin"])
                + f" ({doc['spin'][0]['threads']} threads)"]
    return "\n".join(out) + "\n"


def adaptive_vs_fixed(rows: list[dict]) -> list[str]:
    """Issue 20's server target as a table: each adaptive-stepsN median against the better of AR
    and fixed stepsN at the same threads and concurrency (the ratio; >= 1 meets it)."""
    by = {(r["threads"], r["concurrency"], r["mode"]): r["tok_s"] or 0.0 for r in rows}
    out = []
    for (t, c, mode), v in sorted(by.items()):
        if not mode.startswith("adaptive-"):
            continue
        fixed = mode[len("adaptive-"):]
        ar, diff = by.get((t, c, "ar")), by.get((t, c, fixed))
        if ar is None or diff is None:
            continue
        best = max(ar, diff)
        out.append(f"| {t} | {c} | {mode} | {v:.1f} | {ar:.1f} | {diff:.1f} | {v / best if best else 0:.3f} |")
    if not out:
        return []
    return ["", "adaptive policy against the better fixed mode (medians)", "",
            "| threads | concurrency | adaptive | tok/s | AR | fixed diffusion | adaptive / better |",
            "|---:|---:|---|---:|---:|---:|---:|"] + out


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny synthetic model and small settings (CI, seconds)")
    ap.add_argument("--model", default=None, help="bitdlm .bin (default: make the synthetic one in --workdir)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bitdlm-e2e"))
    ap.add_argument("--threads", default=None, help="thread counts (default 8,16; --tiny: 1)")
    ap.add_argument("--tpf", default="1,2,3,4,8",
                    help="tokens per forward of the fixed-rate rule (steps_for: its commit counted)")
    ap.add_argument("--max-tokens", type=int, default=None, help="generated per request (default 64; --tiny 16)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2, help="offline repetitions (the fastest is kept)")
    ap.add_argument("--concurrency", default=None, help="server concurrency (default 1,4,16,64; --tiny 1,2)")
    ap.add_argument("--server-tpf", default="2,4", help="fixed-rate tokens per forward timed through the server")
    ap.add_argument("--server-max-tokens", type=int, default=None, help="per server request (default 32; --tiny 8)")
    ap.add_argument("--server-threads", default=None,
                    help="thread counts of the server section (default: --threads; e.g. 16,15: a core left "
                         "to the event loop and the load generator)")
    ap.add_argument("--server-rounds", type=int, default=4,
                    help="requests per client at each concurrency, closed loop (one round: a single burst)")
    ap.add_argument("--server-min-requests", type=int, default=0,
                    help="requests per load at least (rounds x clients below it are raised to it)")
    ap.add_argument("--server-repeats", type=int, default=1,
                    help="loads per (concurrency, mode), the modes interleaved; rows give the median")
    ap.add_argument("--server-time-limit", type=float, default=90.0, help="seconds per server load at most")
    ap.add_argument("--server-profile", action="store_true",
                    help="servers run with --profile: each row gets, per engine step, its forwards' phases "
                         "and parallel regions (fork + work + imbalance + join) from /metrics")
    ap.add_argument("--llama-archive", default="", help="trimmed llama.cpp source (bench/llama_trim.py); '' skips")
    ap.add_argument("--skip", default="", help="sections to skip: offline,server,llama,spin")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    a = ap.parse_args(argv)
    threads = ints(a.threads or ("1" if a.tiny else "8,16"))
    tpfs = [float(x) for x in a.tpf.split(",") if x]
    tpfs = [int(x) if x == int(x) else x for x in tpfs]
    max_tokens = a.max_tokens or (16 if a.tiny else 64)
    conc = ints(a.concurrency or ("1,2" if a.tiny else "1,4,16,64"))
    server_tokens = a.server_max_tokens or (8 if a.tiny else 32)
    skip = set(a.skip.split(",")) - {""}
    os.makedirs(a.workdir, exist_ok=True)
    t_start = time.time()
    builder = None
    if a.llama_archive and "llama" not in skip:  # llama.cpp builds while the model is made
        builder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r}); import e2e; "
                                    f"e2e.build_llama({a.llama_archive!r}, {os.path.join(a.workdir, 'llama')!r})"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    model = a.model or make_model(a.workdir, a.tiny)
    doc = dict(machine=machine(), model=model, threads=threads, block=BLOCK, sub_block=SUB, max_tokens=max_tokens,
               prompt_len=a.prompt_len, offline=[], break_even=[], server=[], llama=[], spin=[], notes=[],
               command=" ".join(["bench/e2e.py"] + (argv if argv is not None else sys.argv[1:])))

    def save():
        doc["seconds"] = time.time() - t_start
        if a.json:
            with open(a.json, "w") as f:
                json.dump(doc, f, indent=1)

    gguf = os.path.splitext(model)[0] + "-tq2_0-q8_0.gguf"
    if builder is not None and not os.path.exists(gguf):  # while llama.cpp builds
        p = subprocess.run([sys.executable, os.path.join(HERE, "gguf_export.py"), model, gguf, "--weights", "tq2_0",
                            "--output", "q8_0"], env=child_env(), capture_output=True, text=True)
        if p.returncode:
            doc["notes"].append("GGUF export failed: " + p.stderr[-1500:])
    if builder is not None:  # waited for before anything is timed (the build takes every core)
        log, _ = builder.communicate()
        if builder.returncode:
            doc["notes"].append("llama.cpp build failed: " + log[-1500:])
        elif os.path.exists(gguf):
            try:
                doc["llama"] = llama(os.path.join(a.workdir, "llama", "build", "bin"), gguf, threads,
                                     [c for c in conc if c > 1], server_tokens, a.prompt_len)
            except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                doc["notes"].append(f"llama.cpp failed: {e}")
        save()
    if "offline" not in skip:
        doc["offline"] = offline(model, threads, tpfs, max_tokens, a.prompt_len, a.reps)
        doc["break_even"] = break_even(doc["offline"])
        save()
    if "server" not in skip:
        try:
            doc["server"] = server(model, ints(a.server_threads) if a.server_threads else threads, conc,
                                   [float(x) for x in a.server_tpf.split(",") if x], server_tokens, a.prompt_len,
                                   a.server_time_limit, a.server_rounds, a.server_min_requests,
                                   a.server_repeats, a.server_profile)
        except (ImportError, SystemExit, RuntimeError) as e:
            doc["notes"].append(f"server skipped: {e}")
            print(doc["notes"][-1], file=sys.stderr)
        save()
    if "spin" not in skip:
        doc["spin"] = spin(model, max(threads), max_tokens, a.prompt_len)
    save()
    for n in doc["notes"]:
        print("note:", n[:300], file=sys.stderr)
    if doc["break_even"]:
        print("\nbreak-even tokens per forward, end to end (diffusion beats AR above it):")
        for r in doc["break_even"]:
            print(f"  {r['threads']:>3} threads, {r['cache']:>6} cache: {r['break_even_tpf']:5.2f} "
                  f"({r['break_even_how']}; cost ratio {r['cost_ratio']:.2f}: {r['ms_per_diffusion_forward']:.2f} ms "
                  f"per forward / {r['ms_per_ar_token']:.2f} ms per AR token)")
    if a.json:  # the same tables as Markdown, beside the JSON
        with open(os.path.splitext(a.json)[0] + ".md", "w") as f:
            f.write(markdown(doc))
    if a.plot:
        plot(doc, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
