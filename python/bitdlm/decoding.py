"""Unmasking rules of block diffusion, one small class each, and the cache strategies.

Every step the engine hands the rule the candidates of one request: the
masked positions of its current sub-block, each with the token the forward
proposes and its confidence. The rule returns which of them to unmask. A rule
instance belongs to one request (the credit rule keeps state across steps);
`reset()` is called when the request opens a new block.

- `threshold` (Fast-dLLM v2, the default): every candidate with confidence >
  threshold, plus always the most confident one.
- `factor` (Fast-dLLM v1 dynamic parallel decoding, `get_transfer_index_dynamic`):
  with the confidences sorted c_1 >= c_2 >= ..., unmask the n most confident
  where n is the longest run with c_k >= 1 - factor / (k + 1) for every k <= n
  (the first always). The bound grows with k and c_k falls, so the run is a
  prefix. Upstream also unmasks ALL candidates when only the last one fails
  (`if top_i == len(threshs) - 1: top_i += 1`); we do not: a failing candidate
  stays masked whatever its rank.
- `credit` (dInfer's `CreditThresholdParallelDecoder`): every step the credits
  of the block decay by `decay_beta`, and each candidate's current top-1 token
  gains top1_prob ** boost_gamma; the logits are fused as
  logits + credit_alpha * log(1 + credit) and the threshold rule runs on the
  fused distribution (token = fused argmax, or a sample of it with
  temperature > 0; confidence = its fused probability). A token that stays the
  top-1 over steps accumulates credit and passes the threshold sooner. Needs
  the full logits of the candidates (the engine asks the forward for them).
  dInfer decodes the whole block; here, like the other rules, the credit rule
  decides the current sub-block, so only its positions gain credit.
- `steps` (LLaDA's fixed rate, `generate(steps=...)`): a block of B tokens in
  `steps` steps, so B / steps tokens per step, the most confident first (ties:
  the left-most). As LLaDA splits its steps evenly over its semi-autoregressive
  blocks, the block's steps are split over its sub-blocks (sub-block j of n gets
  steps // n, plus one for the first steps % n); inside a sub-block that starts
  with m masked positions, step i of its s steps unmasks m // s tokens, plus one
  for the first m % s steps (LLaDA's `get_num_transfer_tokens`). Needs
  steps >= the sub-blocks of a block. Fixing the tokens per forward makes the
  speed of block diffusion measurable on any model, random weights included.

- `hierarchy` (dInfer's `HierarchyDecoder`): the masked positions of the
  sub-block form runs of consecutive positions; in each run the most confident
  one is unmasked if its confidence exceeds `low_threshold`, plus every
  candidate above `threshold`, plus always the most confident one. Decoding
  one token per run (not several neighbours at once) keeps adjacent tokens from
  being guessed independently of each other.

The users' old LLaDA server names (`basic`, `prefix_cache`, `dual_cache`,
`dinfer_blockwise`, `dinfer_hierarchy`, `dinfer_credit`) are aliases: a rule
plus the cache strategy that server ran it with (used when the request names
no cache); see ALIASES and docs/migrating.md.

Cache strategies (per request): `none` recomputes the whole sequence every
step (no KV cache read or written), `prefix` (default) caches committed
blocks, `dual` also reuses the current block's K/V across sub-block steps
(Fast-dLLM's DualCache idea at sub-block level).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import _core

CACHES = {
    "none": "no KV cache: every step recomputes the whole sequence from position 0",
    "prefix": "committed blocks are cached; each step runs the current block against them (default)",
    "dual": "prefix cache plus the current block's K/V, reused by later sub-block steps "
            "(only the sub-block is recomputed)",
}
DEFAULT_CACHE = "prefix"
DEFAULT_ALGORITHM = "threshold"


@dataclass(frozen=True)
class Param:
    name: str
    default: float | None  # None: the model's value (meta diffusion.threshold)
    lo: float
    hi: float
    lo_open: bool
    hi_open: bool
    doc: str
    integer: bool = False  # only whole numbers (`steps`)

    def range_text(self) -> str:
        hi = "inf" if math.isinf(self.hi) else f"{self.hi:g}"
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {hi}{')' if self.hi_open else ']'}"

    def check(self, value) -> float:
        if self.integer:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not self.lo <= value <= self.hi:
                raise ValueError(f"{self.name} must be an integer in {self.range_text()}, got {value!r}")
            return int(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{self.name} must be a number in {self.range_text()}, got {value!r}")
        v = float(value)
        ok = math.isfinite(v) and (v > self.lo if self.lo_open else v >= self.lo) \
            and (v < self.hi if self.hi_open else v <= self.hi)
        if not ok:
            raise ValueError(f"{self.name} must be a finite number in {self.range_text()}, got {value!r}")
        return v

    def describe(self) -> dict:
        return {"name": self.name, "default": self.default, "range": self.range_text(),
                "min": self.lo, "max": None if math.isinf(self.hi) else self.hi, "description": self.doc}


_THRESHOLD = Param("threshold", None, 0.0, 1.0, True, False,
                   "unmask where the confidence exceeds it (1 = one token per step); default: the model's")


class Algorithm:
    """One unmasking rule. Subclasses set name, summary, params, and select()."""
    name = ""
    summary = ""
    params: tuple[Param, ...] = ()
    needs_logits = False  # True: the engine passes full logits to fuse() instead of (token, confidence)

    def __init__(self, **values):
        for p in self.params:
            v = values.get(p.name)
            setattr(self, p.name, p.default if v is None else p.check(v))

    def configure(self, block_size: int, small_block_size: int) -> None:
        """The request's block and sub-block sizes (the engine calls it once, before any step);
        raises ValueError if the rule cannot decode them."""

    def reset(self) -> None:
        """A new block starts (nothing to forget for stateless rules)."""

    def select(self, conf: np.ndarray, masked: np.ndarray | None = None, positions=None) -> np.ndarray:
        """Indices (into conf) of the candidates to unmask; never empty when one is masked.
        `positions`: the candidates' block positions (rules that look at neighbours, and `steps`, use them)."""
        raise NotImplementedError

    # The same selection for the candidates of many requests of this class at once, or None
    # (select_flat then calls select() request by request). Arguments: the rule instances,
    # every candidate's confidence (float64, one request after another), its request's index
    # (seg), its rank in its request (0 = most confident; ties: the left-most first), the
    # candidates per request, and each request's first candidate's block position -> bool per
    # candidate.
    select_segments = None

    @classmethod
    def describe(cls) -> dict:
        return {"name": cls.name, "description": cls.summary, "parameters": [p.describe() for p in cls.params]}


