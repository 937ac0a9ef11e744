"""The same small forward under every ISA >= avx2 (and every AMX kernel variant):
logits must agree across ISAs. Their ternary/int8 GEMMs are bit-exact against
the scalar reference and, today, they share the AVX2 attention and small ops,
so the expected difference is exactly zero; an ISA pair that gains its own
attention or small ops (e.g. AVX-512 attention) gets an explicit tolerance in
TOLERANCE below. On a machine where tests/test_forward.py fails against
transformers under one ISA, this says whether that ISA's kernels are the cause.
"""
from __future__ import annotations

import numpy as np
import pytest

from bitdlm import _core
from test_forward import SHAPES, core_logits, make_hf, to_core

ISAS = [i for i in _core.supported_isas() if i != "scalar"]  # avx2 and up
# (isa, isa) -> max abs logit difference allowed; absent pairs must be bit-identical
TOLERANCE: dict[tuple[str, str], float] = {}
AMX_VARIANTS = range(8)  # csrc/kernels/isa.h: bit flags


def _runs():
    out = [(isa, 0) for isa in ISAS]
    if "amx" in ISAS:
        out += [("amx", v) for v in AMX_VARIANTS if v]
    return out


@pytest.fixture(scope="module", params=[("gqa4_hd32", "f16"), ("gqa2_hd64_untied", "f16"), ("gqa4_hd32", "i8")],
                ids=lambda p: "-".join(p))
def model(request):
    shape, lm_head = request.param
    return to_core(make_hf(SHAPES[shape], seed=len(shape)), lm_head=lm_head), SHAPES[shape][5]


def test_logits_identical_across_isas(model):
    core, V = model
    if len(ISAS) < 2:
        pytest.skip(f"only {ISAS} here: nothing to compare (AVX-512/AMX run on the device)")
    rng = np.random.default_rng(1)
    prev_isa, prev_var, prev_thr = _core.active_isa(), _core.get_amx_variant(), _core.get_max_threads()
    prev_min = _core.amx_min_tokens()
    logits = {}
    try:
        _core.set_num_threads(2)
        _core.set_amx_min_tokens(2)  # AMX tiles for every multi-token GEMM, not only >= 16 tokens
        toks = {L: rng.integers(0, V, L) for L in (1, 7, 33, 64)}
        for isa, v in _runs():
            _core.set_isa(isa)
            _core.set_amx_variant(v)
            logits[(isa, v)] = {L: core_logits(core, t) for L, t in toks.items()}
    finally:
        _core.set_isa(prev_isa)
        _core.set_amx_variant(prev_var)
        _core.set_num_threads(prev_thr)
        _core.set_amx_min_tokens(prev_min)
    ref = logits[(ISAS[0], 0)]
    for (isa, v), got in logits.items():
        tol = TOLERANCE.get((ISAS[0], isa), TOLERANCE.get((isa, ISAS[0]), 0.0))
        for L in toks:
            assert got[L].shape == ref[L].shape
            err = float(np.abs(got[L] - ref[L]).max())
            if tol == 0.0:
                assert np.array_equal(got[L], ref[L]), f"{isa} variant {v} vs {ISAS[0]}, {L} tokens: max diff {err}"
            else:
                assert err <= tol, f"{isa} variant {v} vs {ISAS[0]}, {L} tokens: max diff {err} > {tol}"


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


def test_amx_variant_setter_range():
    prev = _core.get_amx_variant()
    try:
        for v in range(8):
            _core.set_amx_variant(v)
            assert _core.get_amx_variant() == v
        for bad in (-1, 8):
            with pytest.raises(ValueError, match="AMX variant"):
                _core.set_amx_variant(bad)
        assert _core.get_amx_variant() == 7  # a refused value changes nothing
    finally:
        _core.set_amx_variant(prev)
