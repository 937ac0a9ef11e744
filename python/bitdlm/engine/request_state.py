"""One request's walk through its blocks (reference.md section 3): what it holds
(prompt, current block, masks, generated history), what its next forward is
(`plan` -> StepPlan), and what that forward's result does to it (`apply`).

The cache strategies, in this one place (their one-line descriptions for users
are decoding.CACHES):
- "none": every forward recomputes the whole sequence from position 0 and never
  reads or writes the KV cache (no prefill; a finished block needs a pass only
  to carry its last logits into the next block's first token, with shift);
- "prefix": committed blocks are cached; a step runs the current block against
  them; a finished block is committed by one writing forward;
- "dual": as prefix, plus the sub-block cache: a full pass over the block writes
  scratch K/V, then steps run only the current sub-block against that (stale)
  scratch until the sub-block's first position changes.
none and prefix decide from the same numbers (up to rounding) and differ only
in what each forward computes; dual attends to the block's stale K/V.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import decoding, penalties
from ..sampling_params import SamplingParams
from .policy import mode_of

# StepPlan kinds
PREFILL = "prefill"  # a chunk of the prompt's whole blocks, K/V written
COMMIT = "commit"    # the finished block, K/V written (its last logits carry the next token)
STEP = "step"        # decide some masked positions of the current sub-block
FULL = "full"        # as STEP, over the whole block, leaving the sub-block cache's scratch K/V


class BlockRows:
    """The current blocks of the running requests of one block size, a row each (tokens, mask
    flags): each request's `blk` / `masked` are views of its row, so the group path
    (engine/group.py) can decide and commit one step of all of them with a few numpy calls.
    Positions past a request's block (one cut short by the context) stay unmasked."""

    def __init__(self, rows: int, block_size: int):
        self.blk = np.zeros((rows, block_size), np.int32)
        self.masked = np.zeros((rows, block_size), bool)
        # what the group path reads of a row's request that never changes while it holds the
        # row (set by take): its sub-block size and whether it uses the sub-block cache
        self.sbs = np.zeros(rows, np.intp)
        self.dual = np.zeros(rows, bool)
        self.has_dual = False  # a row was ever taken for the sub-block cache (then the group path reads scratch)
        self._free = list(range(rows - 1, -1, -1))

    def take(self, sbs: int, dual: bool) -> int:
        """A free row (all unmasked) for a request of sub-block size `sbs` (`dual`: with the
        sub-block cache), or -1 when every row is held."""
        if not self._free:
            return -1
        r = self._free.pop()
        self.masked[r] = False  # (a request that ended mid-block left masks behind)
        self.sbs[r], self.dual[r] = sbs, dual
        self.has_dual |= dual
        return r

    def give(self, row: int) -> None:
        self._free.append(row)


@dataclass
class BlockConfig:
    """What every request's block walk needs to know of the model and the engine."""
    shift: bool  # logits at i-1 predict token i
    mask_id: int | None
    max_len: int  # the model's context
    prefill_chunk: int  # prompt tokens per prefill forward (rounded to blocks per request)
    banned: np.ndarray  # token ids never produced (the mask token)
    max_rows: int = 1  # rows per BlockRows table: the engine's max_batch (one per running request)
    # read-only index tables shared by every request, so a step's index arrays come from one
    # boolean pick each, not an allocating chain: block indices (intp), their output rows
    # (int32, shifted by one with shift) and one-element [i] arrays (commit outputs)
    _pos: dict = field(default_factory=dict, repr=False)
    _rows: dict = field(default_factory=dict, repr=False)
    _one: dict = field(default_factory=dict, repr=False)
    _tables: dict = field(default_factory=dict, repr=False)  # block size -> BlockRows

    @staticmethod
    def _frozen(a: np.ndarray) -> np.ndarray:
        a.flags.writeable = False
        return a

    def positions(self, n: int) -> np.ndarray:
        """intp [0, n): block indices."""
        a = self._pos.get(n)
        if a is None:
            a = self._pos[n] = self._frozen(np.arange(n, dtype=np.intp))
        return a

    def rows(self, n: int) -> np.ndarray:
        """int32 [0, n) - shift: the output row that predicts each block index."""
        a = self._rows.get(n)
        if a is None:
            sh = 1 if self.shift else 0
            a = self._rows[n] = self._frozen(np.arange(-sh, n - sh, dtype=np.int32))
        return a

    def block_rows(self, block_size: int) -> BlockRows:
        t = self._tables.get(block_size)
        if t is None:
            t = self._tables[block_size] = BlockRows(self.max_rows, block_size)
        return t

    def index(self, i: int | None) -> np.ndarray:
        """int32 [i], or [] for None."""
        a = self._one.get(i)
        if a is None:
            a = self._one[i] = self._frozen(np.asarray([] if i is None else [i], np.int32))
        return a