def _candidates(conf, masked):
    conf = np.asarray(conf, dtype=np.float64)
    if masked is None:
        return conf, np.arange(conf.size)
    idx = np.nonzero(np.asarray(masked, bool))[0]
    return conf[idx], idx


class Threshold(Algorithm):
    name = "threshold"
    summary = ("Fast-dLLM v2: unmask every masked position of the sub-block whose confidence exceeds "
               "`threshold`, plus always the most confident one")
    params = (_THRESHOLD,)

    def select(self, conf, masked=None, positions=None):
        c, idx = _candidates(conf, masked)
        if c.size == 0:
            return idx
        sel = c > self.threshold
        sel[int(np.argmax(c))] = True  # always the most confident one
        return idx[sel]

    @classmethod
    def select_segments(cls, rules, c, seg, rank, counts, first_positions):
        return (c > np.array([r.threshold for r in rules]).take(seg)) | (rank == 0)


class Factor(Algorithm):
    name = "factor"
    summary = ("Fast-dLLM v1 dynamic parallel decoding: with confidences sorted c_1 >= c_2 >= ..., unmask the "
               "n most confident while c_k >= 1 - factor / (k + 1) (always at least one)")
    params = (Param("factor", 1.0, 0.0, math.inf, True, True,
                    "larger unmasks more per step: the k-th most confident needs c_k >= 1 - factor/(k+1)"),)

    def select(self, conf, masked=None, positions=None):
        c, idx = _candidates(conf, masked)
        if c.size == 0:
            return idx
        order = np.argsort(-c, kind="stable")
        k = np.arange(1, c.size + 1)
        ok = c[order] >= 1.0 - self.factor / (k + 1)
        ok[0] = True  # the first always
        n = int(np.argmin(ok)) if not ok.all() else c.size  # length of the passing run
        return idx[np.sort(order[:n])]

    @classmethod
    def select_segments(cls, rules, c, seg, rank, counts, first_positions):
        f = np.array([r.factor for r in rules])[seg]
        ok = (c >= 1.0 - f / (rank + 2)) | (rank == 0)
        # a request's passing run ends at its first failing rank
        stop = np.full(len(rules), np.iinfo(np.int64).max)
        np.minimum.at(stop, seg[~ok], rank[~ok])
        return rank < stop[seg]


