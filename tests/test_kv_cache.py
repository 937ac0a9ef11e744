"""The KV cache's memory is not zeroed at alloc_seq (KvCache::prepare): a forward that
reads positions nothing wrote still sees zeros, whatever the memory held before, and the
engine never reads a position it has not written (so nothing is ever zeroed for it)."""
from __future__ import annotations

import numpy as np
import pytest

import bitdlm
from bitdlm import SamplingParams
from bitdlm.data import default_model_path


@pytest.fixture(scope="module")
def model():
    return bitdlm.load(default_model_path(), threads=1)


def _probe(core, fill):
    """Write `fill`'s K/V into a sequence, free it, then read a new sequence of the same
    capacity (glibc hands the freed memory back) at positions nothing wrote."""
    rng = np.random.default_rng(fill)
    a = core.alloc_seq(64)
    toks = rng.integers(4, 1000, 48).astype(np.int32)
    core.forward([(a, toks, 0, 0, True, np.zeros(1, np.int32))], 8, "logits")
    core.free_seq(a)
    b = core.alloc_seq(64)
    try:
        z0 = core.kv_zero_filled()
        # reads cached [0, 16) and [24, 40): never written in this sequence
        got = core.forward([(b, np.arange(8, 16, dtype=np.int32), 16, 40, False, np.arange(8, dtype=np.int32))],
                           8, "logits")
        assert core.kv_zero_filled() - z0 == 40  # [0, ctx_len) zeroed once ...
        again = core.forward([(b, np.arange(8, 16, dtype=np.int32), 16, 40, False,
                               np.arange(8, dtype=np.int32))], 8, "logits")
        assert core.kv_zero_filled() - z0 == 40  # ... and not again
        np.testing.assert_array_equal(got, again)
        return got
    finally:
        core.free_seq(b)


def test_unwritten_positions_read_as_zeros(model):
    core = model._core
    ref = _probe(core, 1)
    for fill in (2, 3):  # other garbage before: the same logits (zeros were read, not the old K/V)
        np.testing.assert_array_equal(_probe(core, fill), ref)


def test_write_past_unwritten_gap(model):
    """A write that starts past the written prefix zeroes the gap below it, and later reads
    of the gap see zeros; positions written later are read as written."""
    core = model._core
    rng = np.random.default_rng(7)
    toks = rng.integers(4, 1000, 8).astype(np.int32)
    out = np.arange(8, dtype=np.int32)
    res = []
    for fill in (4, 5):
        a = core.alloc_seq(64)
        core.forward([(a, rng.integers(4, 1000, 64).astype(np.int32), 0, 0, True, out[:1])], 8, "logits")
        core.free_seq(a)
        b = core.alloc_seq(64)
        try:
            z0 = core.kv_zero_filled()
            core.forward([(b, toks, 16, 16, True, out)], 8, "logits")  # gap [0, 16) zeroed, [16, 24) written
            assert core.kv_zero_filled() - z0 == 16
            res.append(core.forward([(b, toks, 24, 24, False, out)], 8, "logits"))
            assert core.kv_zero_filled() - z0 == 16  # [0, 24) is written or zeroed
        finally:
            core.free_seq(b)
    np.testing.assert_array_equal(res[0], res[1])


@pytest.mark.parametrize("params", [
    dict(), dict(cache="dual"), dict(cache="none"), dict(block_length=1),
    dict(generation_algorithm="steps", steps=4, cache="dual"), dict(small_block_size=8, cache="dual"),
], ids=["prefix", "dual", "none", "ar", "steps-dual", "dual-sbs8"])
def test_engine_reads_only_written_kv(model, params):
    """Prefill (several chunks), decoding steps, sub-block steps over scratch, commits: every
    cached position a forward reads was written before (nothing zero-filled)."""
    llm = bitdlm.LLM(model, max_batch=4)
    llm.engine.prefill_chunk = 32  # (prompts of several chunks)
    prompts = [np.random.default_rng(s).integers(4, 1000, n).tolist() for s, n in ((1, 5), (2, 32), (3, 77))]
    z0 = model._core.kv_zero_filled()
    gens = llm.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True, **params))
    assert all(len(g.token_ids) == 40 for g in gens)
    assert model._core.kv_zero_filled() == z0
