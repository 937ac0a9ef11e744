"""AMX variant sweep: which AMX kernel variant (and which ISA) runs the 2B GEMMs fastest.

    PYTHONPATH=python python3 bench/amx_sweep.py [--json bench/out/amx_sweep.json]
        [--variants 0,1,9,17,33,41,49,177,433,57,65] [--threads 1,16] [--quick]

Needs the bench-only kernels: BITDLM_BENCH_KERNELS=1 scripts/dev_build.sh
(the shipped module has only the shipped AMX kernel, variant 49).

1. Single GEMMs: every AMX variant (bit flags, csrc/bench/amx_variants_amx.cpp:
   1 = unpack one 128-k block at a time into L1, 8 = weight-row prefetch,
   16 = double-buffered unpack, 32 / 64 = 64- / 128-row jobs with K-sliced B,
   128 = one unpack stream over the whole job (2 blocks ahead, across K slices
   and row groups), 256 = that stream 3 blocks ahead (only with 128);
   49 = the shipped kernel, 33 the one before, 177 / 433 = 49 with the stream
   2 / 3 deep, listed next to 49 so the pass runs them back to back;
   docs/kernels.md) x N in {2,4,8,16,32,64} x the four 2B shapes x threads
   {1, all cores}; beside them the other ISAs >= avx2 this CPU runs (the row
   "variant" is then the ISA name), so the N from which AMX beats VNNI
   (kAmxMinTokens) can be read off. Median us and T MAC/s.
2. The 30-layer pass, the number that matters: all ternary GEMMs of the 2B
   model in forward order (per layer: q/k/v multi-GEMM, o, gate/up multi-GEMM,
   down; 30 distinct layers, ~520 MB of weights, so nothing stays in the LLC)
   for N = 8 and 32, back to back, per AMX variant and per ISA. Inputs are
   quantized once beforehand (the pass times GEMMs only); each GEMM call pays
   the Python binding (~10 us, 120 calls), which the forward (C++) does not.
   Beside them (CPUs with avx512vnni) "bench vnni": the shipped VNNI tiles
   (2 x 8 tokens) through bench_gemm_multi's job loop (dispatch's non-AMX
   loop; equal to the avx512vnni row within noise), then per 2B shape at
   N = 8, 16, 32.
3. The int8 lm_head (128256 x 2560, 328 MB, streamed from DRAM) at N = 1, 8,
   32 on all cores: AMX (N <= 16: per-row prefetch; above: next row group
   prefetched into L2, paced; N = 1 runs the VNNI GEMV unless
   amx_min_tokens is 1, as here) beside the VNNI / AVX-512 / AVX2 ISAs, ms and
   GB/s of weights.
4. AMX per-call costs (AMX CPUs, all cores): what an AMX GEMM call pays
   besides its jobs (bench_amx_overheads: OpenMP fork + join, tile config +
   release on every thread, the activation re-layout and its barrier, all of
   them), beside whole calls of 2560 x 2560 and 640 x 2560 on amx and
   avx512vnni at N = 2, 16, 32 (one AMX token tile at 2 and 16: the same job
   work). Mean / median us. Then the shipped AMX kernel through
   bench_gemm_multi's loops (amx = as dispatch calls it; amx_keepcfg = tile
   config kept across calls; amx_serialact = re-layout on the calling thread
   before the parallel region, no barrier in it; both): a 2560 x 2560 call at
   N = 2, 16, 32 (us) and the 30-layer pass at N = 8, 32 (ms).
Warm-up passes first (caches, AMX power state, OpenMP team); AMX rows are
skipped where the CPU lacks AMX. Takes ~60-75 s on 16 threads.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))  # unless PYTHONPATH / an install has bitdlm
from bitdlm import _core  # noqa: E402
from bitdlm.packing import pad_k  # noqa: E402

SHAPES = [(2560, 2560), (640, 2560), (6912, 2560), (2560, 6912)]
NS = [2, 4, 8, 16, 32, 64]
PASS_NS = [8, 32]
LM_NS = [1, 8, 32]
N_LAYERS = 30
BASE_ISAS = ["avx512vnni", "avx512", "avx2"]
# bench_gemm_multi kernels (avx512vnni CPUs): the shipped VNNI tiles through its job loop
VNNI_WIDE = ["vnni"]
# bench_gemm_multi's AMX loops (AMX CPUs): the shipped kernel and call, then without per-call tile
# config, without the re-layout's barrier (re-laid out by the calling thread first), without both
AMX_LOOPS = ["amx", "amx_keepcfg", "amx_serialact", "amx_keepcfg_serialact"]


# the 81 bytes whose four 2-bit fields all lie in {0, 1, 2} (valid i2_b128 codes)
_VALID = np.array([b for b in range(256) if all((b >> s) & 3 != 3 for s in (0, 2, 4, 6))], np.uint8)


def random_packed(rng, m: int, k: int) -> np.ndarray:
    return _VALID[rng.integers(0, len(_VALID), size=(m, pad_k(k) // 4), dtype=np.uint8)]


def timeit(fn, warm: int, min_reps: int, min_time: float) -> float:
    for _ in range(warm):
        fn()
    ts = []
    t0 = time.perf_counter()
    while (len(ts) < min_reps or time.perf_counter() - t0 < min_time) and len(ts) < 500:
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def configs(variants: list[int]) -> list[tuple[str, str, int]]:
    """(label, isa, amx variant) for every runnable configuration."""
    sup = _core.supported_isas()
    out = [(f"amx v{v}", "amx", v) for v in variants] if "amx" in sup else []
    out += [(isa, isa, 0) for isa in BASE_ISAS if isa in sup]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "amx_sweep.json"))
    ap.add_argument("--variants", default="0,1,9,17,33,41,49,177,433,57,65")
    ap.add_argument("--threads", default=None, help="comma list (default: 1 and all cores)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    args = ap.parse_args()
    if not hasattr(_core, "set_amx_variant"):
        sys.exit("bench/amx_sweep.py needs the bench-only kernels: rebuild with BITDLM_BENCH_KERNELS=1 "
                 "scripts/dev_build.sh (cmake -DBITDLM_BENCH_KERNELS=ON)")
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, os.cpu_count() or 1})
    variants = [int(v) for v in args.variants.split(",")]
    warm, reps, min_time = (1, 3, 0.01) if args.quick else (3, 7, 0.05)
    cfgs = configs(variants)
    sup = _core.supported_isas()
    if "amx" not in sup:
        print(f"AMX rows skipped: this CPU runs {', '.join(sup)}")
    prev_isa, prev_thr = _core.active_isa(), _core.get_max_threads()
    prev_min = _core.amx_min_tokens()
    shipped = _core.get_amx_variant()  # a fresh process: the shipped kernel's variant number
    _core.set_amx_min_tokens(1)  # amx rows run the AMX kernel at every N (the VNNI rows show the alternative)
    rng = np.random.default_rng(0)
    res = {"supported_isas": sup, "cpus": os.cpu_count(), "amx_min_tokens": _core.amx_min_tokens(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), "gemm": [], "pass_30_layers": [],
           "lm_head_i8": [], "amx_call_costs": [], "vnni_tiles": [],
           "amx_call_variants": []}
    t_start = time.perf_counter()
    try:
        # ---- 1. single GEMMs
        mats = {(m, k): random_packed(rng, m, k) for (m, k) in SHAPES}
        acts = {(n, k): _core.quantize_act(rng.standard_normal((n, k)).astype(np.float32))
                for n in NS for k in {k for _, k in SHAPES}}
        print(f"{'config':>12} {'thr':>3} {'M x K':>11} " + " ".join(f"{'N=' + str(n):>15}" for n in NS))
        print(f"{'':>12} {'':>3} {'':>11} " + " ".join(f"{'us   TMAC/s':>15}" for _ in NS))
        for t in threads:
            _core.set_num_threads(t)
            for label, isa, v in cfgs:
                _core.set_isa(isa)
                _core.set_amx_variant(v)
                for (m, k) in SHAPES:
                    w, cells = mats[(m, k)], []
                    for n in NS:
                        q, s, sm = acts[(n, k)]
                        med = timeit(lambda: _core.gemm(w, 1.0, q, s, sm), warm, reps, min_time)
                        macs = m * pad_k(k) * n
                        res["gemm"].append({"config": label, "isa": isa, "variant": v, "threads": t, "M": m, "K": k,
                                            "N": n, "median_us": med * 1e6, "TMACps": macs / med / 1e12})
                        cells.append(f"{med * 1e6:>8.1f} {macs / med / 1e12:>6.2f}")
                    print(f"{label:>12} {t:>3} {m:>5}x{k:<5} " + " ".join(cells), flush=True)

        # ---- 2. the 30-layer pass (forward order), all cores
        t = threads[-1]
        _core.set_num_threads(t)
        layers = [{"qkv": [random_packed(rng, m, 2560) for m in (2560, 640, 640)],
                   "o": [random_packed(rng, 2560, 2560)],
                   "gu": [random_packed(rng, 6912, 2560) for _ in range(2)],
                   "down": [random_packed(rng, 2560, 6912)]} for _ in range(N_LAYERS)]
        macs_layer = sum(m * k for m, k in [(2560, 2560), (640, 2560), (640, 2560), (2560, 2560), (6912, 2560),
                                             (6912, 2560), (2560, 6912)])
        print(f"\n30-layer pass ({t} threads; GEMMs only, forward order; ms and T MAC/s)")
        print(f"{'config':>12} " + " ".join(f"{'N=' + str(n):>16}" for n in PASS_NS))
        wide = [(f"bench {k}" if k == "vnni" else k, "avx512vnni", k) for k in VNNI_WIDE] * ("avx512vnni" in sup)
        for label, isa, v in cfgs + wide:
            _core.set_isa(isa)
            _core.set_amx_variant(v if isinstance(v, int) else shipped)
            gemm = (lambda *a: _core.gemm_multi(*a)) if isinstance(v, int) else \
                (lambda *a, k=v: _core.bench_gemm_multi(k, *a))
            cells = []
            for n in PASS_NS:
                qa = _core.quantize_act(rng.standard_normal((n, 2560)).astype(np.float32))
                qd = _core.quantize_act(rng.standard_normal((n, 6912)).astype(np.float32))

                def one_pass():
                    for L in layers:
                        gemm(L["qkv"], [1.0] * 3, *qa)
                        gemm(L["o"], [1.0], *qa)
                        gemm(L["gu"], [1.0] * 2, *qa)
                        gemm(L["down"], [1.0], *qd)

                med = timeit(one_pass, *((1, 4, 0) if args.quick else (2, 5, 0.3)))
                macs = macs_layer * N_LAYERS * n
                res["pass_30_layers"].append({"config": label, "isa": isa, "variant": v, "threads": t, "N": n,
                                              "median_ms": med * 1e3, "TMACps": macs / med / 1e12})
                cells.append(f"{med * 1e3:>9.2f} {macs / med / 1e12:>6.2f}")
            print(f"{label:>12} " + " ".join(cells), flush=True)

        # ---- 2b. the shipped VNNI tiles per shape, all cores
        if wide:
            print(f"\nVNNI tiles per shape ({t} threads, bench_gemm_multi; us and T MAC/s)")
            print(f"{'kernel':>12} {'M x K':>11} " + " ".join(f"{'N=' + str(n):>15}" for n in (8, 16, 32)))
            for label, _, k in wide:
                for (m, kk) in SHAPES:
                    cells = []
                    for n in (8, 16, 32):
                        q, s, sm = acts[(n, kk)]
                        med = timeit(lambda: _core.bench_gemm_multi(k, [mats[(m, kk)]], [1.0], q, s, sm), 2, 5, 0.02)
                        macs = m * pad_k(kk) * n
                        res["vnni_tiles"].append({"config": label, "kernel": k, "threads": t, "M": m, "K": kk, "N": n,
                                                  "median_us": med * 1e6, "TMACps": macs / med / 1e12})
                        cells.append(f"{med * 1e6:>8.1f} {macs / med / 1e12:>6.2f}")
                    print(f"{label:>12} {m:>5}x{kk:<5} " + " ".join(cells), flush=True)

        # ---- 3. the int8 lm_head, all cores
        V, K = 128256, 2560
        w8 = rng.integers(-127, 128, size=(V, K), dtype=np.int8)
        ws = np.full(V, 0.01, np.float32)
        print(f"\nint8 lm_head {V}x{K} ({t} threads; ms and GB/s of weights)")
        print(f"{'config':>12} " + " ".join(f"{'N=' + str(n):>16}" for n in LM_NS))
        lm_cfgs = [("amx", "amx", shipped)] * ("amx" in sup) + [(i, i, 0) for i in BASE_ISAS if i in sup]
        for label, isa, v in lm_cfgs:
            _core.set_isa(isa)
            _core.set_amx_variant(v)
            cells = []
            for n in LM_NS:
                q, sc, _ = _core.quantize_act(rng.standard_normal((n, K)).astype(np.float32))
                med = timeit(lambda: _core.gemm_i8(w8, ws, q, sc), 2, 2 if args.quick else 5, 0 if args.quick else 0.2)
                res["lm_head_i8"].append({"config": label, "isa": isa, "variant": v, "threads": t, "N": n, "V": V,
                                          "K": K, "median_ms": med * 1e3, "GBps": V * K / med / 1e9})
                cells.append(f"{med * 1e3:>9.2f} {V * K / med / 1e9:>6.1f}")
            print(f"{label:>12} " + " ".join(cells), flush=True)
        # ---- 4. AMX per-call costs, all cores (JSON written first: a fault here keeps 1-3)
        dump(res, args.json, t_start)
        if "amx" in sup:
            print(f"\nAMX per-call costs ({t} threads; us: prologue parts without jobs, then whole GEMM calls)")
            print(f"{'N':>3} {'fork':>6} {'f+cfg':>6} {'f+act':>6} {'all':>6} "
                  + " ".join(f"{isa + ' ' + str(m):>15}" for isa in ("amx", "avx512vnni") for m in (2560, 640)))
            for n in (2, 16, 32):
                oh = _core.bench_amx_overheads(t, n, pad_k(2560), 500 if args.quick else 2000)
                row = {"threads": t, "N": n, **oh}
                q, s, sm = acts[(n, 2560)] if (n, 2560) in acts else _core.quantize_act(
                    rng.standard_normal((n, 2560)).astype(np.float32))
                cells = []
                for isa in ("amx", "avx512vnni"):
                    _core.set_isa(isa)
                    _core.set_amx_variant(shipped)
                    for m in (2560, 640):
                        w = mats[(m, 2560)]
                        us = timeit(lambda: _core.gemm(w, 1.0, q, s, sm), 5, 50, 0.05) * 1e6
                        row[f"{isa}_{m}x2560_us"] = us
                        cells.append(f"{us:>15.1f}")
                res["amx_call_costs"].append(row)
                print(f"{n:>3} {oh['fork_us']:>6.1f} {oh['cfg_us']:>6.1f} {oh['act_us']:>6.1f} {oh['all_us']:>6.1f} "
                      + " ".join(cells), flush=True)
            # the same AMX kernel without the per-call costs, through dispatch's loop (bench_gemm_multi)
            print(f"\nAMX call variants ({t} threads; us per 2560 x 2560 call, then the 30-layer pass in ms)")
            print(f"{'loop':>22} " + " ".join(f"{'N=' + str(n):>8}" for n in (2, 16, 32))
                  + " " + " ".join(f"{'pass N=' + str(n):>11}" for n in PASS_NS))
            for k in AMX_LOOPS:
                row, cells = {"kernel": k, "threads": t}, []
                for n in (2, 16, 32):
                    q, s, sm = acts[(n, 2560)]
                    us = timeit(lambda: _core.bench_gemm_multi(k, [mats[(2560, 2560)]], [1.0], q, s, sm), 5, 50,
                                0.05) * 1e6
                    row[f"call_2560x2560_N{n}_us"] = us
                    cells.append(f"{us:>8.1f}")
                for n in PASS_NS:
                    qa = _core.quantize_act(rng.standard_normal((n, 2560)).astype(np.float32))
                    qd = _core.quantize_act(rng.standard_normal((n, 6912)).astype(np.float32))

                    def amx_pass():
                        for L in layers:
                            for key, qq in (("qkv", qa), ("o", qa), ("gu", qa), ("down", qd)):
                                _core.bench_gemm_multi(k, L[key], [1.0] * len(L[key]), *qq)

                    ms = timeit(amx_pass, 1, 4 if args.quick else 5, 0 if args.quick else 0.3) * 1e3
                    row[f"pass_N{n}_ms"] = ms
                    cells.append(f"{ms:>11.2f}")
                res["amx_call_variants"].append(row)
                print(f"{k:>22} " + " ".join(cells), flush=True)
        del layers
    finally:
        _core.set_isa(prev_isa)
        _core.set_amx_variant(shipped)
        _core.set_num_threads(prev_thr)
        _core.set_amx_min_tokens(prev_min)
    dump(res, args.json, t_start)
    print(f"\n{res['seconds']:.0f} s; wrote {args.json}")


def dump(res: dict, path: str, t_start: float) -> None:
    res["seconds"] = time.perf_counter() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