class Credit(Algorithm):
    name = "credit"
    summary = ("dInfer's credit decoder: per position, the top-1 token's probability ** boost_gamma accumulates "
               "as credit over the steps of a block (decayed by decay_beta each step); logits + "
               "credit_alpha * log(1 + credit) then go through the threshold rule")
    params = (_THRESHOLD,
              Param("credit_alpha", 0.7, 0.0, math.inf, False, True, "weight of the credit in the fused logits"),
              Param("boost_gamma", 0.2, 0.0, math.inf, False, True,
                    "credit gained per step: top-1 probability ** boost_gamma"),
              Param("decay_beta", 0.8, 0.0, 1.0, False, False, "credit kept from one step to the next"))
    needs_logits = True

    def __init__(self, **values):
        super().__init__(**values)
        self.credit: dict[int, dict[int, float]] = {}  # block position -> {token id: credit}
        self._steps = 0

    def reset(self):
        self.credit, self._steps = {}, 0

    def fuse(self, positions, logits: np.ndarray, temperature=0.0, top_p=1.0, uniforms=None):
        """One step's credit update from the candidates' logits [k, V] (banned ids at -inf) ->
        (token int32[k], fused confidence float32[k])."""
        logits = np.asarray(logits, dtype=np.float32)
        if self._steps:
            for cr in self.credit.values():
                for t in cr:
                    cr[t] *= self.decay_beta
        self._steps += 1
        m = logits.max(axis=1, keepdims=True)
        p = np.exp(logits - m)
        p /= p.sum(axis=1, keepdims=True)
        top = p.argmax(axis=1)
        fused = logits.copy()
        for r, pos in enumerate(positions):
            cr = self.credit.setdefault(int(pos), {})
            t = int(top[r])
            cr[t] = cr.get(t, 0.0) + float(p[r, t]) ** self.boost_gamma
            for tok, c in cr.items():
                fused[r, tok] += np.float32(self.credit_alpha * math.log1p(c))
        return select_rows(fused, temperature, top_p, uniforms)

    def select(self, conf, masked=None, positions=None):
        return Threshold.select(self, conf, masked)


class Hierarchy(Algorithm):
    name = "hierarchy"
    summary = ("dInfer's hierarchy decoder: in each run of consecutive masked positions of the sub-block, the "
               "most confident one if above `low_threshold`; plus every position above `threshold`; plus always "
               "the most confident one")
    params = (_THRESHOLD,
              Param("low_threshold", 0.4, 0.0, 1.0, False, True,
                    "a run's best candidate is unmasked only above it (dInfer's default 0.4)"))

    def select(self, conf, masked=None, positions=None):
        c, idx = _candidates(conf, masked)
        if c.size == 0:
            return idx
        pos = idx if positions is None else np.asarray(positions)[idx]
        run = np.concatenate([[0], np.cumsum(np.diff(pos) != 1)])  # run id of every candidate
        best = np.full(run[-1] + 1, -np.inf)
        np.maximum.at(best, run, c)
        sel = (c == best[run]) & (c > self.low_threshold)  # each run's best (all of a tie)
        sel |= c > self.threshold
        sel[int(np.argmax(c))] = True  # always the most confident one
        return idx[sel]


