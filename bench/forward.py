"""Forward latency of the C++ model on a BitNet-2B-4T-shaped synthetic model.

    python bench/forward.py [--threads 1,2] [--lm-head f16,i8] [--kv-dtype f16] [--isa avx512vnni]
                            [--cases decode_ctx512,block32_ctx512_out8] [--model-dir /tmp/bitdlm_fwd]
                            [--reps 7] [--out bench/out/forward.json]

Random weights from bench/make_synthetic_model.py (written to --model-dir on
first use, never committed). Per lm_head type one worker process loads the
model (load time, peak RSS are its own) and times, for each thread count, the
median over --reps of one `Model.forward` call in "select" mode:

- decode_ctxC:   1 token against C = 0 / 512 / 2048 cached positions (AR decoding);
- sub8_ctx512:   an 8-token sub-block step against 512 cached (8 outputs);
- block32_ctx512: a 32-token block step against 512 cached, outputs for the current
                  sub-block (8) and for the whole block (32); block32_ctx2048 the same
                  against 2048 cached (8 outputs).

Each case is then run again with the model's phase profiler on
(`Model.set_profile`, as BITDLM_PROFILE=1 does) and its mean ms per phase
(norm_quant, act_quant, rope_kv, gemm_*, attention, lm_head, select, ...) is
stored as `phases_ms` and printed as a table; `small_ops_pct` is the share of
the small ops (embed, norm_quant, rope_kv, act_quant, final_norm) in it.
The same pass times every parallel region (`_core.team_profile`,
kernels/team_clock.h): per kind (ternary GEMMs, lm_head, attention) its wall
time as fork + work + imbalance + join, ms per forward (`team_ms`, a second
table): whether a 16-thread call loses to slower work per thread or to time
outside it.
--isa runs the workers under BITDLM_ISA=<isa> (default: the dispatcher's best);
--cases keeps only the named cases.

The cache is really written first (a chunked prefill of 2048 tokens, also
timed), so attention reads real pages. Results go to --out as JSON. The machine
may be shared: figures taken while other jobs run are labelled noisy.
Never imports torch.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(HERE, "..", "python"))  # unless PYTHONPATH / an install has bitdlm

CTX_MAX = 2048


def ensure_model(model_dir: str, lm_head: str, shape: str = "2b") -> str:
    path = os.path.join(model_dir, f"synth_{shape}_{lm_head}.bin")
    if not os.path.exists(path):
        os.makedirs(model_dir, exist_ok=True)
        print(f"writing {path} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, os.path.join(HERE, "make_synthetic_model.py"), path, "--lm-head", lm_head,
                        "--shape", shape],
                       check=True)
    return path


SMALL_OPS = ("embed", "norm_quant", "rope_kv", "act_quant", "final_norm")


def worker(path: str, threads: list[int], reps: int, kv_dtype: str, only: list[str] | None = None) -> dict:
    import numpy as np

    import bitdlm
    from bitdlm import _core
    from bitdlm.model import REGION_PARTS

    t0 = time.perf_counter()
    m = bitdlm.load(path, threads=max(threads), kv_budget_gb=4, kv_dtype=kv_dtype)
    load_s = time.perf_counter() - t0
    V = m.vocab_size
    rng = np.random.default_rng(0)
    toks = lambda n: rng.integers(4, V, n).astype(np.int32)  # noqa: E731

    sid = m.alloc_seq(CTX_MAX + 64)
    # First forward: page faults of the whole mapping (weights come from the page cache or disk).
    t0 = time.perf_counter()
    m.forward([(sid, toks(1), 0, 0, False, [0])], 1, "select")
    first_s = time.perf_counter() - t0
    # Write the cache for real (chunked causal prefill).
    chunk = 256
    t0 = time.perf_counter()
    for s in range(0, CTX_MAX, chunk):
        m.forward([(sid, toks(chunk), s, s, True, [chunk - 1])], 1, "select")
    prefill_s = time.perf_counter() - t0

    cases = {
        "decode_ctx0": (1, 0, 1, 1),
        "decode_ctx512": (1, 512, 1, 1),
        "decode_ctx2048": (1, 2048, 1, 1),
        "sub8_ctx512": (8, 512, 32, 8),
        "block32_ctx512_out8": (32, 512, 32, 8),
        "block32_ctx512_out32": (32, 512, 32, 32),
        "block32_ctx2048_out8": (32, 2048, 32, 8),
    }
    if only:
        unknown = set(only) - set(cases)
        if unknown:
            raise SystemExit(f"unknown cases {sorted(unknown)} (known: {', '.join(cases)})")
        cases = {k: v for k, v in cases.items() if k in only}
    res = {}
    for th in threads:
        # the model applies its own thread count at every forward (bind_model.cpp), so
        # _core.set_num_threads alone would leave every row at max(threads)
        _core.set_num_threads(th)
        m.threads = m._core.threads = th
        row = {}
        for name, (n, ctx, B, n_out) in cases.items():
            item = (sid, toks(n), ctx, ctx, False, np.arange(n - n_out, n, dtype=np.int32))
            m.forward([item], B, "select")  # warm-up
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                m.forward([item], B, "select", banned=[0])
                ts.append(time.perf_counter() - t)
            row[name] = {"ms_median": round(1e3 * statistics.median(ts), 2), "ms_min": round(1e3 * min(ts), 2),
                         "reps": reps}
            m.set_profile(True)
            m.profile(reset=True)
            _core.team_profile(reset=True)
            for _ in range(max(1, reps // 2)):
                m.forward([item], B, "select", banned=[0])
            prof = m.profile(reset=True)
            team = _core.team_profile(reset=True)
            m.set_profile(False)
            calls = prof.pop("calls")
            row[name]["phases_ms"] = {k: round(1e3 * v / calls, 3) for k, v in prof.items() if v > 0}
            # the parallel regions' wall = fork + work + imbalance + join (kernels/team_clock.h)
            row[name]["team_ms"] = {
                kind: {"regions": round(t["calls"] / calls, 1), "mean_threads": round(t["mean_threads"], 2),
                       **{p: round(1e3 * t[p] / calls, 3) for p in REGION_PARTS}}
                for kind, t in team.items() if t["calls"]}
            small = sum(v for k, v in prof.items() if k in SMALL_OPS)
            row[name]["small_ops_ms"] = round(1e3 * small / calls, 3)
            row[name]["small_ops_pct"] = round(100 * small / max(sum(prof.values()), 1e-12), 2)
        row["forward_threads"] = m.forward_threads  # what the timed forwards really ran with
        if "decode_ctx512" in row:
            row["decode_ctx512_tok_per_s"] = round(1e3 / row["decode_ctx512"]["ms_median"], 2)
        # Python + argument checking share: the same call stopped right after validation
        item = (sid, toks(32), 512, 512, False, np.arange(24, 32, dtype=np.int32))
        ts = []
        for _ in range(50):
            t = time.perf_counter()
            try:
                m.forward([item], 32, "no-such-mode")
            except ValueError:
                pass
            ts.append(time.perf_counter() - t)
        row["python_side_ms"] = round(1e3 * statistics.median(ts), 4)
        if "block32_ctx512_out8" in row:
            row["python_side_pct_of_block32"] = round(
                100 * row["python_side_ms"] / row["block32_ctx512_out8"]["ms_median"], 3)
        res[str(th)] = row
        print(f"  threads={th}: " + ", ".join(f"{k} {v['ms_median']} ms" for k, v in row.items() if isinstance(v, dict)),
              file=sys.stderr, flush=True)
    m.free_seq(sid)
    return {
        "load_s": round(load_s, 4),
        "first_forward_s": round(first_s, 3),
        "prefill_2048_s": round(prefill_s, 2),
        "prefill_tok_per_s": round(CTX_MAX / prefill_s, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "file_mb": round(os.path.getsize(path) / 2**20, 1),
        "kv_dtype": m.kv_dtype,
        "isa": _core.active_isa(),
        "threads": res,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--lm-head", default="f16,i8")
    ap.add_argument("--kv-dtype", default="f16", choices=["f16", "f32"])
    ap.add_argument("--model-dir", default="/tmp/bitdlm_fwd")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--shape", default="2b", choices=["2b", "tiny"], help="tiny: smoke test of this script")
    ap.add_argument("--out", default=os.path.join(HERE, "out", "forward.json"))
    ap.add_argument("--isa", default="", help="BITDLM_ISA for the workers (scalar|avx2|avx512|avx512vnni|amx)")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    only = [c for c in args.cases.split(",") if c]
    if args.worker:
        print(json.dumps(worker(args.worker, threads, args.reps, args.kv_dtype, only)))
        return 0
    env = dict(os.environ)
    if args.isa:
        env["BITDLM_ISA"] = args.isa

    from bitdlm.bench import machine_info

    out = {"machine": machine_info(), "note": "", "shape": args.shape, "kv_dtype": args.kv_dtype,
           "isa_requested": args.isa or None, "results": {}}
    for head in args.lm_head.split(","):
        path = ensure_model(args.model_dir, head, args.shape)
        print(f"lm_head={head}: {path}", file=sys.stderr, flush=True)
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", path, "--threads", args.threads,
                            "--reps", str(args.reps), "--kv-dtype", args.kv_dtype, "--cases", args.cases],
                           check=True, stdout=subprocess.PIPE, text=True, env=env)
        out["results"][head] = json.loads(r.stdout.strip().splitlines()[-1])
    load_end = os.getloadavg()[0]
    out["machine"]["loadavg_at_end"] = load_end
    busy = max(out["machine"].get("loadavg_at_start") or [0])
    if max(busy, load_end) > 0.5 * (out["machine"].get("physical_cores") or 1):
        out["note"] = "NOISY: other jobs were running on this machine (see loadavg)"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))
    print_phases(out)
    return 0


def print_phases(out: dict) -> None:
    """Per lm_head type and thread count: ms per phase (rows) for every case (columns)."""
    from bitdlm.model import REGION_PARTS  # (the region table's columns)

    for head, r in out["results"].items():
        for th, row in r["threads"].items():
            cases = [k for k, v in row.items() if isinstance(v, dict) and "phases_ms" in v]
            phases = []
            for c in cases:
                phases += [p for p in row[c]["phases_ms"] if p not in phases]
            print(f"\nlm_head={head} threads={th}: ms per phase (profiled runs)")
            print(f"{'phase':14s}" + "".join(f"{c[:20]:>21s}" for c in cases))
            for p in phases:
                print(f"{p:14s}" + "".join(f"{row[c]['phases_ms'].get(p, 0.0):21.2f}" for c in cases))
            print(f"{'sum':14s}" + "".join(f"{sum(row[c]['phases_ms'].values()):21.2f}" for c in cases))
            print(f"{'timed median':14s}" + "".join(f"{row[c]['ms_median']:21.2f}" for c in cases))
            print(f"{'small ops %':14s}" + "".join(f"{row[c]['small_ops_pct']:21.2f}" for c in cases))
            teams = [c for c in cases if row[c].get("team_ms")]
            if not teams:
                continue
            print(f"\nlm_head={head} threads={th}: the parallel regions, ms per forward "
                  f"(wall = fork + work + imbalance + join; kernels/team_clock.h)")
            print(f"{'case':22s}{'region':>14s}{'per fwd':>9s}{'threads':>8s}" + "".join(f"{p:>10s}" for p in REGION_PARTS))
            for c in teams:
                for kind, t in row[c]["team_ms"].items():
                    print(f"{c[:21]:22s}{kind:>14s}{t['regions']:9.1f}{t['mean_threads']:8.2f}"
                          + "".join(f"{t[p]:10.3f}" for p in REGION_PARTS))


if __name__ == "__main__":
    sys.exit(main())
