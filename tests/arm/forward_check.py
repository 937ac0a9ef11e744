"""The forward tests' models and transformers references, checked on an aarch64 build.

No torch runs under emulation here (PyPI's aarch64 torch wheel needs CUDA
libraries), so the references are made on the x86 side and carried over:

    # x86-64, torch + transformers installed: write the cases
    PYTHONPATH=python:tests python3 tests/arm/forward_check.py export /tmp/arm_cases
    # aarch64 Python with bitdlm installed (e.g. under qemu-aarch64): check them
    OMP_NUM_THREADS=2 python3 tests/arm/forward_check.py check /tmp/arm_cases

scripts/arm_emulated_install.sh does both, at 1 and 2 threads (8 s each in the
emulated Debian arm64 there, 2026-12-07; an earlier run through
`qemu-aarch64 -L` with a cross-built module crawled at 2 threads, not
diagnosed and not seen since). The threaded GEMM drivers are also checked
under qemu by tests/arm/harness.cpp (3 threads) and tests/test_kernels.py.

A case is one of tests/test_forward.py's SHAPES with both lm_heads, its
_core.Model arguments (built by forward_models.to_core straight from the HF
weights), a causal sequence and a block prefill + diffusion step (B = 8) with
transformers' logits, and the rows that see no round-half tie. `check` runs
every ISA level the CPU supports and asserts what test_forward asserts
(1e-3 and the same argmax on tie-free rows, 5% elsewhere, argmax >= 90%),
that every level is within 1e-4 relative of scalar on tie-free rows, and that
neon, dotprod and i8mm give identical logits with the int8 lm_head (their
ternary / int8 GEMMs are bit-exact and they share the NEON attention and the
small ops).
"""
from __future__ import annotations

import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

B, P = 8, 20  # block size; the prefix ends inside a block (test_block_prefill_and_step_match_transformers)


def export(out: Path):
    import types

    import forward_models as fm
    import test_forward as tf
    from transformers import DynamicCache

    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, shape in tf.SHAPES.items():
        hf = tf.make_hf(shape, seed=len(name))
        hf.ties = tf.Ties(hf)
        V = hf.config.vocab_size
        # the sequences test_forward draws (its seeds are chosen so that most rows are tie-free)
        rng = np.random.default_rng(0)
        causal = [rng.integers(0, V, L) for L in (1, 7, 64)][-1]
        hf.ties.reset()
        ref_causal = tf.hf_logits(hf, causal)
        clean_causal = hf.ties.clean(range(len(causal)), 1)
        pos = np.arange(P, P + B)
        for seed in range(1, 9):  # test_block_prefill_and_step_match_transformers's pick: no tie in the first block
            rng = np.random.default_rng(seed)
            prefix, blk = rng.integers(0, V, P), rng.integers(0, V, B)
            hf.ties.reset()
            cache = DynamicCache(config=hf.config)
            ref_pre = tf.hf_logits(hf, prefix, mask=tf.block_mask(range(P), range(P), B), cache=cache)
            ref_step = tf.hf_logits(hf, blk, positions=pos, mask=tf.block_mask(pos, np.arange(P + B), B), cache=cache)
            if hf.ties.clean(pos, B).mean() >= 0.5:
                break
        clean_pre, clean_step = hf.ties.clean(range(P), B), hf.ties.clean(pos, B)
        for lm_head in ("f16", "i8"):
            # to_core's _core.Model(...) arguments, captured instead of building the model
            real = fm._core
            fm._core = types.SimpleNamespace(Model=lambda *args: args)
            try:
                buf, meta, tensors, _, _ = fm.to_core(hf, lm_head=lm_head)
            finally:
                fm._core = real
            key = f"{name}-{lm_head}"
            (out / f"{key}.bin").write_bytes(buf)
            (out / f"{key}.json").write_text(json.dumps({"meta": meta, "tensors": tensors}))
            cases.append(key)
            with open(out / f"{key}.pkl", "wb") as f:
                pickle.dump(dict(causal=causal, prefix=prefix, blk=blk, ref_causal=ref_causal, ref_pre=ref_pre,
                                 ref_step=ref_step, clean_causal=clean_causal, clean_pre=clean_pre,
                                 clean_step=clean_step), f)
    (out / "cases.json").write_text(json.dumps(cases))
    print(f"wrote {len(cases)} cases to {out}")