class Steps(Algorithm):
    name = "steps"
    summary = ("LLaDA's fixed rate: a block of B tokens in `steps` steps (B / steps per step, the most "
               "confident first), the steps split evenly over the sub-blocks")
    params = (Param("steps", None, 1, math.inf, False, True,
                    "steps per block: block_length / steps tokens per step; default: block_length (one per step)",
                    integer=True),)

    def __init__(self, **values):
        super().__init__(**values)
        self.block_size = self.sbs = 0
        self.reset()

    def configure(self, block_size, small_block_size):
        self.block_size, self.sbs = int(block_size), int(small_block_size)
        n = -(-self.block_size // self.sbs)
        if self.steps is not None and self.steps < n:
            raise ValueError(f"steps {self.steps} is fewer than the {n} sub-blocks of a block "
                             f"(block_length {self.block_size} / small_block_size {self.sbs}): at least one each")
        self._steps_of = [self.sub_block_steps(j) for j in range(n)]  # (take() reads them once per sub-block)

    def reset(self):
        self._sub, self._used = -1, 0  # sub-block being decoded, steps it has taken

    def sub_block_steps(self, j: int) -> int:
        """Steps of sub-block j: the block's steps split evenly, the remainder to the first ones."""
        n = -(-self.block_size // self.sbs)
        s = self.block_size if self.steps is None else self.steps
        return s // n + (j < s % n)

    def take(self, n: int, first_position: int) -> int:
        """How many of the n candidates this step unmasks (the first at block position
        `first_position`); counts the step."""
        if not self.sbs:
            raise ValueError("the steps rule needs configure() and the candidates' block positions")
        j = int(first_position) // self.sbs
        if j != self._sub:  # (its steps counted once per sub-block, not per step)
            self._sub, self._used, self._sub_steps = j, 0, self._steps_of[j]
        left = self._sub_steps - self._used
        self._used += 1
        # ceil(masked left / steps left) is LLaDA's schedule (m // s, one more for the first m % s steps)
        return n if left <= 0 else -(-n // left)

    def select(self, conf, masked=None, positions=None):
        c, idx = _candidates(conf, masked)
        if c.size == 0:
            return idx
        if positions is None:
            raise ValueError("the steps rule needs configure() and the candidates' block positions")
        k = self.take(c.size, np.asarray(positions)[idx[0]])
        order = np.argsort(-c, kind="stable")  # the most confident first, ties to the left
        return idx[np.sort(order[:k])]

    @classmethod
    def select_segments(cls, rules, c, seg, rank, counts, first_positions):
        k = np.array([r.take(n, p) if n else 0 for r, n, p in zip(rules, counts.tolist(), first_positions.tolist())],
                     np.int64)
        return rank < k.take(seg)


def select_many(rules, confs, positions) -> list[np.ndarray]:
    """One step's selection for many requests: rules[i] picks among the candidates confs[i]
    at block positions positions[i] -> per request, a bool mask over its candidates (always
    one set, as select() returns at least one index); select_flat on the lists joined."""
    counts = np.array([len(c) for c in confs], np.int64)
    sel = select_flat(rules, np.concatenate(confs), counts, np.concatenate(positions))
    ends = np.cumsum(counts).tolist()
    return [sel[b - k:b] for b, k in zip(ends, counts.tolist())]


def select_flat(rules, conf, counts, positions) -> np.ndarray:
    """One step's selection for many requests whose candidates lie one request after another:
    request i's are the next counts[i] entries of conf (confidences) and positions (block
    positions) -> a bool per candidate, set where unmasked (at least one per request with
    candidates). The same choices as each rule's select() (tests/test_algorithms.py), but the
    rules with a vectorised form (select_segments) rank all their requests' candidates in
    one pass, not one numpy call chain per request."""
    if not rules:
        return np.zeros(0, bool)
    counts = np.asarray(counts, np.int64)
    c = np.asarray(conf).astype(np.float64)
    positions = np.asarray(positions)
    classes = set(map(type, rules))
    if len(classes) == 1:  # the usual case: one rule class, no subsetting (its selection is the result)
        by_cls = {classes.pop(): None}
    else:
        by_cls = {}
        for i, r in enumerate(rules):
            by_cls.setdefault(type(r), []).append(i)
        out = np.zeros(c.size, bool)
    for cls, idx in by_cls.items():
        if idx is None:
            rs, cnt, cand = rules, counts, slice(None)
        else:
            rs, cnt = [rules[i] for i in idx], counts[idx]
            cand = np.repeat(np.isin(np.arange(len(rules)), idx), counts)  # its requests' candidates
        cc, pp = c[cand], positions[cand]
        if cls.select_segments is None or len(rs) == 1:  # (one request: select() is cheaper)
            got, a = np.zeros(cc.size, bool), 0
            for r, k in zip(rs, cnt.tolist()):
                got[a + np.asarray(r.select(cc[a:a + k], positions=pp[a:a + k]), np.int64)] = True
                a += k
        else:
            seg = np.arange(len(rs)).repeat(cnt)
            # (one native pass: the numpy sort and scatter it replaces were ~12 calls a step)
            rank = _core.segment_ranks(cc, cnt)
            starts = cnt.cumsum() - cnt
            first_pos = pp.take(np.minimum(starts, cc.size - 1)) if cc.size else np.zeros(len(rs), np.int64)
            got = np.asarray(cls.select_segments(rs, cc, seg, rank, cnt, first_pos), bool)
        if idx is None:
            return got
        out[cand] = got
    return out


def select_rows(logits: np.ndarray, temperature=0.0, top_p=1.0, uniforms=None):
    """The forward's select epilogue (docs/architecture.md) on logits rows [k, V]: greedy argmax and its
    softmax probability at temperature 0; otherwise p = softmax(logits / T), the nucleus of the most
    probable tokens whose mass before them is <= top_p, and the first id (increasing order) whose
    cumulative nucleus mass exceeds u * nucleus mass; confidence = its nucleus-renormalised probability."""
    logits = np.asarray(logits, dtype=np.float64)
    k = logits.shape[0]
    temps = np.broadcast_to(np.asarray(temperature, np.float64), (k,))
    tops = np.broadcast_to(np.asarray(top_p, np.float64), (k,))
    us = np.zeros(k) if uniforms is None else np.broadcast_to(np.asarray(uniforms, np.float64), (k,))
    tok = logits.argmax(axis=1).astype(np.int32)  # greedy rows: argmax and its softmax probability
    conf = (1.0 / np.exp(logits - logits.max(axis=1, keepdims=True)).sum(axis=1)).astype(np.float32)
    for r in np.nonzero(temps > 0)[0]:
        row = logits[r]
        T = temps[r]
        z = row / T
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        before = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
        keep = order[before <= tops[r]]
        keep = keep if keep.size else order[:1]
        ids = np.sort(keep)
        mass = p[ids].sum()
        cum = np.cumsum(p[ids])
        j = min(int(np.searchsorted(cum, us[r] * mass, side="right")), ids.size - 1)
        tok[r] = ids[j]
        conf[r] = p[ids[j]] / mass
    return tok, conf


REGISTRY: dict[str, type[Algorithm]] = {c.name: c for c in (Threshold, Factor, Credit, Hierarchy, Steps)}

# The users' old LLaDA server's algorithm names -> (rule, the cache strategy it ran with).
# Fast-dLLM's `basic` had no cache; their dInfer decoders all ran with the dual cache.
ALIASES: dict[str, tuple[str, str]] = {
    "basic": ("threshold", "none"),
    "prefix_cache": ("threshold", "prefix"),
    "dual_cache": ("threshold", "dual"),
    "dinfer_blockwise": ("threshold", "dual"),
    "dinfer_hierarchy": ("hierarchy", "dual"),
    "dinfer_credit": ("credit", "dual"),
}


def names() -> list[str]:
    return list(REGISTRY) + list(ALIASES)


def check_name(name) -> str:
    if name not in REGISTRY and name not in ALIASES:
        raise ValueError(f"unknown generation_algorithm {name!r}; valid: {', '.join(names())}")
    return name


def rule_of(name: str) -> str:
    """The rule an algorithm name (or an old alias) stands for."""
    return ALIASES[name][0] if name in ALIASES else check_name(name)


def alias_cache(name: str) -> str | None:
    """The cache strategy an old alias implies (None for a rule's own name)."""
    return ALIASES[name][1] if name in ALIASES else None


def check_cache(name) -> str:
    if name not in CACHES:
        raise ValueError(f"unknown cache {name!r}; valid: {', '.join(CACHES)}")
    return name


def make(name: str, **values) -> Algorithm:
    """A fresh rule instance for one request; values: its parameters (None = default)."""
    cls = REGISTRY[rule_of(name)]
    return cls(**{p.name: values.get(p.name) for p in cls.params})


def describe() -> dict:
    """What `GET /generation/algorithms` returns."""
    return {"default": DEFAULT_ALGORITHM,
            "algorithms": [c.describe() for c in REGISTRY.values()],
            "aliases": [{"name": k, "algorithm": a, "cache": c,
                         "description": f"the old LLaDA server's {k!r}: {a} with the {c!r} cache "
                                        f"(when the request names no cache)"} for k, (a, c) in ALIASES.items()],
            "default_cache": DEFAULT_CACHE,
            "caches": [{"name": k, "description": v} for k, v in CACHES.items()]}
