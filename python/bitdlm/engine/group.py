"""The group path: one step of many requests of one block size as a few numpy calls over
their rows of the block table (request_state.BlockRows), not a plan / apply per request.

It takes the steps that need nothing of a request beyond its block (RequestState.groupable:
greedy, a KV cache, a rule that decides from (token, confidence) rows, no penalties):
- decide: a prefix / dual cache STEP or FULL plan. Every request's candidates (the masked
  positions of its left-most sub-block that still has masks) come from one pass over the
  rows (_core.group_candidates); the rules decide for all at once (decoding.select_flat);
  the unmasking and the new first masked positions are another pass (_core.group_unmask).
  (Those two replace ~25 small numpy calls a step, ~1-2 us each at 64 requests.)
- commit: a finished block's writing forward; its carried token opens the next block
  (RequestState.close_block, per request: the AR fast path of start_block).
Prefill, the cache-less and sampling requests, penalties and the logits rules stay on the
per-request path. RequestState.plan / apply remain the definition: the group path makes
the same forward items and the same state changes (tests/test_scheduler.py walks both)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import _core, decoding
from .request_state import BlockRows, RequestState

# Fewest requests the group path takes a step of. Since its candidates and unmasking are
# native passes (_core.group_candidates / group_unmask) it is ahead from 4 deciding requests:
# bench/overhead.py --fake --batch 4,6,8 against DECIDE_MIN 8 (2 cores, 5 rounds, Python time
# per forward): threshold 1.3x / 1.9x less at 4 / 6, steps 1.25x / 1.5x, dual 1.06x / 1.45x,
# equal at 8; at 2 it loses for threshold (1.1x more) and wins for dual (1.2x less).
DECIDE_MIN = 4
COMMIT_MIN = 4  # (<= DECIDE_MIN: the scheduler skips the group path below it)


@dataclass
class GroupPlan:
    """The group path's part of one core call: its items come first, deciding requests', then
    committing ones' (the core's rows are independent of the other items of a call)."""
    table: BlockRows
    seqs: list[RequestState]  # in item order: decide (the first n_decide), then commit
    n_decide: int
    items: list[tuple]  # `_core.Model.forward` items, one per request
    num_out: list[int]  # output rows per item
    rows: np.ndarray  # the deciding requests' table rows
    first: np.ndarray  # their first masked positions before the step
    cand_req: np.ndarray  # per candidate (output row): its deciding request's index, ...
    cand_pos: np.ndarray  # ... its block position, ...
    cand_at: np.ndarray  # ... and its index in the table's flattened rows (row * block size + position)
    counts: np.ndarray  # candidates per deciding request
    full: list[bool]  # per deciding request: a full pass that writes the sub-block cache's scratch K/V
    shift: bool  # a commit's one output row carries the next block's first token

    @property
    def decide_out(self) -> int:
        return int(self.cand_pos.size)

    def plans(self) -> list:
        """The same step as per-request plans, (request, StepPlan) in item order (the scheduler's
        retry runs them one by one)."""
        return [(s, s.plan()) for s in self.seqs]

    def select(self, conf: np.ndarray) -> np.ndarray:
        """The deciding requests' rules on their rows of the call's confidences -> a bool per
        candidate: unmask it. Changes nothing (so a rule that raises leaves the step to the
        per-request path)."""
        return decoding.select_flat([s.algo for s in self.seqs[:self.n_decide]], conf[:self.decide_out],
                                    self.counts, self.cand_pos)

    def unmask(self, sel: np.ndarray, tok: np.ndarray) -> list[bool]:
        """RequestState.apply's STEP / FULL for every deciding request at once: the selected
        candidates take their tokens, and each request's first masked position moves on
        -> per deciding request: whether it moved (else nothing became final: its output
        is None, as OutputProcessor.collect would find)."""
        nd = self.n_decide
        if not nd:
            return []
        t = self.table
        # (-1: no mask left, none past a block cut by the context either)
        first, moved = _core.group_unmask(t.blk, t.masked, self.cand_at, np.ascontiguousarray(sel, bool),
                                          np.ascontiguousarray(tok, np.int32), self.rows, self.first)
        seqs = self.seqs
        for s, f in zip(seqs, first):
            s.first = f if f >= 0 else len(s.blk)
        if True in self.full:
            for s, f in zip(seqs, self.full):
                if f:
                    s.scratch = True
        return moved

    def commit_ar(self, carried: list) -> list[bool] | None:
        """RequestState.close_block for the committing requests that take start_block's AR fast
        path (a block of one, a carried token, the next block inside the context), their
        table writes at once -> per committing request: True (done here), False (close_block
        is still to run) or the exception its rule's reset raised; None: none was done here."""
        t = self.table
        nd = self.n_decide
        if nd == len(self.seqs) or t.blk.shape[1] != 1 or not self.shift:
            return None
        com = self.seqs[nd:]
        done = [s.ar_fast_path(s.bstart + 1, c) for s, c in zip(com, carried)]
        idx = range(len(com)) if all(done) else [i for i, d in enumerate(done) if d]  # (usually all)
        if not idx:
            return None
        rows = np.array([com[i].row for i in idx], np.intp)
        old = t.blk[rows, 0].tolist()  # the closing blocks' tokens
        t.blk[rows, 0] = [carried[i] for i in idx]
        t.masked[rows, 0] = False
        for i, closed in zip(idx, old):
            s = com[i]
            s.committed = s.bstart + 1  # (close_block, then start_block's fast path)
            try:
                s.ar_block_opened(s.bstart + 1, closed)
            except Exception as e:  # its rule's reset: that request's fault alone, the caller ends it
                done[i] = e
        return done

    def carried(self, tok: np.ndarray) -> list:
        """Per committing request: the token its block's last logits carry (None without shift)."""
        n = len(self.seqs) - self.n_decide
        if self.shift:
            return tok[self.decide_out:self.decide_out + n].tolist()
        return [None] * n


