"""The same small forward under every ISA >= avx2 (and, in bench builds, the AMX kernel variants):
logits must agree across ISAs. The ternary/int8 GEMMs of every ISA are
bit-exact against the scalar reference, so ISAs that also share the model's
attention / small-op / sampling tables must give bit-identical logits; ISAs
with different model tables (the AVX-512 attention sums exp() in another
order than the AVX2 one) agree within an explicit tolerance. On a machine
where tests/test_forward.py fails against transformers under one ISA, this
says whether that ISA's kernels are the cause.
"""
from __future__ import annotations

import numpy as np
import pytest

from bitdlm import _core
from forward_models import SHAPES, core_logits, make_hf, to_core

pytestmark = pytest.mark.torch

ISAS = [i for i in _core.supported_isas() if i != "scalar"]  # avx2 and up
# Which model-op tables (csrc/model/attention.cpp, smallops.cpp, sampling.cpp:
# their IsaTables lists) each kernel ISA runs: avx512, avx512vnni and amx all use
# the AVX-512 attention and small ops, so within a group the only differences
# are the GEMM kernels, which must be bit-exact.
MODEL_TABLES = {"avx2": "avx2", "avx512": "avx512", "avx512vnni": "avx512", "amx": "avx512"}
# Across groups: max |diff| <= CROSS_TOL * max |logit| (measured on the Sapphire
# Rapids machine: 1.5e-5 absolute on logits of magnitude ~1-10). A GEMM bug
# (a wrong tile, a lost block) moves logits by far more.
CROSS_TOL = 1e-4


def _runs():
    """(isa, AMX variant): every ISA with its shipped kernels (variant None), then in bench
    builds (csrc/bench/ compiled in) the bench-only AMX variants."""
    from test_kernels import AMX_VARIANTS

    out = [(isa, None) for isa in ISAS]
    if "amx" in ISAS:
        out += [("amx", v) for v in AMX_VARIANTS if v is not None]
    return out


# (shape, lm_head, embedding)
@pytest.fixture(scope="module", params=[("gqa4_hd32", "f16", "f16"), ("gqa2_hd64_untied", "f16", "f16"),
                                        ("gqa4_hd32", "i8", "f16"), ("gqa4_hd32", "i8", "i8")],
                ids=lambda p: "-".join(p))
def model(request):
    pytest.importorskip("torch")  # the oracle weights come from transformers' BitNet
    pytest.importorskip("transformers")
    shape, lm_head, embedding = request.param
    return (to_core(make_hf(SHAPES[shape], seed=len(shape)), lm_head=lm_head, embedding=embedding),
            SHAPES[shape][5])


@pytest.mark.native
def test_logits_identical_across_isas(model):
    core, V = model
    if len(ISAS) < 2:
        pytest.skip(f"only {ISAS} here: nothing to compare (AVX-512/AMX run on the device)")
    rng = np.random.default_rng(1)
    from test_kernels import amx_variant

    prev_isa, prev_thr = _core.active_isa(), _core.get_max_threads()
    prev_min = _core.amx_min_tokens()
    logits = {}
    try:
        _core.set_num_threads(2)
        _core.set_amx_min_tokens(2)  # AMX tiles for every multi-token GEMM, not only >= kAmxMinTokens (8)
        toks = {L: rng.integers(0, V, L) for L in (1, 7, 33, 64)}
        for isa, v in _runs():
            _core.set_isa(isa)
            with amx_variant(v):
                logits[(isa, v)] = {L: core_logits(core, t) for L, t in toks.items()}
    finally:
        _core.set_isa(prev_isa)
        _core.set_num_threads(prev_thr)
        _core.set_amx_min_tokens(prev_min)
    # one reference per model-table group (its first ISA, default variant); within a
    # group bit-identical, between groups within CROSS_TOL
    refs: dict[str, tuple[str, dict]] = {}
    for (isa, v), got in logits.items():
        grp = MODEL_TABLES[isa]
        if grp not in refs:
            refs[grp] = (isa, got)
            continue
        ref_isa, ref = refs[grp]
        for L in toks:
            assert got[L].shape == ref[L].shape
            err = float(np.abs(got[L] - ref[L]).max())
            assert np.array_equal(got[L], ref[L]), f"{isa} variant {v} vs {ref_isa}, {L} tokens: max diff {err}"
    groups = list(refs.values())
    for ref_isa, ref in groups[1:]:
        base_isa, base = groups[0]
        for L in toks:
            scale = float(np.abs(base[L]).max())
            err = float(np.abs(ref[L] - base[L]).max())
            assert err <= CROSS_TOL * scale, \
                f"{ref_isa} vs {base_isa}, {L} tokens: max diff {err} > {CROSS_TOL} x {scale}"


def test_model_table_groups_cover_every_isa():
    assert set(ISAS) <= set(MODEL_TABLES), f"add the new ISA to MODEL_TABLES: {ISAS}"


def test_amx_min_tokens_setter():
    prev = _core.amx_min_tokens()
    try:
        _core.set_amx_min_tokens(3)
        assert _core.amx_min_tokens() == 3
        with pytest.raises(ValueError, match="min tokens"):
            _core.set_amx_min_tokens(0)
        assert _core.amx_min_tokens() == 3
    finally:
        _core.set_amx_min_tokens(prev)


@pytest.mark.skipif(not _core.build_info().get("bench_kernels"),
                    reason="bench-only kernels not built (BITDLM_BENCH_KERNELS=1 scripts/dev_build.sh)")
def test_amx_variant_setter_range():
    # bits 1 8 16 32 64 128 256; 256 (stream depth 3) only with 128 (the stream)
    ok = [v for v in range(512) if not v & ~(1 | 8 | 16 | 32 | 64 | 128 | 256) and (v & 128 or not v & 256)]
    try:
        for v in ok:
            _core.set_amx_variant(v)
            assert _core.get_amx_variant() == v
        # static schedule / 32-token jobs bits are gone; deep without the stream; no bit above 256
        for bad in (-1, 2, 4, 256, 256 | 49, 512, 1024 | 49):
            with pytest.raises(ValueError, match="AMX variant"):
                _core.set_amx_variant(bad)
        assert _core.get_amx_variant() == ok[-1]  # a refused value changes nothing
    finally:
        _core.set_amx_variant(49)
