"""The decoding policy (`--decode-policy fixed|adaptive`, docs/server.md "Decode policy").

`fixed` (the default): a request decodes as its parameters say. `adaptive`
(opt-in): a request that leaves the decoding choice unset (`reassignable`) is
assigned, at admission, AR (block_length 1) or the engine's diffusion default:
towards the split of the requests it will run beside (itself included) that the
cost model predicts gives the most tokens/s (`choose_mode`). Its
output is then exactly the fixed policy's output for the assigned mode
(`mode_params`), and the mode is reported with the request. Running requests
keep their mode, except that a diffusion request it assigned is priced again when
its block closes and may go on in AR (Engine._reprice_closing).

The cost model: the scheduler runs one forward per block size, so a step with
`a` AR and `d` diffusion requests costs cost_ar(a) + cost_diffusion(d), each
curve timed at start-up on scratch sequences (`calibrate`; the AR curve continues past
its last timed count through the diffusion points by rows, `ar_curve`), and yields
a + d * tpf tokens, tpf being the diffusion requests' tokens per forward (an
EMA over finished diffusion requests; before any, the rule's own rate for the
fixed-rate rule, else TPF_PRIOR). Each curve is then scaled by what the serving
steps of its mode cost against it (`observe_forward`: the forward and the applying
of its results, an EMA of the ratio): the start-up timings see bare forwards of
empty sequences (no cached keys to attend to, no Python side) in one second of the
machine's life, which another process's load can make any multiple of the rest.
A mode priced too high is never picked, so never observed: when the engine is idle
and one mode has run since the other was last priced (REPRICE_AFTER_S ago or more),
the stale mode is timed again (`time_mode`, a few forwards of one request) and its
scale set from that (`reprice`).
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import time

import numpy as np

from .. import decoding

POLICIES = ("fixed", "adaptive")
AR, DIFFUSION = "ar", "diffusion"
MODES = (AR, DIFFUSION)
# Before any diffusion request has finished: Fast-dLLM v2's threshold 0.9 commits
# 2-3 tokens per forward on trained models; 2.0 leans to AR when unsure.
TPF_PRIOR = 2.0
TPF_EMA = 0.25  # weight of each finished diffusion request in the estimate
CALIBRATION_BUDGET_S = 1.5  # start-up time spent timing forwards (larger counts are extrapolated)
COST_EMA = 0.05  # weight of each observed forward in its mode's cost scale (~20 forwards of memory)
LOAD_EMA = 0.05  # weight of each engine step's request count in the recent concurrency (~20 steps)
COST_SCALE_LIMITS = (0.25, 4.0)  # one forward's ratio is clipped to these (a stall is not a new price)
REPRICE_AFTER_S = 20.0  # an idle engine re-times a mode not run for this long while the other ran
DECISIONS_KEPT = 8  # the last diffusion assignments kept with their inputs (/health)


def mode_of(block_size: int) -> str:
    return AR if block_size == 1 else DIFFUSION


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"decode_policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    return policy


def reassignable(params) -> bool:
    """Whether the adaptive policy may pick this request's mode: it left the decoding
    choice unset. `params.decoding_set` (the server sets it from the request body, so a
    server default is not the client's choice) wins; else judged from the fields:
    block_length, small_block_size, steps unset and the default rule. Requests without
    a cache (recomputing the whole sequence) are never re-assigned: the cost model
    does not describe them."""
    if params.cache_strategy() == "none":
        return False
    if params.decoding_set is not None:
        return not params.decoding_set
    return (params.block_length is None and params.small_block_size is None and params.steps is None
            and params.generation_algorithm == decoding.DEFAULT_ALGORITHM)


def prior_tpf(params, block_size: int) -> float:
    """Tokens per forward expected of a diffusion request before any has finished: the
    fixed-rate rule's own rate (a block in `steps` forwards plus its commit), else TPF_PRIOR."""
    if decoding.rule_of(params.generation_algorithm) == "steps":
        steps = min(params.steps or block_size, block_size)
        return block_size / (steps + 1)
    return TPF_PRIOR


def mode_params(params, mode: str):
    """The parameters a request decodes with in `mode`: AR is block_length 1 (a sub-block
    size, even a server default, has no meaning there); diffusion is the request as given."""
    if mode == AR:
        return dataclasses.replace(params, block_length=1, small_block_size=None)
    return params


class CostCurve:
    """Seconds of one forward by number of requests in it, piecewise linear through
    measured points (n, seconds) made non-decreasing, extrapolated along the last segment
    (or, past the last point, `beyond(n)` where given: see calibrate); 0 requests cost 0
    (no forward)."""

    def __init__(self, points, beyond=None):
        pts = sorted((int(n), float(s)) for n, s in points)
        if not pts or pts[0][0] < 1:
            raise ValueError("a cost curve needs points at n >= 1")
        self.ns = [n for n, _ in pts]
        self.secs = list(itertools.accumulate((s for _, s in pts), max))  # (timing noise: more is never cheaper)
        self.beyond = beyond
        self._table = np.zeros(1)  # [self(0), self(1), ...] as far as `upto` was asked

    def __call__(self, n: int) -> float:
        if n <= 0:
            return 0.0
        ns, secs = self.ns, self.secs
        if n > ns[-1] and self.beyond is not None:
            return max(secs[-1], self.beyond(n))
        if n <= ns[0] or len(ns) == 1:
            return secs[0] if n <= ns[0] else secs[0] * n / ns[0]
        i = min(bisect.bisect_left(ns, n), len(ns) - 1)  # segment [i-1, i] (the last one past the end)
        n0, n1, s0, s1 = ns[i - 1], ns[i], secs[i - 1], secs[i]
        return s0 + (s1 - s0) * (n - n0) / (n1 - n0)

    def upto(self, n: int) -> np.ndarray:
        """[self(0), ..., self(n)] (float64; the same values, computed once per n for the curve's life)."""
        if len(self._table) <= n:
            self._table = np.array([self(k) for k in range(max(n + 1, 2 * len(self._table)))])
        return self._table[:n + 1]

    def points(self) -> list:
        return [[n, round(s, 6)] for n, s in zip(self.ns, self.secs)]


class ScaledCurve:
    """k * curve(n): a mode's cost as decisions use it (AdaptivePolicy.cost)."""

    def __init__(self, curve: CostCurve, k: float):
        self.curve, self.k = curve, k

    def __call__(self, n: int) -> float:
        return self.k * self.curve(n)

    def upto(self, n: int) -> np.ndarray:
        return self.k * self.curve.upto(n)  # (the same float products as __call__'s)


def costs_upto(cost, n: int) -> np.ndarray:
    """[cost(0), ..., cost(n)] as float64: a curve's own table (ScaledCurve, CostCurve),
    else one call each."""
    upto = getattr(cost, "upto", None)
    return upto(n) if upto is not None else np.array([cost(k) for k in range(n + 1)], np.float64)


def step_rate(cost_ar, cost_diffusion, a, d, tpf: float):
    """Predicted tokens/s of a step with `a` AR and `d` diffusion requests (two forwards), given
    the seconds of each forward (cost_ar, cost_diffusion); elementwise over arrays: 0 where
    nothing runs."""
    cost = np.asarray(cost_ar + cost_diffusion, np.float64)
    run = cost > 0
    return np.where(run, (a + d * tpf) / np.where(run, cost, 1.0), 0.0)


def best_split(cost_ar, cost_diffusion, n: int, tpf: float) -> int:
    """How many of n requests should decode AR for the most predicted tokens/s (ties: the
    fewest, diffusion being the model's own mode). Every split at once: n + 1 rates from the
    two curves' tables (one Python call per split cost ~1 us, ~70 us per arrival at n = 64)."""
    a = np.arange(n + 1)
    rates = step_rate(costs_upto(cost_ar, n), costs_upto(cost_diffusion, n)[::-1], a, n - a, tpf)
    return int(rates.argmax())  # (the first of equal maxima)


def choose_mode(cost_ar, cost_diffusion, a: int, d: int, tpf: float, load: int = 0) -> str:
    """The mode for one more request beside `a` AR and `d` diffusion ones: towards the best
    split of the a + d + 1 requests, or of `load` requests where more are expected (the
    engine's recent concurrency: the first arrivals of a burst see an almost empty engine,
    and a diffusion request among AR ones adds a forward to every step of its life). (Not
    the better of the two sets one request apart: the first AR request of a diffusion set
    costs a forward of its own, so that greedy step never leaves an all-diffusion set even
    where an all-AR one is several times faster.) As requests finish, and as diffusion
    ones close their blocks (priced again then), the set moves to the split."""
    return AR if a < best_split(cost_ar, cost_diffusion, max(a + d + 1, load), tpf) else DIFFUSION


def _counts(max_batch: int) -> list[int]:
    """Request counts to time: powers of two up to max_batch, and max_batch."""
    out, n = [], 1
    while n < max_batch:
        out.append(n)
        n *= 2
    return out + [max_batch]


def _linear(pts, ratio: float = 1.8) -> bool:
    """Whether the last doubling of n took `ratio` times the time or more."""
    return len(pts) >= 2 and pts[-1][1] >= ratio * pts[-2][1] * (pts[-1][0] / pts[-2][0]) / 2


def _items(mode: str, seqs, block_size: int, mask_id: int, sub_block: int):
    """One scratch forward's items in `mode`, one per sequence, as the scheduler shapes them:
    AR one token and one output; diffusion a block of `block_size` masks at position 0 with
    `sub_block` outputs (the prefix cache's step). -> (items, the forward's block size)."""
    if mode == AR:
        tok, out, bs = np.zeros(1, np.int32), np.zeros(1, np.int32), 1
    else:
        tok, bs = np.full(block_size, mask_id, np.int32), block_size
        out = np.arange(min(sub_block, block_size), dtype=np.int32)
    return [(s, tok, 0, 0, False, out) for s in seqs], bs


def _timed(model, items, bs, banned, reps: int) -> float:
    """The fastest of `reps` forwards of `items` (seconds)."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        model.forward(items, bs, "select", banned=banned)
        best = min(best, time.perf_counter() - t0)
    return best


def calibrate(model, *, max_batch: int, block_size: int, sub_block: int, mask_id: int, banned,
              budget_s: float = CALIBRATION_BUDGET_S, reps: int = 3):
    """Time forwards shaped like the scheduler's (`_items`) of n AR and n diffusion
    requests, for n in _counts(max_batch). A curve stops once doubling n nearly doubles
    its time (compute-bound: the rest is linear, extrapolated), and both stop when
    `budget_s` is spent. Scratch sequences, nothing written, freed after.
    -> (CostCurve AR, CostCurve diffusion, seconds)."""
    t_start = time.perf_counter()
    seqs: list[int] = []
    pts = {AR: [], DIFFUSION: []}

    def items(mode, n):
        return _items(mode, seqs[:n], block_size, mask_id, sub_block)

    try:
        for n in _counts(max_batch):
            try:
                while len(seqs) < n:
                    seqs.append(model.alloc_seq(block_size))
            except MemoryError:
                break
            if not pts[AR]:  # warm-up: first-touch of the weights, the thread pool, the wide-row buffers
                for mode in MODES:
                    model.forward(*items(mode, 1), "select", banned=banned)
            for mode in MODES:
                if not _linear(pts[mode]):
                    pts[mode].append((n, _timed(model, *items(mode, n), banned, reps)))
            if time.perf_counter() - t_start > budget_s or _linear(pts[AR]) and _linear(pts[DIFFUSION]):
                break
    finally:
        for s in seqs:
            model.free_seq(s)
    if not pts[AR]:
        raise MemoryError("no KV cache left for the calibration's scratch sequences")
    return ar_curve(pts[AR], pts[DIFFUSION], block_size), CostCurve(pts[DIFFUSION]), time.perf_counter() - t_start


def ar_curve(ar_pts, diffusion_pts, block_size: int) -> CostCurve:
    """The AR cost curve, which past its own last point follows the forward's cost by rows:
    its own points, then the diffusion points (block_size rows a request) beyond them. A
    forward's cost is mostly its rows through the GEMMs, whichever mode they come from, and
    an AR curve cut short by the budget (slow diffusion forwards spend it; 2 cores, 2B:
    AR timed at 1 and 2 requests only, 22 ms each) otherwise extrapolates its last segment:
    flat there, 22 ms predicted for 16 rows that took 81."""
    own_max = max(n for n, _ in ar_pts)
    rows = list(ar_pts) + [(n * block_size, s) for n, s in diffusion_pts if n * block_size > own_max]
    return CostCurve(ar_pts, beyond=CostCurve(rows) if len(rows) > len(ar_pts) else None)


def time_mode(model, mode: str, *, block_size: int, sub_block: int, mask_id: int, banned, reps: int = 3) -> float:
    """Seconds of one forward of one request in `mode` now (the fastest of `reps`, after one
    untimed), on a scratch sequence freed after: what `reprice` compares with the curve."""
    seq = model.alloc_seq(block_size)
    try:
        items, bs = _items(mode, [seq], block_size, mask_id, sub_block)
        model.forward(items, bs, "select", banned=banned)
        return _timed(model, items, bs, banned, reps)
    finally:
        model.free_seq(seq)


class AdaptivePolicy:
    """The adaptive policy's state: its cost curves (after `calibrate`), the tokens per
    forward estimate, and how many requests it assigned to each mode."""

    def __init__(self, tpf_prior: float = TPF_PRIOR):
        self.cost_ar: CostCurve | None = None
        self.cost_diffusion: CostCurve | None = None
        self.calibration_seconds = 0.0
        self.tpf = float(tpf_prior)
        self.observed = 0  # finished diffusion requests in the estimate
        self.assigned = {m: 0 for m in MODES}
        self.cost_scale = {m: 1.0 for m in MODES}  # observed / calibrated cost of each mode's forwards
        self.forwards_observed = {m: 0 for m in MODES}
        self.priced_at = {m: 0.0 for m in MODES}  # time.monotonic() of each mode's last timing
        self.served_at = {m: 0.0 for m in MODES}  # ... and of its last observed serving forward
        self.repriced = {m: 0 for m in MODES}
        self.switched = 0  # diffusion requests moved to AR when a block closed (Engine._reprice_closing)
        self.load = 0.0  # recent requests per engine step (observe_load; 0: none yet)
        self.diffusion_decisions: list[dict] = []  # the last DECISIONS_KEPT diffusion assignments, why

    @property
    def calibrated(self) -> bool:
        return self.cost_ar is not None

    def set_costs(self, cost_ar: CostCurve, cost_diffusion: CostCurve, seconds: float = 0.0) -> None:
        self.cost_ar, self.cost_diffusion, self.calibration_seconds = cost_ar, cost_diffusion, seconds
        now = time.monotonic()
        self.priced_at = {m: now for m in MODES}

    def _curve(self, mode: str) -> CostCurve:
        """`mode`'s calibrated cost curve."""
        return self.cost_ar if mode == AR else self.cost_diffusion

    def _ratio(self, mode: str, n: int, seconds: float) -> float | None:
        """seconds / the calibrated cost of n requests in `mode`, clipped to COST_SCALE_LIMITS;
        None before calibration or for a timing that says nothing (n or seconds <= 0)."""
        if not self.calibrated or n <= 0 or not seconds > 0:
            return None
        predicted = self._curve(mode)(n)
        if not predicted > 0:
            return None
        lo, hi = COST_SCALE_LIMITS
        return min(hi, max(lo, seconds / predicted))

    def cost(self, mode: str):
        """The cost curve decisions use for `mode`: the calibrated one times its scale."""
        return ScaledCurve(self._curve(mode), self.cost_scale[mode])

    def decide(self, a: int, d: int, prior: float | None = None, arriving: int = 0) -> str:
        """`prior`: the request's own tokens per forward estimate, used until one is observed.
        `arriving`: requests already known to come right after this one (the rest of a batch of
        arrivals): the split is priced for them too, so the first of a burst is not decided as
        if it ran alone."""
        tpf = self.tpf if self.observed or prior is None else prior
        load = max(round(self.load), a + d + 1 + max(0, int(arriving)))
        cost_ar, cost_d = self.cost(AR), self.cost(DIFFUSION)
        mode = choose_mode(cost_ar, cost_d, a, d, tpf, load)
        if mode == DIFFUSION:  # why (/health): one diffusion request beside AR ones adds a forward per step
            n = load  # (choose_mode's split, of load >= a + d + 1 requests)
            split = best_split(cost_ar, cost_d, n, tpf)
            self.diffusion_decisions.append({
                "running_ar": a, "running_diffusion": d, "arriving": int(arriving), "load": round(self.load, 3),
                "priced_requests": n, "best_ar_of_them": split, "tpf": round(tpf, 4),
                "cost_scale": {m: round(k, 4) for m, k in self.cost_scale.items()},
                "rate_all_ar": round(float(step_rate(cost_ar(n), 0.0, n, 0, tpf)), 2),
                "rate_best": round(float(step_rate(cost_ar(split), cost_d(n - split), split, n - split, tpf)), 2)})
            del self.diffusion_decisions[:-DECISIONS_KEPT]
        return mode

    def observe_load(self, n: int) -> None:
        """An engine step ran n requests: the recent concurrency (an EMA over steps) moves
        towards n; decisions price the split of at least that many requests."""
        if n > 0:
            self.load = float(n) if self.load == 0 else self.load + LOAD_EMA * (n - self.load)

    def observe_forward(self, mode: str, n: int, seconds: float) -> None:
        """A decoding step of n requests in `mode` took `seconds` (its forward and the applying
        of its results): that mode's cost scale moves towards seconds / calibrated cost(n).
        A mode never run keeps its scale; where the other is priced too low, the policy picks
        it and so observes it."""
        ratio = self._ratio(mode, n, seconds)
        if ratio is None:
            return
        self.cost_scale[mode] += COST_EMA * (ratio - self.cost_scale[mode])
        self.forwards_observed[mode] += 1
        self.priced_at[mode] = self.served_at[mode] = time.monotonic()

    def stale_mode(self, now: float | None = None) -> str | None:
        """A mode to time again: not priced for REPRICE_AFTER_S while the other mode served
        since (the host's state may have moved, and a mode priced too high is never run
        to find out). None when neither is. (A re-timing is no serving: two idle modes do
        not re-time each other in turn.)"""
        if not self.calibrated:
            return None
        now = time.monotonic() if now is None else now
        for mode, other in ((AR, DIFFUSION), (DIFFUSION, AR)):
            if now - self.priced_at[mode] >= REPRICE_AFTER_S and self.served_at[other] > self.priced_at[mode]:
                return mode
        return None

    def reprice(self, mode: str, seconds: float) -> None:
        """One request's forward in `mode` took `seconds` now (time_mode): its scale becomes
        seconds / calibrated cost(1), clipped to COST_SCALE_LIMITS (a deliberate timing
        replaces the estimate rather than nudging it)."""
        ratio = self._ratio(mode, 1, seconds)
        if ratio is None:
            return
        self.cost_scale[mode] = ratio
        self.priced_at[mode] = time.monotonic()
        self.repriced[mode] += 1

    def observe(self, tokens: int, forwards: int) -> None:
        """A diffusion request finished: `tokens` generated in `forwards` decoding forwards."""
        if forwards > 0 and tokens > 0:
            self.tpf += TPF_EMA * (tokens / forwards - self.tpf)
            self.observed += 1

    def summary(self) -> dict:
        """What /health shows: the curves (requests in a forward -> seconds), the estimate."""
        return {"tokens_per_forward": round(self.tpf, 4), "observed_requests": self.observed,
                "assigned": dict(self.assigned), "calibrated": self.calibrated,
                "calibration_seconds": round(self.calibration_seconds, 4),
                "cost_ar_seconds": self.cost_ar.points() if self.cost_ar else None,
                "cost_diffusion_seconds": self.cost_diffusion.points() if self.cost_diffusion else None,
                "cost_scale": {m: round(k, 4) for m, k in self.cost_scale.items()},
                "forwards_observed": dict(self.forwards_observed), "repriced": dict(self.repriced),
                "load": round(self.load, 3), "switched_to_ar": self.switched,
                "last_diffusion_decisions": list(self.diffusion_decisions)}
