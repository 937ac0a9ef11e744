"""Ternary GEMMs per 2B shape (or the int8 lm_head) on one core: this tree's kernels, optionally beside another checkout's.

    python bench/vnni_tiles.py [--isa avx512vnni] [--base /path/to/other/python] [--rounds 3] [--reps 15]
        [--lm [--vocab 32064]] [--threads 1]

Times `gemm_multi` (one matrix, 1 thread, the dispatcher's job loop) on the
2B shapes (2560x2560, 6912x2560, 2560x6912) at N = 8, 16, 32 tokens: min over
--reps calls, activations from `quantize_act` (64-byte aligned). With --base
(the `python` folder of another build, e.g. the main checkout) each round runs
one worker process per tree, alternating, so a shared machine's noise hits
both; the min over rounds is printed per shape with the ratio base / this.
Random codes 0..3 (timing only, never checked). Never imports torch.
--lm times `gemm_i8` instead: by default a quarter of the 2B int8 lm_head
(--vocab 32064 x 2560, 82 MB, past any cache) at N = 1, 8, 16, 32, random int8
weights. --threads: for the whole machine (e.g. --lm --vocab 128256 --threads 16).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = [(2560, 2560), (6912, 2560), (2560, 6912)]
NS = [8, 16, 32]


LM_K, LM_NS = 2560, [1, 8, 16, 32]


def timed(f, reps: int) -> float:
    f()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def worker(isa: str, reps: int, lm: bool, vocab: int, threads: int) -> None:
    import numpy as np
    from bitdlm import _core

    _core.set_isa(isa)
    _core.set_num_threads(threads)
    rng = np.random.default_rng(0)
    res = {}
    if lm:
        m, k = vocab, LM_K
        w8 = rng.integers(-127, 128, size=(m, k), dtype=np.int8)
        ws = np.full(m, 0.01, np.float32)
        for n in LM_NS:
            q, s, _ = _core.quantize_act(rng.standard_normal((n, k)).astype(np.float32))
            res[f"{m}x{k} N={n}"] = timed(lambda: _core.gemm_i8(w8, ws, q, s), reps)
        print(json.dumps(res))
        return
    for m, k in SHAPES:
        w = rng.integers(0, 256, size=(m, (k + 127) // 128 * 32), dtype=np.uint8)
        for n in NS:
            q, s, sm = _core.quantize_act(rng.standard_normal((n, k)).astype(np.float32))
            res[f"{m}x{k} N={n}"] = timed(lambda: _core.gemm_multi([w], [1.0], q, s, sm), reps)
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--isa", default="avx512vnni")
    ap.add_argument("--base", default="", help="the python folder of another build to time beside this one")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--lm", action="store_true", help="time the int8 lm_head instead of the ternary GEMMs")
    ap.add_argument("--vocab", type=int, default=32064, help="lm_head rows with --lm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.isa, a.reps, a.lm, a.vocab, a.threads)
    trees = {"this": os.path.join(HERE, "..", "python")}
    if a.base:
        trees["base"] = a.base
    best: dict[str, dict[str, float]] = {t: {} for t in trees}
    for _ in range(a.rounds):
        for tag, path in trees.items():
            env = dict(os.environ, PYTHONPATH=path)
            args = ["--worker", "--isa", a.isa, "--reps", str(a.reps), "--vocab", str(a.vocab), "--threads",
                    str(a.threads)] + ["--lm"] * a.lm
            out = subprocess.run([sys.executable, __file__] + args,
                                 env=env, check=True, capture_output=True, text=True).stdout
            for key, ms in json.loads(out).items():
                best[tag][key] = min(best[tag].get(key, float("inf")), ms)
    print(f"{a.isa}, {a.threads} thread(s), ms (min of {a.rounds} x {a.reps})")
    for key, ms in best["this"].items():
        m, k = (int(v) for v in key.split()[0].split("x"))
        n = int(key.split("=")[1])
        gmacs = m * (k if a.lm else (k + 127) // 128 * 128) * n / ms / 1e6
        line = f"{key:>18} this {ms:7.3f} ({gmacs:4.0f} G MAC/s" + (f", {m * k / ms / 1e6:5.1f} GB/s)" if a.lm else ")")
        if "base" in best:
            line += f"  base {best['base'][key]:7.3f}  base/this {best['base'][key] / ms:4.2f}x"
        print(line)


if __name__ == "__main__":
    main()
