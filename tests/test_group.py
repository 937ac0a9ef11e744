"""The group path's native array steps (csrc/model/bind_group.cpp, used by engine/group.py)
against numpy definitions of the same values, on random block tables; and that they refuse
arrays they would have to convert (a converted copy would take group_unmask's writes).
tests/test_scheduler.py checks the whole group path against the per-request one."""
from __future__ import annotations

import numpy as np
import pytest

from bitdlm import _core


def _table(rng, R=12, bs=8):
    masked = rng.random((R, bs)) < 0.5
    masked[:, 0] = False  # (position 0 of a block is never masked with shift)
    sbs = rng.choice([1, 2, 4, 8], R).astype(np.intp)
    rows = rng.permutation(R)[:int(rng.integers(1, R + 1))].astype(np.intp)
    rows = rows[masked[rows].any(axis=1)]  # deciding requests: masks left
    first = masked[rows].argmax(axis=1).astype(np.intp)
    return masked, sbs, rows, first


def test_candidates_are_the_masked_positions_of_the_first_sub_block_with_masks():
    rng = np.random.default_rng(0)
    seen_sub = 0
    for case in range(300):
        masked, sbs, rows, first = _table(rng)
        bs = masked.shape[1]
        sh = int(rng.integers(0, 2))
        dual = rng.random(len(masked)) < (0.5 if case % 3 else 0.0)  # (a third: no sub-block cache)
        scratch = [bool(x) for x in rng.random(len(rows)) < 0.7] if dual.any() else None
        ci, cj, at, out, counts, s0, sub, full = _core.group_candidates(masked, rows, first, sbs, sh, dual, scratch)
        want_s0 = first // sbs[rows] * sbs[rows]
        cols = np.arange(bs)
        win = masked[rows] & (cols >= want_s0[:, None]) & (cols < (want_s0 + sbs[rows])[:, None])
        want_ci, want_cj = np.nonzero(win)
        assert ci.tolist() == want_ci.tolist() and cj.tolist() == want_cj.tolist()
        assert at.tolist() == (rows[want_ci] * bs + want_cj).tolist()
        assert counts.tolist() == np.bincount(want_ci, minlength=len(rows)).tolist()
        assert s0 == want_s0.tolist()
        # the sub-block cache: the sub-block alone after a full pass while s0 is decided
        want_sub = dual[rows] & ~masked[rows, want_s0] & np.asarray(scratch or [False] * len(rows), bool)
        assert sub == want_sub.tolist() and full == (dual[rows] & ~want_sub).tolist()
        assert out.dtype == np.int32 and out.tolist() == (want_cj - sh - (want_s0 * want_sub)[want_ci]).tolist()
        seen_sub += int(want_sub.sum())
    assert seen_sub > 50


def test_unmask_writes_the_selected_candidates_and_finds_the_next_masks():
    rng = np.random.default_rng(1)
    for _ in range(200):
        masked, sbs, rows, first = _table(rng)
        bs = masked.shape[1]
        blk = rng.integers(0, 100, masked.shape).astype(np.int32)
        at = _core.group_candidates(masked, rows, first, sbs, 1, np.zeros(len(masked), bool), None)[2]
        sel = rng.random(at.size) < 0.5
        tok = rng.integers(100, 200, at.size + 3).astype(np.int32)  # (more outputs than candidates: commits)
        want_blk, want_masked = blk.copy(), masked.copy()
        want_blk.ravel()[at[sel]] = tok[:at.size][sel]
        want_masked.ravel()[at[sel]] = False
        got_first, moved = _core.group_unmask(blk, masked, at, sel, tok, rows, first)
        assert np.array_equal(blk, want_blk) and np.array_equal(masked, want_masked)
        m = want_masked[rows]
        done = ~m.any(axis=1)
        assert got_first == np.where(done, -1, m.argmax(axis=1)).tolist()
        assert moved == (done | (m.argmax(axis=1) != first)).tolist()


def test_arrays_that_would_be_converted_are_refused():
    masked, sbs, rows, first = _table(np.random.default_rng(2))
    no_dual = np.zeros(len(masked), bool)
    with pytest.raises(TypeError):  # another dtype
        _core.group_candidates(masked.astype(np.int8), rows, first, sbs, 1, no_dual, None)
    with pytest.raises(TypeError):
        _core.group_candidates(masked, rows.astype(np.int32), first, sbs, 1, no_dual, None)
    with pytest.raises(ValueError, match="scratch"):  # a row with the sub-block cache needs its requests' scratch
        _core.group_candidates(masked, rows, first, sbs, 1, np.ones(len(masked), bool), None)
    with pytest.raises(ValueError, match="scratch"):
        _core.group_candidates(masked, rows, first, sbs, 1, no_dual, tuple([False] * len(rows)))
    blk = np.zeros(masked.shape, np.int32)
    at = _core.group_candidates(masked, rows, first, sbs, 1, no_dual, None)[2]
    sel, tok = np.ones(at.size, bool), np.zeros(at.size, np.int32)
    with pytest.raises(TypeError):
        _core.group_unmask(blk.astype(np.int64), masked, at, sel, tok, rows, first)
    with pytest.raises(TypeError):  # not C-contiguous
        _core.group_unmask(np.zeros((masked.shape[1], masked.shape[0]), np.int32).T, masked, at, sel, tok, rows, first)
    with pytest.raises(ValueError, match="outside"):
        _core.group_unmask(blk, masked, at + masked.size, sel, tok, rows, first)
    assert not blk.any()  # (checked before any write)
    with pytest.raises(TypeError):
        _core.segment_ranks(np.zeros(2, np.float32), np.array([2], np.int64))
