"""A/B of whole forwards between builds of _core, in one process, on one model file.

    OPENBLAS_NUM_THREADS=1 python bench/forward_ab.py A/_core*.so B/_core*.so [...] [--model M.bin]
        [--threads 1] [--reps 9] [--cases decode_ctx512,sub8_ctx512,block32_ctx512_out8] [--isa NAME]

Every build's extension is loaded side by side (bench/ab_builds.py; a build's .so from
anywhere, e.g. one of `git worktree add` + scripts/dev_build.sh) and builds its own
`_core.Model` over the same memory-mapped file (one page cache).
Each builds its KV cache the same way (a chunked prefill of the context); then,
per case, each repetition runs one forward of every build, the order reversed every
other repetition, so on a shared machine (other tenants' DRAM traffic, the clock)
the builds see the same conditions, which separate runs of bench/forward.py do not.
Prints each build's median ms per case and its ratio to the first build's, and
whether the builds selected the same tokens. Default model: bench/forward.py's
2B-shaped synthetic one (int8 lm_head) in /tmp/bitdlm_fwd. Never imports torch.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from ab_builds import load_builds  # bench/ab_builds.py

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(HERE, "..", "python"))

CASES = {  # name: (tokens, cached positions, block size, outputs) as bench/forward.py
    "decode_ctx512": (1, 512, 1, 1),
    "decode_ctx2048": (1, 2048, 1, 1),
    "sub8_ctx512": (8, 512, 32, 8),
    "block32_ctx512_out8": (32, 512, 32, 8),
    "block32_ctx2048_out8": (32, 2048, 32, 8),
    "prefill512_b1": (512, 0, 1, 1),  # a prompt from nothing, causal (AR requests' prefill)
    "prefill512_b32": (512, 0, 32, 1),  # the same block-causal (diffusion requests')
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("builds", nargs="+")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--cases", default="decode_ctx512,sub8_ctx512,block32_ctx512_out8")
    ap.add_argument("--isa", default="", help="kernel table by name for every build (default: each one's choice)")
    a = ap.parse_args()
    from bitdlm.format import ModelFile  # (the pure-Python reader: no _core needed)

    import forward  # bench/forward.py: the synthetic model

    cases = {}
    for c in a.cases.split(","):
        if c not in CASES:
            raise SystemExit(f"unknown case {c!r} (known: {', '.join(CASES)})")
        cases[c] = CASES[c]
    path = a.model or forward.ensure_model("/tmp/bitdlm_fwd", "i8")
    f = ModelFile.open(path)
    meta = f.meta
    tensors = f.core_tensors()
    ctx_max = max(ctx for _, ctx, _, _ in cases.values())
    cap = max(ctx + n for n, ctx, _, _ in cases.values()) + 64
    rng = np.random.default_rng(0)
    V = int(meta["vocab_size"])
    prefill = rng.integers(4, V, ctx_max).astype(np.int32)
    fresh = {c: rng.integers(4, V, n).astype(np.int32) for c, (n, _, _, _) in cases.items()}
    runs = []
    for mod in load_builds(a.builds, isa=a.isa):
        m = mod.Model(f.buffer, meta, tensors, 4 << 30, "f16")
        m.threads = a.threads
        sid = m.alloc_seq(cap)
        for s in range(0, ctx_max, 256):  # the cache written for real, as bench/forward.py
            n = min(256, ctx_max - s)
            m.forward([(sid, prefill[s:s + n], s, s, True, np.array([n - 1], np.int32))], 1, "select")
        runs.append((m, sid))
    print(f"{os.path.basename(path)}, {a.threads} threads, {a.reps} reps (order alternating), isa "
          f"{a.isa or 'default'}")
    same = True
    for c, (n, ctx, B, n_out) in cases.items():
        ts = [[] for _ in runs]
        toks = []
        for r in range(-1, a.reps):  # r = -1: warm-up
            for i in (range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))):
                m, sid = runs[i]
                item = (sid, fresh[c], ctx, ctx, False, np.arange(n - n_out, n, dtype=np.int32))
                t = time.perf_counter()
                out = m.forward([item], B, "select", banned=[0])
                if r >= 0:
                    ts[i].append(time.perf_counter() - t)
                elif len(toks) < len(runs):
                    toks.append(np.asarray(out[0]).copy())
        same &= all(np.array_equal(toks[0], x) for x in toks[1:])
        base = statistics.median(ts[0])
        print(f"{c}:")
        for so, t in zip(a.builds, ts):
            med = statistics.median(t)
            print(f"  {so}: {med * 1e3:8.2f} ms  x{med / base:.3f}")
    print("same tokens selected by every build:", same)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
