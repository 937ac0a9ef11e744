"""Kernel benchmark: machine ceilings, then the BitNet-2B GEMM shapes.

    PYTHONPATH=python python3 bench/kernels.py [--quick] [--passive] [--isa avx2 | --isas avx2,amx]
        [--threads 1,16] [--json bench/out/kernels.json] [--ceilings-only]

1. Ceilings per thread count: read bandwidth (streaming a buffer far larger
   than the LLC), the AVX2 int8 MAC peak (a vpmaddubsw -> vpaddw chain, 32 MAC
   per instruction), the AVX-512 VNNI peak (8 vpdpbusd zmm chains) and the AMX
   int8 peak (TDPBSSD on 4 accumulator tiles), each skipped where the CPU lacks
   it; all in C++ (_core.bench_bandwidth / bench_peak_int8 / _vnni / _amx).
2. Ternary GEMM y[N, M] = W[M, K] x a[N, K] for M x K in 2560x2560, 640x2560,
   6912x2560, 2560x6912, N in {1, 8, 32, 128}, threads {1, 2}: median time,
   GOPS (2*M*K*N / t), and % of roofline, where the roofline time is
   max(MACs / int8 peak, weight bytes / bandwidth) for that thread count.
3. N = 1 over all 30 layers of BitNet-2B (~520 MB of packed weights, >> LLC):
   achieved read bandwidth vs the measured one (the decode target).
4. Attention of the 2B shape (20 query / 5 KV heads, head_dim 128, fp16 KV
   cache) over 30 layers' caches (one `_core.attention` call; the caches are
   evicted from the LLC before each repetition, as the weights of a forward
   evict them): 1 / 8 / 32 queries x 512 / 2048 cached, per ISA and thread
   count: median ms, the floor max(FMAs / fp32 FMA peak, K/V bytes / read
   bandwidth) with the bound named, and % of that floor (floor / median).
   The FMA peak is the ISA table's width (ymm for avx2, zmm for the AVX-512
   levels); FMAs = 2 (QK and PV) x rows x visible keys x head_dim.
   `--attention-only`: the ceilings and this part only.
5. The small-op row drivers of the forward alone (`_core.bench_rows`): one
   parallel region over N = 1 / 8 / 32 rows, empty, add + RMSNorm + quantize
   (K 2560) and relu^2 * up + RMSNorm + quantize (K 6912), after a region that
   wrote the rows as a GEMM leaves them (every thread a column slice of every
   row) or row by row (each row on the thread that reads it): median us per
   call and the per-forward total of the 2B shape (90 + 30 calls), to set
   beside the forward profile's norm_quant / act_quant phases.
   Only with `--smallops-only` (this part alone, a few seconds).

Part 1 needs the bench-only kernels (csrc/bench/): build with
BITDLM_BENCH_KERNELS=1 scripts/dev_build.sh; without them the script stops
with a one-line error.

--ceilings-only measures part 1 only (read bandwidth, the VNNI and AMX int8
peaks where the CPU has them; the AVX2 peak too) and writes the same JSON with
its top-level "ceilings" dict keyed by thread count (bench/native_compare.py
calls `bench/kernels.py --ceilings-only --threads 1,16 --json PATH`).

Every timing is a median over repetitions; on a shared machine the numbers are
noisy (the "best" column shows the fastest repetition).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

if __name__ == "__main__" and "--passive" in sys.argv:
    # must be set before libgomp starts (i.e. before importing _core): on a
    # machine shared with other busy processes, spinning OpenMP workers lose
    # their CPU share and 2-thread calls stall for whole scheduler slices
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))  # unless PYTHONPATH / an install has bitdlm
from bitdlm import _core  # noqa: E402
from bitdlm.packing import pad_k  # noqa: E402

SHAPES = [(2560, 2560), (640, 2560), (6912, 2560), (2560, 6912)]
NS = [1, 8, 32, 128]
THREADS = [1, 2]
# BitNet-2B layer: q, k, v, o, gate, up (K = 2560) and down (K = 6912)
LAYER_K2560 = [2560, 640, 640, 2560, 6912, 6912]
LAYER_DOWN = (2560, 6912)
N_LAYERS = 30


def aligned(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off:off + nbytes]


def random_packed(rng, m: int, k: int) -> np.ndarray:
    # every 2-bit field uniform in {0, 1, 2}: a valid i2_b128 matrix, built
    # without the (slow) reference packer
    f = rng.integers(0, 3, size=(m, pad_k(k) // 4, 4), dtype=np.uint8)
    return (f[..., 0] | (f[..., 1] << 2) | (f[..., 2] << 4) | (f[..., 3] << 6)).astype(np.uint8)


def timeit(fn, min_reps: int, min_time: float) -> tuple[float, float]:
    fn()  # warm-up
    ts = []
    t_start = time.perf_counter()
    while len(ts) < min_reps or time.perf_counter() - t_start < min_time:
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        if len(ts) >= 200:
            break
    return statistics.median(ts), min(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, skip the 30-layer pass")
    ap.add_argument("--isa", default=None, help="force a kernel ISA (default: the dispatcher's pick)")
    ap.add_argument("--passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE (use on a shared/oversubscribed machine)")
    ap.add_argument("--isas", default=None,
                    help="comma list: run the GEMM table for each of these ISAs (default: --isa or the dispatcher's)")
    ap.add_argument("--threads", default=None, help="comma list of thread counts (default 1,2)")
    ap.add_argument("--ceilings-only", action="store_true",
                    help="only the machine ceilings (bandwidth, int8 / VNNI / AMX peaks), then write the JSON")
    ap.add_argument("--attention-only", action="store_true",
                    help="only the ceilings (bandwidth, fp32 FMA peaks) and part 4 (attention)")
    ap.add_argument("--smallops-only", action="store_true", help="only part 5 (the small-op row drivers)")
    ap.add_argument("--out", "--json", dest="out",
                    default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "kernels.json"))
    args = ap.parse_args()
    if not hasattr(_core, "bench_bandwidth"):
        sys.exit("bench/kernels.py needs the bench-only kernels (machine ceilings): rebuild with "
                 "BITDLM_BENCH_KERNELS=1 scripts/dev_build.sh (cmake -DBITDLM_BENCH_KERNELS=ON)")
    global THREADS
    if args.threads:
        THREADS = [int(t) for t in args.threads.split(",")]
    if args.smallops_only:
        res = {"isa": _core.active_isa(), "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()}
        bench_small_ops(res, THREADS)
        write_json(res, args.out)
        return
    if args.isa:
        _core.set_isa(args.isa)
    isas = args.isas.split(",") if args.isas else [_core.active_isa()]
    for name in isas:
        if name not in _core.supported_isas():
            print(f"skipping ISA {name}: not supported here (supported: {', '.join(_core.supported_isas())})")
    isas = [i for i in isas if i in _core.supported_isas()]
    reps, min_time = (3, 0.05) if args.quick else (5, 0.3)
    rng = np.random.default_rng(0)
    res = {"isa": _core.active_isa(), "gemm_isas": isas, "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
           "load_avg_at_start": os.getloadavg(),
           "note": "shared machine: timings are noisy; medians (and best) of repetitions",
           "ceilings": {}, "gemm": [], "decode_30_layers": []}

    # ---- ceilings: many short runs, so the "best" figure approaches the quiet
    # machine even when other processes share the cores
    buf = aligned(256 << 20)
    buf[:] = 1
    print(f"load average {os.getloadavg()[0]:.1f}, OMP_WAIT_POLICY={res['omp_wait_policy']}")
    print(f"ISA {res['isa']}; machine ceilings (median and best of runs):")
    for t in THREADS:
        bw = [_core.bench_bandwidth(buf, t, 1) for _ in range(reps + 2)]
        pk = [_core.bench_peak_int8(t, 1_000_000) for _ in range(10 * reps)]
        res["ceilings"][t] = {"read_GBps": statistics.median(bw) / 1e9, "read_GBps_best": max(bw) / 1e9,
                              "int8_GMACps": statistics.median(pk) / 1e9, "int8_GMACps_best": max(pk) / 1e9}
        c = res["ceilings"][t]
        print(f"  {t} thread(s): read {c['read_GBps']:6.1f} GB/s (best {c['read_GBps_best']:.1f}),"
              f" int8 peak {c['int8_GMACps']:6.1f} GMAC/s (best {c['int8_GMACps_best']:.1f})")
        for key, isa_name, fn, iters in (("vnni", "avx512vnni", _core.bench_peak_vnni, 1_000_000),
                                         ("amx", "amx", _core.bench_peak_amx, 20_000)):
            if isa_name not in _core.supported_isas():
                print(f"    {key} peak: skipped (this CPU cannot run {isa_name})")
                continue
            pv = [fn(t, iters) for _ in range(3 * reps)]
            c[f"{key}_GMACps"], c[f"{key}_GMACps_best"] = statistics.median(pv) / 1e9, max(pv) / 1e9
            print(f"    {key} int8 peak {c[key + '_GMACps']:8.1f} GMAC/s (best {c[key + '_GMACps_best']:.1f})")
        for key, zmm in (("fma_ymm", False), ("fma_zmm", True)):
            if zmm and "avx512vnni" not in _core.supported_isas():
                continue
            pf = [_core.bench_peak_fma(t, 2_000_000, zmm) for _ in range(3 * reps)]
            c[f"{key}_GFMAps"], c[f"{key}_GFMAps_best"] = statistics.median(pf) / 1e9, max(pf) / 1e9
            print(f"    fp32 {key[4:]} FMA peak {c[key + '_GFMAps']:8.1f} GFMA/s (best {c[key + '_GFMAps_best']:.1f})")
    if args.attention_only:
        bench_attention(res, isas, reps, buf)
        write_json(res, args.out)
        return
    del buf
    if args.ceilings_only:
        write_json(res, args.out)
        return

    # ---- BitNet-2B shapes
    hdr = (f"{'M x K':>11} {'N':>4} {'thr':>3} {'median ms':>10} {'best ms':>9} {'GOPS':>7} {'GMAC/s':>7} {'GB/s':>6}"
           f" {'%roof':>6} {'%peak':>6} {'%roofB':>6} {'%peakB':>6}")
    print("\nternary GEMM (GOPS = 2*M*K*N/t; %roof: roofline time max(MAC/peak, bytes/bw) / t; %peak: MAC rate /"
          " int8 peak;\n columns without B use medians, B = best run vs best ceilings)")
    print(hdr)
    for isa in isas:
        _core.set_isa(isa)
        # the int8 ceiling this ISA's kernels run on
        peak_key = {"amx": "amx", "avx512vnni": "vnni"}.get(isa, "int8")
        print(f"-- ISA {isa} (int8 ceiling: {peak_key} peak)")
        for (m, k) in SHAPES:
            w = random_packed(rng, m, k)
            for n in (NS if len(isas) == 1 else [1, 2, 4, 8, 32]):  # 2, 4: where AMX starts to pay
                x = rng.standard_normal((n, k)).astype(np.float32)
                q, s, sm = _core.quantize_act(x)
                for t in THREADS:
                    _core.set_num_threads(t)
                    med, best = timeit(lambda: _core.gemm(w, 1.0, q, s, sm), reps, min_time)
                    c = res["ceilings"][t]
                    macs, wbytes = m * pad_k(k) * n, w.nbytes
                    t_roof = max(macs / (c[peak_key + "_GMACps"] * 1e9), wbytes / (c["read_GBps"] * 1e9))
                    t_roof_b = max(macs / (c[peak_key + "_GMACps_best"] * 1e9), wbytes / (c["read_GBps_best"] * 1e9))
                    row = {"isa": isa, "M": m, "K": k, "N": n, "threads": t, "median_s": med, "best_s": best,
                           "GOPS": 2 * m * k * n / med / 1e9, "GMACps": macs / med / 1e9, "GBps": wbytes / med / 1e9,
                           "pct_roofline": 100 * t_roof / med, "pct_int8_peak": 100 * macs / med / (c[peak_key + "_GMACps"] * 1e9),
                           "pct_roofline_best": 100 * t_roof_b / best,
                           "pct_int8_peak_best": 100 * macs / best / (c[peak_key + "_GMACps_best"] * 1e9)}
                    res["gemm"].append(row)
                    print(f"{m:>5}x{k:<5} {n:>4} {t:>3} {med * 1e3:>10.3f} {best * 1e3:>9.3f} {row['GOPS']:>7.1f}"
                          f" {row['GMACps']:>7.1f} {row['GBps']:>6.1f} {row['pct_roofline']:>6.1f} {row['pct_int8_peak']:>6.1f}"
                          f" {row['pct_roofline_best']:>6.1f} {row['pct_int8_peak_best']:>6.1f}", flush=True)
    _core.set_isa(res["isa"])  # the rest runs on the dispatcher's (or --isa) choice

    # ---- decode: N = 1 over all 30 layers (working set >> LLC)
    if not args.quick:
        ws = [random_packed(rng, m, 2560) for _ in range(N_LAYERS) for m in LAYER_K2560]
        wd = [random_packed(rng, *LAYER_DOWN) for _ in range(N_LAYERS)]
        total = sum(a.nbytes for a in ws) + sum(a.nbytes for a in wd)
        q1, s1, sm1 = _core.quantize_act(rng.standard_normal((1, 2560)).astype(np.float32))
        q2, s2, sm2 = _core.quantize_act(rng.standard_normal((1, 6912)).astype(np.float32))
        one, one_d = [1.0] * len(ws), [1.0] * len(wd)

        def decode_pass():  # two calls: one parallel region per input width
            _core.gemm_multi(ws, one, q1, s1, sm1)
            _core.gemm_multi(wd, one_d, q2, s2, sm2)

        print(f"\nN=1 over all {N_LAYERS} layers ({total / 2**20:.0f} MiB of packed weights)")
        for isa, t in [(i, t) for i in isas for t in THREADS]:  # decode: every ISA (AVX-512 vs AVX2 GEMV)
            _core.set_isa(isa)
            _core.set_num_threads(t)
            med, best = timeit(decode_pass, 3, 1.0)
            bw = res["ceilings"][t]["read_GBps"]
            bwb = res["ceilings"][t]["read_GBps_best"]
            row = {"isa": isa, "threads": t, "bytes": total, "median_s": med, "best_s": best, "GBps": total / med / 1e9,
                   "GBps_best": total / best / 1e9, "pct_read_bw": 100 * total / med / 1e9 / bw,
                   "pct_read_bw_best": 100 * total / best / 1e9 / bwb}
            res["decode_30_layers"].append(row)
            print(f"  {isa:>10} {t} thread(s): {med * 1e3:.2f} ms (best {best * 1e3:.2f}) -> {row['GBps']:.1f} GB/s"
                  f" = {row['pct_read_bw']:.0f}% of measured read bandwidth ({bw:.1f} GB/s);"
                  f" best {row['pct_read_bw_best']:.0f}% of best ({bwb:.1f} GB/s)")

    _core.set_isa(res["isa"])

    # ---- lm_head GEMMs (a quarter of the 128256-row vocabulary: > LLC, less RAM)
    res["lm_head"] = []
    v, h = 32064, 2560
    w16 = (rng.standard_normal((v, h)) * 0.02).astype(np.float16).view(np.uint16)
    w8 = rng.integers(-127, 128, size=(v, h), dtype=np.int8)
    w8s = np.full(v, 0.01, np.float32)
    print(f"\nlm_head GEMMs, V={v} x H={h} (f16 {w16.nbytes / 2**20:.0f} MiB, i8 {w8.nbytes / 2**20:.0f} MiB)")
    for n in (1, 8, 32):
        x = rng.standard_normal((n, h)).astype(np.float32)
        q, s, _ = _core.quantize_act(x)
        for t in THREADS:
            _core.set_num_threads(t)
            for kind, fn, nbytes in (("f16", lambda: _core.gemm_f16(w16, x), w16.nbytes),
                                     ("i8", lambda: _core.gemm_i8(w8, w8s, q, s), w8.nbytes)):
                med, best = timeit(fn, 3, 0.3 if not args.quick else 0.1)
                row = {"kind": kind, "V": v, "H": h, "N": n, "threads": t, "median_s": med, "best_s": best,
                       "GBps": nbytes / med / 1e9, "GMACps": v * h * n / med / 1e9}
                res["lm_head"].append(row)
                print(f"  {kind:>3} N={n:<3} thr={t}: {med * 1e3:8.2f} ms (best {best * 1e3:.2f})"
                      f" {row['GBps']:6.1f} GB/s {row['GMACps']:6.1f} GMAC/s", flush=True)
    del w16, w8

    buf = aligned(256 << 20)
    buf[:] = 1
    bench_attention(res, isas, reps, buf)
    write_json(res, args.out)


def bench_small_ops(res: dict, threads: list[int], reps: int = 300) -> None:
    """Part 5: the small-op row drivers alone (see the module docstring)."""
    isa = _core.active_isa()
    res["small_ops"] = []
    print(f"\nsmall-op row drivers ({isa} table), median us per call; 'gemm' = rows written column-sliced by the "
          "whole team first, 'rows' = each row written by the thread that reads it; per forward = 90 add_norm_quant"
          " + 30 act_norm_quant calls (the 2B shape)")
    print(f"{'thr':>3} {'N':>3} {'layout':>6} {'empty':>7} {'add_nq':>7} {'act_nq':>7} {'per fwd ms':>10}")
    for t in threads:
        for n in (1, 8, 32):
            for layout in ("gemm", "rows"):
                g = layout == "gemm"
                us = {op: statistics.median(_core.bench_rows(op, isa, n, k, t, reps, g)) * 1e6
                      for op, k in (("empty", 2560), ("add_norm_quant", 2560), ("act_norm_quant", 6912))}
                fwd = (90 * us["add_norm_quant"] + 30 * us["act_norm_quant"]) / 1e3
                res["small_ops"].append({"threads": t, "N": n, "layout": layout, "us": us, "per_forward_ms": fwd})
                print(f"{t:>3} {n:>3} {layout:>6} {us['empty']:>7.1f} {us['add_norm_quant']:>7.1f}"
                      f" {us['act_norm_quant']:>7.1f} {fwd:>10.2f}", flush=True)


def write_json(res: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nwrote {path}")


# 2B attention: query heads, KV heads, head_dim; the cases (queries, cached, block size B)
ATT_HEADS, ATT_KV, ATT_HD = 20, 5, 128
ATT_CASES = [(1, 512, 1), (8, 512, 32), (32, 512, 32), (1, 2048, 1), (8, 2048, 32), (32, 2048, 32)]


def bench_attention(res: dict, isas: list[str], reps: int, evict: np.ndarray) -> None:
    """Part 4: attention alone, 30 layers per call, caches evicted (by reading `evict`) before each call."""
    res["attention"] = []
    rng = np.random.default_rng(1)
    ctxs = sorted({c for _, c, _ in ATT_CASES})
    caches = {}
    print(f"\nattention, {ATT_HEADS}/{ATT_KV} heads x {ATT_HD}, fp16 cache, {N_LAYERS} layers per call "
          "(floor = max(FMAs / fp32 FMA peak, K/V bytes / read bandwidth); % = floor / median)")
    print(f"{'isa':>10} {'q':>3} {'cached':>6} {'thr':>3} {'median ms':>10} {'best ms':>8} {'floor ms':>8}"
          f" {'bound':>5} {'%floor':>6}")
    for ctx in ctxs:
        cap = ctx + 32
        shape = (N_LAYERS, ATT_KV, cap, ATT_HD)
        caches[ctx] = tuple((rng.standard_normal(shape, dtype=np.float32) * 0.5).astype(np.float16).view(np.uint16)
                            for _ in range(2))
    for isa in isas:
        peak_key = "fma_ymm" if isa == "avx2" else "fma_zmm"
        for n, ctx, B in ATT_CASES:
            q = rng.standard_normal((n, ATT_HEADS * ATT_HD), dtype=np.float32)
            k = rng.standard_normal((n, ATT_KV * ATT_HD), dtype=np.float32)
            v = rng.standard_normal((n, ATT_KV * ATT_HD), dtype=np.float32)
            kc, vc = caches[ctx]
            keys = ctx + (n if B > 1 else 1)  # every fresh key of the block is visible (B >= n or n = 1)
            fmas = 2 * N_LAYERS * n * ATT_HEADS * keys * ATT_HD
            kv_bytes = 2 * N_LAYERS * ATT_KV * ctx * ATT_HD * 2
            for t in THREADS:
                _core.set_num_threads(t)
                c = res["ceilings"][t]
                if peak_key + "_GFMAps" not in c:
                    continue
                call = lambda: _core.attention(q, k, v, kc, vc, ctx, ctx, B, isa)  # noqa: E731
                call()
                ts = []
                for _ in range(max(reps, 5)):
                    evict.sum(dtype=np.uint64)  # the caches leave the LLC, as in a forward
                    t0 = time.perf_counter()
                    call()
                    ts.append(time.perf_counter() - t0)
                med, best = statistics.median(ts), min(ts)
                t_fma, t_bw = fmas / (c[peak_key + "_GFMAps"] * 1e9), kv_bytes / (c["read_GBps"] * 1e9)
                floor = max(t_fma, t_bw)
                row = {"isa": isa, "queries": n, "cached": ctx, "B": B, "threads": t, "median_s": med, "best_s": best,
                       "fmas": fmas, "kv_bytes": kv_bytes, "floor_s": floor,
                       "bound": "fma" if t_fma >= t_bw else "bw", "pct_floor": 100 * floor / med,
                       "pct_floor_best": 100 * floor / best}
                res["attention"].append(row)
                print(f"{isa:>10} {n:>3} {ctx:>6} {t:>3} {med * 1e3:>10.3f} {best * 1e3:>8.3f} {floor * 1e3:>8.3f}"
                      f" {row['bound']:>5} {row['pct_floor']:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