@dataclass
class ForwardItem:
    """One sequence's part of a `model.forward` call (docs/architecture.md, `_core.Model`)."""
    seq_id: int
    tokens: np.ndarray  # int32[n] at absolute positions start .. start+n-1
    start: int
    ctx_len: int  # attends to cached positions [0, ctx_len)
    write: bool  # store the fresh K/V at [start, start+n)
    out_idx: np.ndarray  # int32[k]: the rows whose outputs are wanted

    @property
    def num_out(self) -> int:
        return len(self.out_idx)

    def as_core(self) -> tuple:
        """The tuple `_core.Model.forward` takes."""
        return (self.seq_id, self.tokens, self.start, self.ctx_len, self.write, self.out_idx)


@dataclass
class StepPlan:
    """A request's next forward and what its result means."""
    kind: str  # PREFILL | COMMIT | STEP | FULL
    item: ForwardItem
    committed: int = 0  # PREFILL: cache positions [0, committed) final after it
    positions: np.ndarray | None = None  # STEP / FULL: the block indices to decide

    @property
    def decides(self) -> bool:
        """Its outputs pick tokens for masked positions (else: at most one carried token)."""
        return self.kind in (STEP, FULL)


@dataclass
class RequestState:
    rid: str
    prompt: np.ndarray  # int32
    params: SamplingParams
    algo: decoding.Algorithm  # this request's unmasking rule (its own instance: rules may keep state)
    cache: str  # "none" | "prefix" | "dual"
    bs: int  # block size
    sbs: int  # small block size
    stop_ids: frozenset
    limit: int  # absolute end of generation (prompt + max_tokens, capped by the context)
    capacity: int
    rng: np.random.Generator | None  # None when greedy (temperature 0: nothing is drawn)
    cfg: BlockConfig
    text: object | None = None  # output_processor.TextState, None without a tokenizer
    seq_id: int = -1
    committed: int = 0  # cache positions [0, committed) hold final K/V
    prefilling: bool = True
    nfull: int = 0  # prompt tokens that fill whole blocks
    bstart: int = 0
    blk: np.ndarray | None = None
    masked: np.ndarray | None = None
    first: int = 0  # the block's first masked index (len(blk): none), kept with `masked`
    scratch: bool = False  # sub-block cache: the block's K/V were written by a full pass
    hist: list = field(default_factory=list)  # generated tokens before bstart
    emitted: int = 0  # generated tokens returned so far
    forwards: int = 0
    prefills: int = 0  # of which prefill forwards
    finished: bool = False
    reason: str | None = None
    t0: float = 0.0
    assigned: bool = False  # the adaptive policy chose its mode (engine/policy.py)
    # (params, algo) of AR: the adaptive policy moves it to AR when its block closes (close_block)
    to_ar: tuple | None = None
    table: BlockRows | None = None  # the table holding blk / masked as its row `row` (-1: own arrays)
    row: int = -1
    # final_only (LLM.generate): one output, at the end, with every token and the whole text
    # (vLLM's FINAL_ONLY): the steps between output nothing
    final_only: bool = False
    final_text: list = field(default_factory=list)  # (text pieces, where stop strings need them per step)

    def __post_init__(self):
        self.temperature = self.params.effective_temperature()  # read every step
        self.P = len(self.prompt)  # (read several times a step: an attribute, not a property)
        self.mode = mode_of(self.bs)  # "ar" | "diffusion", reported with every output
        # with penalties, every token it picks (carried ones too) comes from penalised logits rows
        self.penalized = self.params.penalized()
        self._set_groupable()

    def _set_groupable(self) -> None:
        # the group path (engine/group.py) can take its decoding steps and commits: greedy, a
        # KV cache, a rule that decides from (token, confidence) rows, no penalties
        self.groupable = (self.cache != "none" and not self.penalized and not self.algo.needs_logits
                          and self.temperature == 0)

    def tokens_between(self, a: int, b: int) -> list[int]:
        """Generated tokens at absolute positions [a, b) (P <= a <= b): history, then the block."""
        bs0 = self.bstart
        if a >= bs0:  # (the common case, once per request and step: all in the current block)
            return self.blk[a - bs0:b - bs0].tolist()
        h = self.hist[a - self.P:min(b, bs0) - self.P]
        return h + self.blk[:b - bs0].tolist() if b > bs0 else h

    def finish(self, reason: str) -> None:
        self.finished, self.reason = True, reason

    def admitted(self, seq_id: int) -> None:
        """Its cache is allocated. Without a cache there is nothing to prefill, except the
        first token of a prompt that ends on a block boundary (the last prompt logits
        predict it, with shift)."""
        self.seq_id = seq_id
        skip = self.cache == "none" and not (self.cfg.shift and self.nfull == self.P)
        if self.nfull == 0 or skip:
            self.start_block(self.nfull, None)

    # --------------------------------------------------------------- blocks
    def start_block(self, bstart: int, first_token: int | None) -> None:
        """Open the block at `bstart`: prompt remainder or the carried token, then masks."""
        if self.ar_fast_path(bstart, first_token):
            # AR's every token (a block of one past the prompt): the carried token fills the
            # reused one-element block; the same state as _open_block's, in fewer steps
            closed = int(self.blk[0])
            self.blk[0] = first_token
            self.masked[0] = False
            self.ar_block_opened(bstart, closed)
            return
        self._open_block(bstart, first_token)

    def ar_fast_path(self, bstart: int, first_token: int | None) -> bool:
        """Whether start_block(bstart, first_token) takes the AR fast path: a block of one past
        the prompt and inside the context, opened by a carried token in the closed block's array."""
        return (self.bs == 1 and first_token is not None and self.blk is not None
                and self.P <= bstart < self.cfg.max_len)

    def ar_block_opened(self, bstart: int, closed: int) -> None:
        """The AR fast path's state once the block holds its carried token (start_block, or the
        group path's table writes): the closed block's token `closed` becomes history when it
        was generated, and the block at `bstart` is open."""
        if self.bstart >= self.P:
            self.hist.append(closed)
        self.bstart, self.first, self.scratch, self.prefilling = bstart, 1, False, False
        self.algo.reset()

    def _open_block(self, bstart: int, first_token: int | None) -> None:
        """start_block's general case."""
        self.prefilling = False
        if self.blk is not None:
            self._retire_block()
        bend = min(bstart + self.bs, self.cfg.max_len)
        n = bend - bstart
        mask_id = -1 if self.cfg.mask_id is None else self.cfg.mask_id
        blk, masked = self.blk, self.masked
        if blk is None:  # the first block: a row of the block size's table, while one is free
            t = self.cfg.block_rows(self.bs)
            r = t.take(self.sbs, self.cache == "dual")
            if r >= 0:
                self.table, self.row = t, r
        if blk is not None and len(blk) == n:  # the closed block's arrays are reused (its forward is done)
            blk.fill(mask_id)
            masked.fill(True)
        elif self.row >= 0:  # (past n the row stays unmasked: the closed block has no masks left)
            blk = self.table.blk[self.row, :n]
            masked = self.table.masked[self.row, :n]
            blk.fill(mask_id)
            masked.fill(True)
        else:
            blk = np.full(n, mask_id, np.int32)
            masked = np.ones(n, bool)
        if bstart < self.P:
            known = self.prompt[bstart:].tolist()
            if first_token is not None:
                known.append(first_token)
            blk[:len(known)] = known
            masked[:len(known)] = False
            first = min(len(known), n)
        elif first_token is not None:  # (slices: a block cut to nothing by the context takes none)
            blk[:1] = first_token
            masked[:1] = False
            first = min(1, n)
        else:
            first = 0
        self.bstart, self.blk, self.masked, self.scratch = bstart, blk, masked, False
        self.first = first
        self.algo.reset()

    def _retire_block(self) -> None:
        """The closing block's generated part becomes history."""
        g0 = max(self.bstart, self.P) - self.bstart
        self.hist.extend(self.blk[g0:].tolist())

    def release_row(self) -> None:
        """Give its table row back (the request has ended); blk / masked become copies."""
        if self.row >= 0:
            self.blk, self.masked = self.blk.copy(), self.masked.copy()
            self.table.give(self.row)
            self.table, self.row = None, -1

    def generated(self) -> np.ndarray:
        """The tokens committed after the prompt so far: earlier blocks, then the decided
        positions of the current block (masked ones never count): what penalties count."""
        h = np.asarray(self.hist, np.int32)
        if self.blk is None:
            return h
        g0 = max(self.bstart, self.P) - self.bstart
        return np.concatenate([h, self.blk[g0:][~self.masked[g0:]]])

    def tokens(self) -> np.ndarray:
        """The whole sequence up to the end of the current block (cache "none" recomputes it)."""
        toks = np.concatenate([self.prompt[:min(self.P, self.bstart)], np.asarray(self.hist, np.int32),
                               self.blk])
        assert len(toks) == self.bstart + len(self.blk)
        return toks.astype(np.int32)

    def frontier(self) -> int:
        """Absolute end of the contiguous final prefix."""
        return 0 if self.prefilling else self.bstart + self.first

    # ------------------------------------------------------------ plan/apply
    def plan(self) -> StepPlan:
        cfg = self.cfg
        none = self.cache == "none"
        sh = 1 if cfg.shift else 0
        sid = self.seq_id
        if self.prefilling:
            if none:  # nothing cached: one pass over the prompt for the first token's logits
                item = ForwardItem(sid, self.prompt[:self.nfull].copy(), 0, 0, False, cfg.index(self.nfull - 1))
                return StepPlan(PREFILL, item, committed=self.nfull)
            chunk = max(self.bs, cfg.prefill_chunk // self.bs * self.bs)
            c0 = self.committed
            c1 = min(self.nfull, c0 + chunk)
            last = c1 == self.nfull
            # with shift, the last logits of a prompt that ends on a block boundary give the next token
            out = c1 - c0 - 1 if (last and cfg.shift and self.nfull == self.P) else None
            item = ForwardItem(sid, self.prompt[c0:c1], c0, c0, True, cfg.index(out))
            return StepPlan(PREFILL, item, committed=c1)
        n = len(self.blk)
        first = self.first
        if first == n:  # nothing masked
            if none and not cfg.shift:  # nothing to commit and no token to carry: open the next block
                self.start_block(self.bstart + n, None)
                return self.plan()
            if none:  # the block's last logits give the next block's first token
                toks = self.tokens()
                item = ForwardItem(sid, toks, 0, 0, False, cfg.index(len(toks) - 1))
                return StepPlan(COMMIT, item)
            item = ForwardItem(sid, self.blk, self.bstart, self.bstart, True, cfg.index(n - 1 if cfg.shift else None))
            return StepPlan(COMMIT, item)
        # (the forward reads blk before apply() changes it: no copy)
        s0 = first // self.sbs * self.sbs  # the left-most sub-block that still has masks
        s1 = min(s0 + self.sbs, n)
        sel = self.masked[s0:s1]
        pos = cfg.positions(n)[s0:s1][sel]  # block indices to decide
        if sh:  # (pos[0] is `first`)
            assert first >= 1, "block position 0 is never masked with token shift"
        if none:  # the whole sequence from position 0, block-causal, no cache read or written
            item = ForwardItem(sid, self.tokens(), 0, 0, False, cfg.rows(n)[s0:s1][sel] + self.bstart)
            return StepPlan(STEP, item, positions=pos)
        dual = self.cache == "dual"
        if dual and self.scratch and not self.masked[s0]:
            # sub-block only, against the block's (stale) scratch K/V written by a full pass;
            # with shift, row j-1 of the sub-block predicts j (s0 itself is never masked here)
            item = ForwardItem(sid, self.blk[s0:s1], self.bstart + s0, self.bstart + n, False,
                               cfg.rows(n)[:s1 - s0][sel])
            return StepPlan(STEP, item, positions=pos)
        # full pass over the block; with the sub-block cache it leaves scratch K/V
        item = ForwardItem(sid, self.blk, self.bstart, self.bstart, dual, cfg.rows(n)[s0:s1][sel])
        return StepPlan(FULL if dual else STEP, item, positions=pos)

    def needs_logits(self, plan: StepPlan) -> bool:
        """Whether this plan's forward must return full logits: the rule fuses them itself, or
        penalties adjust them (also the token a prefill or commit carries into the next block)."""
        if self.penalized:
            return plan.item.num_out > 0
        return self.algo.needs_logits and plan.decides

    def pick(self, plan: StepPlan, res, uniforms: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(token, confidence) rows of this plan's forward result: the core's own, or, from
        logits rows (needs_logits), the penalised logits through the rule's fuse() or the
        core's select epilogue (decoding.select_rows: same greedy ties, same uniforms)."""
        if not self.needs_logits(plan):
            return res
        lg = np.array(res, dtype=np.float32)
        lg[:, self.cfg.banned] = -np.inf
        p = self.params
        if self.penalized:
            penalties.apply(lg, self.prompt, self.generated(), presence=p.presence_penalty,
                            frequency=p.frequency_penalty, repetition=p.repetition_penalty)
        if self.algo.needs_logits and plan.decides:
            return self.algo.fuse(plan.positions, lg, self.temperature, p.top_p, uniforms)
        return decoding.select_rows(lg, self.temperature, p.top_p, uniforms)

    def draw_uniforms(self, plan: StepPlan) -> np.ndarray | None:
        """One uniform per output row from this request's generator when it samples, else None."""
        if self.temperature > 0 and plan.item.num_out:
            return self.rng.random(plan.item.num_out, dtype=np.float32)
        return None

    def apply(self, plan: StepPlan, res, uniforms: np.ndarray | None, selected: np.ndarray | None = None) -> None:
        """Take one forward's result: `(tokens, confidences)` rows, or logits rows when
        `needs_logits(plan)`. `selected`: the candidates to unmask when the caller has
        already run the rule on the confidences (decoding.select_many), else the rule runs here."""
        if plan.kind == PREFILL:
            tok = self.pick(plan, res, uniforms)[0]
            self.prefills += 1
            self.committed = plan.committed
            if plan.committed == self.nfull:
                self.start_block(self.nfull, int(tok[0]) if len(tok) else None)
            return
        if plan.kind == COMMIT:
            tok = self.pick(plan, res, uniforms)[0]
            self.close_block(int(tok[0]) if len(tok) else None)
            return
        if plan.kind == FULL:
            self.scratch = True
        pos = plan.positions
        tok, conf = self.pick(plan, res, uniforms)
        sel = selected if selected is not None else np.asarray(self.algo.select(conf, positions=pos), np.int64)
        at = pos[sel]
        if at.size == 0:
            raise RuntimeError(f"rule {self.algo.name!r} unmasked nothing")
        self.blk[at] = tok[sel]
        m = self.masked
        m[at] = False
        if not m[self.first]:  # the first masked position was decided: find the next one
            i = int(m.argmax())
            self.first = i if m[i] else len(m)

    def close_block(self, carried: int | None) -> None:
        """The block's committing forward is done: its K/V are final; `carried` (its last
        logits' token, with shift) opens the next block."""
        end = self.bstart + len(self.blk)
        self.committed = end
        if self.to_ar is not None:
            self._become_ar(*self.to_ar)
        self.start_block(end, carried)

    def _become_ar(self, params: SamplingParams, algo: decoding.Algorithm) -> None:
        """From the closed block on, one token per forward (block size 1): everything up to the
        block's end is committed K/V and history, and the carried token (the closed block's
        last logits, as AR's own step would pick it) opens AR's first block. The cache's
        capacity, rounded up to whole blocks at admission, covers AR's positions."""
        self._retire_block()
        self.release_row()
        self.blk = self.masked = None  # (start_block takes a row of block size 1's table)
        self.params, self.algo, self.bs, self.sbs = params, algo, 1, 1
        self.cache = params.cache_strategy()
        self.mode = mode_of(1)
        self._set_groupable()
        self.to_ar = None