def split(dec: list[RequestState], com: list[RequestState]) -> tuple[list, list, list]:
    """The deciding and committing requests of one block size (Scheduler.schedule sorts the
    groupable ones that hold a table row and are past their prompt) -> (the group path's
    deciding ones, its committing ones, the rest: too few to pay for the group's shared
    calls, for the per-request path)."""
    rest = []
    if len(dec) < DECIDE_MIN:
        rest, dec = dec, []
    if not dec and len(com) < COMMIT_MIN:
        rest, com = rest + com, []
    return dec, com, rest


def plan(dec: list[RequestState], com: list[RequestState], table: BlockRows) -> GroupPlan:
    """The next forward of every request in `dec` (deciding) and `com` (committing): `split`'s,
    of one block size (`table`'s)."""
    cfg = (dec or com)[0].cfg
    sh = 1 if cfg.shift else 0
    bs = table.blk.shape[1]
    if not dec:  # commits only (AR): no candidates
        z = np.zeros(0, np.intp)
        return GroupPlan(table, com, 0, _commit_items(com, cfg, bs), [sh] * len(com), z, z, z, z, z, z,
                         [], bool(sh))
    n = len(dec)
    rows = np.array([s.row for s in dec], np.intp)
    first = np.array([s.first for s in dec], np.intp)
    # the masked positions of each request's left-most sub-block with masks (from s0), request by
    # request, left to right, and their output rows; the sub-block cache's choice per request:
    # after a full pass (`full`), the sub-block alone (`sub`) while its first position is unchanged
    scratch = [s.scratch for s in dec] if table.has_dual else None
    ci, cj, cand_at, out, counts, s0, sub, full = _core.group_candidates(table.masked, rows, first, table.sbs, sh,
                                                                         table.dual, scratch)
    b = counts.cumsum().tolist()
    out = out.tolist()  # (an item's out_idx as a list slice: a third of the cost of an array slice)
    items = [(s.seq_id, s.blk[x0:x0 + s.sbs], s.bstart + x0, s.bstart + len(s.blk), False, out[b0:b1]) if sb
             else (s.seq_id, s.blk, s.bstart, s.bstart, d, out[b0:b1])
             for s, x0, b0, b1, sb, d in zip(dec, s0, [0] + b, b, sub, full)]
    items += _commit_items(com, cfg, bs)
    num_out = counts.tolist() + [sh] * len(com)
    return GroupPlan(table, dec + com, n, items, num_out, rows, first, ci, cj, cand_at, counts, full, bool(sh))


def _commit_items(com: list[RequestState], cfg, bs: int) -> list[tuple]:
    """The finished blocks (of `bs` tokens, fewer where the context cuts one), K/V written; with
    shift the last row carries the next token."""
    if not cfg.shift:
        none = cfg.index(None)
        return [(s.seq_id, s.blk, s.bstart, s.bstart, True, none) for s in com]
    last = cfg.index(bs - 1)
    return [(s.seq_id, s.blk, s.bstart, s.bstart, True, last if len(s.blk) == bs else cfg.index(len(s.blk) - 1))
            for s in com]