def close_ref(got, ref, clean, what):
    assert clean.mean() >= 0.5, f"{what}: too few tie-free rows"
    err = float(np.abs(got[clean] - ref[clean]).max())
    assert err <= 1e-3, f"{what}: max abs diff {err} on tie-free rows"
    assert (got[clean].argmax(-1) == ref[clean].argmax(-1)).all(), f"{what}: argmax differs on a tie-free row"
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max(), what
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9, what
    return err


def run_case(_core, key, src, isa):
    info = json.loads((src / f"{key}.json").read_text())
    tensors = {k: tuple(v) for k, v in info["tensors"].items()}
    core = _core.Model((src / f"{key}.bin").read_bytes(), info["meta"], tensors, 1 << 30, "f32")
    with open(src / f"{key}.pkl", "rb") as f:
        c = pickle.load(f)
    _core.set_isa(isa)

    def logits(tokens, Bk, seq=None, start=0, ctx_len=0, write=True):
        own = seq is None
        seq = core.alloc_seq(64) if own else seq
        try:
            out = np.arange(len(tokens), dtype=np.int32)
            return core.forward([(seq, np.asarray(tokens, np.int32), start, ctx_len, write, out)], Bk, "logits")
        finally:
            if own:
                core.free_seq(seq)

    got = {"causal": logits(c["causal"], 1)}
    seq = core.alloc_seq(64)
    try:
        got["pre"] = logits(c["prefix"], B, seq=seq)
        got["step"] = logits(c["blk"], B, seq=seq, start=P, ctx_len=P, write=False)
    finally:
        core.free_seq(seq)
    clean = {k: c[f"clean_{k}"] for k in got}
    if key.endswith("-i8"):  # transformers has no int8 head: within 3% of the fp16 head (test_forward's bound)
        return got, clean, None
    errs = [close_ref(got[k], c[f"ref_{k}"], clean[k], f"{key} {isa} {k}") for k in got]
    return got, clean, max(errs)


def main():
    mode, path = sys.argv[1], Path(sys.argv[2])
    if mode == "export":
        return export(path)
    import platform

    from bitdlm import _core

    t0 = time.time()
    isas = _core.supported_isas()
    arm = platform.machine() in ("aarch64", "arm64")
    print(f"{platform.machine()}: supported {isas}")
    f16 = {}
    for key in json.loads((path / "cases.json").read_text()):
        per_isa = {isa: run_case(_core, key, path, isa) for isa in isas}
        base = per_isa["scalar"][0]
        for isa, (got, clean, _) in per_isa.items():
            for k in got:
                # (tie-free rows: elsewhere a different rounding may flip a code)
                d = float(np.abs(got[k][clean[k]] - base[k][clean[k]]).max())
                assert d <= 1e-4 * float(np.abs(base[k]).max()), f"{key} {isa} {k}: {d} from scalar"
                if key.endswith("-i8"):
                    # the ARM levels share attention and small ops and their int8 GEMMs are exact:
                    # identical logits (x86's AVX2 / AVX-512 levels each have their own attention)
                    if arm and isa != "scalar":
                        assert np.array_equal(got[k], per_isa["neon"][0][k]), f"{key} {isa} {k}: differs from neon"
                    ref = f16[key[:-3]][k]
                    assert np.abs(got[k] - ref).max() < 0.03 * np.abs(ref).max(), f"{key} {isa} {k}: far from fp16"
                    assert (got[k].argmax(-1) == ref.argmax(-1)).mean() >= 0.9, f"{key} {isa} {k}: argmax"
        if key.endswith("-f16"):
            f16[key[:-4]] = base
            print(f"{key}: max|diff| vs transformers " + ", ".join(f"{i} {e:.1e}" for i, (_, _, e) in per_isa.items()))
        else:
            same = "neon, dotprod and i8mm identical, " if arm else ""
            print(f"{key}: {same}every level within 1e-4 of scalar and 3% of the fp16 head")
    print(f"OK ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
