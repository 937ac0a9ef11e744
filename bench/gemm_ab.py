"""A/B of the ternary GEMMs between builds of _core, in one process.

    OPENBLAS_NUM_THREADS=1 python bench/gemm_ab.py A/_core*.so B/_core*.so [C/_core*.so ...]
        [--threads 1] [--n 1] [--isa avx512vnni] [--reps 9]

The 30 layers of the BitNet-2B shape (~520 MB of packed weights: far more than any
LLC, so the weights come from DRAM as in a forward), called as the forward calls
them: per layer q/k/v in one multi-GEMM, o, gate/up in one, down; N tokens of
activations. Every build's extension is loaded side by side (bench/ab_builds.py; a
build's .so from anywhere, e.g. one of `git worktree add` + scripts/dev_build.sh); each repetition runs every build once, the order reversed
every other repetition, so on a shared machine the builds see the same load. Prints
each build's median, its GB/s of weights and its ratio to the first build's median.
The outputs of the builds are compared first (exact int32 arithmetic: they must
be equal). Never imports torch.
"""
import argparse
import statistics
import time

import numpy as np

from ab_builds import load_builds  # bench/ab_builds.py
from kernels import LAYER_DOWN, LAYER_K2560, N_LAYERS, random_packed  # bench/kernels.py


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("builds", nargs="+", help="_core extension files (two or more)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=1, help="tokens (1: decode)")
    ap.add_argument("--isa", default="", help="kernel table by name (default: each build's choice)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--layers", type=int, default=N_LAYERS, help="fewer: a smoke run (the weights fit caches)")
    a = ap.parse_args()
    layers = a.layers
    mods = load_builds(a.builds, a.threads, a.isa)
    rng = np.random.default_rng(0)
    ws = [random_packed(rng, m, 2560) for _ in range(layers) for m in LAYER_K2560]
    wd = [random_packed(rng, *LAYER_DOWN) for _ in range(layers)]
    total = sum(x.nbytes for x in ws) + sum(x.nbytes for x in wd)
    x1 = rng.standard_normal((a.n, 2560)).astype(np.float32)
    x2 = rng.standard_normal((a.n, 6912)).astype(np.float32)
    acts = [(m.quantize_act(x1), m.quantize_act(x2)) for m in mods]

    def run(i: int, keep: bool = False):
        m, ((q1, s1, u1), (q2, s2, u2)) = mods[i], acts[i]
        outs = []
        for l in range(layers):
            w = ws[6 * l:6 * l + 6]
            for group, q, s, u in ((w[0:3], q1, s1, u1), (w[3:4], q1, s1, u1), (w[4:6], q1, s1, u1),
                                   (wd[l:l + 1], q2, s2, u2)):
                r = m.gemm_multi(group, [1.0] * len(group), q, s, u)
                if keep and l == layers - 1:
                    outs += list(r)
        return outs

    ref = run(0, keep=True)
    for i in range(1, len(mods)):
        if not all(np.array_equal(x, y) for x, y in zip(ref, run(i, keep=True))):
            print(f"{a.builds[i]}: outputs differ from {a.builds[0]}'s")
            return 1
    ts = [[] for _ in mods]
    for r in range(a.reps):
        for i in (range(len(mods)) if r % 2 == 0 else reversed(range(len(mods)))):
            t0 = time.perf_counter()
            run(i)
            ts[i].append(time.perf_counter() - t0)
    base = statistics.median(ts[0])
    print(f"{layers} layers' GEMMs ({total / 2**20:.0f} MiB), N={a.n}, {a.threads} threads, "
          f"isa {a.isa or 'default'}, {a.reps} reps (order alternating)")
    for so, t in zip(a.builds, ts):
        med = statistics.median(t)
        print(f"  {so}: {med * 1e3:8.2f} ms  {total / med / 1e9:6.1f} GB/s  x{med / base:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
