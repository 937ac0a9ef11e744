"""A/B of attention alone between two builds of _core, in one process.

    OPENBLAS_NUM_THREADS=1 python bench/attn_ab.py A/_core*.so B/_core*.so [--threads 1] [--reps 15]
        [--isa avx512] [--cases 1x512,8x512,32x512,1x2048,8x2048,32x2048]

Both extension files are loaded side by side (bench/ab_builds.py; the same build may be
named twice; a base: e.g. a `git archive` of the base commit built with
scripts/dev_build.sh). Each case (queries x cached keys, the 2B shape and the 30
layers' fp16 caches of bench/kernels.py part 4; B = 32, decode B = 1) runs `reps` pairs
of calls, A then B, the order alternating, the caches evicted (a 320 MB read) before
every call; prints both medians, their ratio and the median of the paired ratios. On
a shared machine the pairs see the same load, which separate runs of bench/kernels.py
do not. OPENBLAS_NUM_THREADS=1: numpy's OpenBLAS threads otherwise spin beside the
OpenMP team on a 2-core machine (calls of ~230 ms); OMP_WAIT_POLICY=PASSIVE helps
there at 2 threads too.
"""
import argparse
import statistics
import time

import numpy as np

from ab_builds import load_builds  # bench/ab_builds.py

ap = argparse.ArgumentParser()
ap.add_argument("a")
ap.add_argument("b")
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--reps", type=int, default=15)
ap.add_argument("--isa", default="avx512")
ap.add_argument("--cases", default="1x512,8x512,32x512,1x2048,8x2048,32x2048")
args = ap.parse_args()
mods = load_builds((args.a, args.b), args.threads)
rng = np.random.default_rng(1)
L, KV, HD, H = 30, 5, 128, 20
ev = np.ones(320 << 20 >> 3, dtype=np.uint64)
print(f"isa {args.isa}, {args.threads} threads, {args.reps} paired reps (A then B, alternating), caches evicted")
print(f"{'case':>8} {'A ms':>9} {'B ms':>9} {'B/A':>6} {'paired':>7}")
caches = {}
for c in args.cases.split(","):
    n, ctx = map(int, c.split("x"))
    if ctx not in caches:
        caches[ctx] = tuple((rng.standard_normal((L, KV, ctx + 32, HD), dtype=np.float32) * 0.5)
                            .astype(np.float16).view(np.uint16) for _ in range(2))
    kc, vc = caches[ctx]
    q = rng.standard_normal((n, H * HD), dtype=np.float32)
    k = rng.standard_normal((n, KV * HD), dtype=np.float32)
    v = rng.standard_normal((n, KV * HD), dtype=np.float32)
    B = 1 if n == 1 else 32
    ts = [[], []]
    for m in mods:
        m.attention(q, k, v, kc, vc, ctx, ctx, B, args.isa)
    for r in range(args.reps):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            ev.sum()
            t0 = time.perf_counter()
            mods[i].attention(q, k, v, kc, vc, ctx, ctx, B, args.isa)
            ts[i].append(time.perf_counter() - t0)
    a, b = statistics.median(ts[0]) * 1e3, statistics.median(ts[1]) * 1e3
    pr = statistics.median(y / x for x, y in zip(ts[0], ts[1]))
    print(f"{c:>8} {a:9.3f} {b:9.3f} {b / a:6.3f} {pr:7.3f}", flush=True)
