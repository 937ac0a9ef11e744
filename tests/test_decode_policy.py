"""--decode-policy adaptive (bitdlm/engine/policy.py): the decision on synthetic cost
curves, the calibration, and the guarantee that replaces bit-identity with the fixed
policy: every request's output is exactly the fixed policy's output for the mode it was
assigned and reports. On the packaged tiny model (no torch)."""
from __future__ import annotations

import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bitdlm.engine import policy as P  # noqa: E402
from bitdlm.llm import LLM, SamplingParams  # noqa: E402

BLOCK = 32  # the packaged model's block size (8-token sub-blocks)


def roofline(floor, per_row, rows):
    """A forward's seconds for n requests of `rows` rows each: flat while bandwidth-bound,
    then linear in the rows (compute-bound)."""
    return lambda n: max(floor, per_row * rows * n) if n else 0.0


def assign(cost_ar, cost_d, n, tpf=2.0):
    """The modes n arrivals get, each beside those before it (none finishes)."""
    a = d = 0
    out = []
    for _ in range(n):
        m = P.choose_mode(cost_ar, cost_d, a, d, tpf)
        out.append(m)
        a, d = (a + 1, d) if m == P.AR else (a, d + 1)
    return out


# ---------------------------------------------------------------- the decision
def test_bandwidth_bound_flat_cost_picks_diffusion_at_every_load():
    flat = lambda n: 0.01 if n else 0.0  # noqa: E731  (weights read once, rows free)
    assert assign(flat, flat, 64) == [P.DIFFUSION] * 64
    assert assign(flat, flat, 64, tpf=1.2) == [P.DIFFUSION] * 64
    # at exactly one token per forward diffusion buys nothing: a tie, and ties keep diffusion
    assert P.choose_mode(flat, flat, 0, 0, 1.0) == P.DIFFUSION


def test_compute_bound_linear_cost_picks_ar_when_tpf_is_below_the_rows():
    lin_ar, lin_d = (lambda n: 1e-3 * n), (lambda n: 1e-3 * BLOCK * n)  # noqa: E731
    for a, d in ((0, 63), (32, 31), (63, 0), (0, 0)):
        assert P.choose_mode(lin_ar, lin_d, a, d, tpf=4.0) == P.AR
    # more tokens per forward than rows: diffusion pays even compute-bound
    assert P.choose_mode(lin_ar, lin_d, 0, 63, tpf=BLOCK + 1) == P.DIFFUSION


def test_mixed_roofline_switches_from_diffusion_to_ar_with_load():
    """Bandwidth-bound at low load, compute-bound past the roofline's knee: the first
    arrivals get diffusion, and once diffusion's forward is compute-bound the rest get AR."""
    cost_ar = roofline(10e-3, 0.3e-3, 1)
    cost_d = roofline(10e-3, 0.3e-3, 8)  # 8 rows a request (a sub-block)
    modes = assign(cost_ar, cost_d, 64, tpf=3.0)
    k = modes.index(P.AR)
    assert 1 <= k < 32 and modes[:k] == [P.DIFFUSION] * k
    assert modes.count(P.AR) > 32, modes
    # deterministic: the same inputs, the same answer
    assert assign(cost_ar, cost_d, 64, tpf=3.0) == modes


def test_every_split_at_once_decides_as_one_rate_per_split():
    """best_split's rates from the curves' tables (and from plain callables) pick the same split,
    ties included, as the rates computed one split at a time with Python floats."""
    import numpy as np

    def one_by_one(cost_ar, cost_d, n, tpf):
        rates = []
        for k in range(n + 1):
            cost = cost_ar(k) + cost_d(n - k)
            rates.append((k + (n - k) * tpf) / cost if cost > 0 else 0.0)
        return rates.index(max(rates))

    rng = np.random.default_rng(0)
    flat = P.CostCurve([(1, 0.01)])
    cases = [(flat, flat, 1.0, 1.0, 1.0)]  # every split ties
    for _ in range(60):
        def curve():
            ns = sorted(rng.choice(np.arange(1, 65), int(rng.integers(1, 5)), replace=False).tolist())
            return P.CostCurve([(n, float(rng.uniform(1e-3, 0.05))) for n in ns])
        cases.append((curve(), curve(), float(rng.choice([1.0, 2.0, 3.7, rng.uniform(0.5, 9)])),
                      float(rng.uniform(0.25, 4)), float(rng.uniform(0.25, 4))))
    for ca, cd, tpf, ka, kd in cases:
        pol = P.AdaptivePolicy()
        pol.set_costs(ca, cd)
        pol.cost_scale = {P.AR: ka, P.DIFFUSION: kd}
        for n in (1, 2, 7, 33, 64, 130):
            want = one_by_one(lambda k: ka * ca(k), lambda k: kd * cd(k), n, tpf)
            assert P.best_split(pol.cost(P.AR), pol.cost(P.DIFFUSION), n, tpf) == want, (n, tpf)
            assert P.best_split(lambda k: ka * ca(k), lambda k: kd * cd(k), n, tpf) == want
    assert P.CostCurve([(2, 0.004), (4, 0.008)]).upto(5).tolist() == [0.0, 0.004, 0.004, 0.006, 0.008, 0.01]


def test_cost_curve_interpolates_and_extrapolates():
    c = P.CostCurve([(4, 0.004), (1, 0.002), (2, 0.0025)])
    assert c(0) == 0.0 and c(1) == 0.002 and c(2) == 0.0025
    assert c(3) == pytest.approx(0.00325)
    assert c(8) == pytest.approx(0.004 + 4 * 0.00075)  # the last segment's slope
    assert P.CostCurve([(1, 0.002), (2, 0.001)])(4) == 0.002  # noise: never cheaper past the end
    assert P.CostCurve([(1, 0.002)])(3) == pytest.approx(0.006)
    with pytest.raises(ValueError):
        P.CostCurve([])


def test_an_ar_curve_cut_short_follows_the_rows_of_the_diffusion_points():
    """Past its own points the AR curve interpolates the forward's cost by rows through the
    diffusion points (block_size rows a request), not its last segment: the dev machine's
    2-core calibration timed AR at 1 and 2 requests only (22 ms each: flat), and 16 AR rows
    then took 81 ms, priced at 22 by the flat extrapolation."""
    ar, d = [(1, 0.0219), (2, 0.0219)], [(1, 0.1369), (2, 0.2795)]
    assert P.CostCurve(ar)(16) == pytest.approx(0.0219)  # the old extrapolation
    c = P.ar_curve(ar, d, 32)
    assert c(1) == c(2) == pytest.approx(0.0219)  # its own points stand
    assert c(16) == pytest.approx(0.0219 + (0.1369 - 0.0219) * 14 / 30)
    assert c(64) == pytest.approx(0.2795)
    assert c(128) == pytest.approx(0.2795 + (0.2795 - 0.1369) * 2)  # then the rows' last segment
    assert c.points() == [[1, 0.0219], [2, 0.0219]]
    # an AR curve that reaches past the diffusion rows keeps its own extrapolation
    long_ar = [(1, 0.01), (16, 0.02), (32, 0.03), (64, 0.06)]
    assert P.ar_curve(long_ar, [(1, 0.027)], 32)(128) == pytest.approx(P.CostCurve(long_ar)(128))


class _ClockModel:
    """A model whose forwards advance a fake clock by a roofline cost of their rows."""

    def __init__(self, floor, per_row):
        self.t, self.floor, self.per_row, self.live = 0.0, floor, per_row, set()

    def cost(self, rows):
        return max(self.floor, self.per_row * rows)

    def alloc_seq(self, capacity):
        s = len(self.live) + 100
        self.live.add(s)
        return s

    def free_seq(self, s):
        self.live.discard(s)

    def forward(self, items, block_size, mode, banned=None):
        self.t += self.cost(sum(len(it[1]) for it in items))


def test_a_calibration_the_budget_cuts_short_still_prices_ar_batches_near_their_cost(monkeypatch):
    m = _ClockModel(floor=0.010, per_row=0.001)
    monkeypatch.setattr(P, "time", type("FakeTime", (), {"perf_counter": lambda: m.t, "monotonic": lambda: m.t}))
    cost_ar, cost_d, secs = P.calibrate(m, max_batch=64, block_size=32, sub_block=8, mask_id=0, banned=None,
                                        budget_s=0.15)
    assert max(cost_ar.ns) <= 2 and not m.live  # cut short; scratch sequences freed
    for n in (16, 32, 64):
        assert cost_ar(n) == pytest.approx(m.cost(n), rel=0.35), n
        assert cost_d(n) == pytest.approx(m.cost(32 * n), rel=0.01), n


def test_observed_forwards_rescale_a_mode_and_flip_the_decision():
    """A calibration that priced diffusion at 25 ms (diffusion wins at 3 tokens per forward
    against 10 ms AR) is corrected by serving forwards that cost 50: the decision flips to AR;
    one absurd stall is clipped, and nothing moves before calibration."""
    pol = P.AdaptivePolicy()
    pol.observe_forward(P.DIFFUSION, 1, 1.0)  # not calibrated: ignored
    assert pol.forwards_observed[P.DIFFUSION] == 0
    pol.set_costs(P.CostCurve([(1, 0.010), (4, 0.012)]), P.CostCurve([(1, 0.025), (4, 0.060)]))
    assert pol.decide(0, 0, 3.0) == P.DIFFUSION
    pol.observe_forward(P.DIFFUSION, 1, 1000.0)  # a stall: at most COST_SCALE_LIMITS[1] x
    assert pol.cost_scale[P.DIFFUSION] == pytest.approx(1 + P.COST_EMA * (P.COST_SCALE_LIMITS[1] - 1))
    pol.cost_scale[P.DIFFUSION] = 1.0
    for _ in range(100):
        pol.observe_forward(P.DIFFUSION, 4, 0.120)  # twice the calibrated 60 ms at 4 requests
    assert pol.cost_scale[P.DIFFUSION] == pytest.approx(2.0, rel=1e-2)
    assert pol.cost(P.DIFFUSION)(1) == pytest.approx(0.050, rel=1e-2)
    assert pol.decide(0, 0, 3.0) == P.AR
    assert pol.cost_scale[P.AR] == 1.0 and pol.forwards_observed == {P.AR: 0, P.DIFFUSION: 101}
    s = pol.summary()
    assert s["cost_scale"][P.DIFFUSION] == pytest.approx(2.0, rel=1e-2) and s["forwards_observed"][P.DIFFUSION] == 101


def test_a_mode_priced_out_is_timed_again_once_the_other_ran_a_while():
    """Diffusion priced 4x too high at start-up is never picked, so never observed: once AR
    has run since diffusion's last price and REPRICE_AFTER_S passed, diffusion is stale;
    re-timing it at its calibrated cost restores the decision. Nothing is stale before
    calibration, right after it, or when the other mode has not run since."""
    pol = P.AdaptivePolicy()
    assert pol.stale_mode() is None  # not calibrated
    pol.set_costs(P.CostCurve([(1, 0.010)]), P.CostCurve([(1, 0.025)]))
    t0 = pol.priced_at[P.DIFFUSION]
    assert pol.stale_mode(t0 + 10 * P.REPRICE_AFTER_S) is None  # neither ran since calibration
    pol.cost_scale[P.DIFFUSION] = 4.0
    assert pol.decide(0, 0, 3.0) == P.AR
    pol.observe_forward(P.AR, 1, 0.010)
    t_ar = pol.priced_at[P.AR]
    assert t_ar > t0 and pol.stale_mode(t0 + P.REPRICE_AFTER_S / 2) is None  # not long enough
    assert pol.stale_mode(t0 + P.REPRICE_AFTER_S) == P.DIFFUSION
    pol.reprice(P.DIFFUSION, 0.025)
    assert pol.cost_scale[P.DIFFUSION] == pytest.approx(1.0) and pol.repriced == {P.AR: 0, P.DIFFUSION: 1}
    assert pol.decide(0, 0, 3.0) == P.DIFFUSION
    assert pol.stale_mode(pol.priced_at[P.DIFFUSION] + 10 * P.REPRICE_AFTER_S) is None  # AR did not run since
    pol.reprice(P.AR, 1e6)  # a re-timing is clipped like an observation
    assert pol.cost_scale[P.AR] == P.COST_SCALE_LIMITS[1]
    assert pol.summary()["repriced"] == {P.AR: 1, P.DIFFUSION: 1}


def test_recent_load_prices_a_lone_arrival_as_part_of_its_burst():
    """Bandwidth-bound AR (flat to 16 requests) against a diffusion forward that grows with its
    requests: diffusion wins for one request, AR for 16. A lone arrival on an engine that
    recently ran 16 requests a step is priced as one of 16 (AR: a diffusion request among them
    would add a forward to every step), on an idle-for-long engine as one (diffusion); the
    estimate follows the steps' request counts (an EMA)."""
    pol = P.AdaptivePolicy()
    pol.set_costs(P.CostCurve([(1, 0.010), (16, 0.012)]), P.CostCurve([(1, 0.020), (16, 0.320)]))
    assert pol.load == 0 and pol.decide(0, 0, 3.0) == P.DIFFUSION
    assert P.best_split(pol.cost(P.AR), pol.cost(P.DIFFUSION), 16, 3.0) == 16
    pol.observe_load(16)  # the first step sets it
    assert pol.load == 16 and pol.decide(0, 0, 3.0) == P.AR
    for _ in range(200):
        pol.observe_load(1)
    assert pol.load == pytest.approx(1.0, abs=0.01) and pol.decide(0, 0, 3.0) == P.DIFFUSION
    pol.observe_load(0)  # (no step): nothing moves
    assert pol.summary()["load"] == pytest.approx(1.0, abs=0.01)
    # each diffusion assignment is kept with its inputs (/health): two here, the AR one is not
    why = pol.summary()["last_diffusion_decisions"]
    assert len(why) == 2 and why[0]["load"] == 0 and why[1]["load"] == pytest.approx(1.0, abs=0.01)
    assert why[1]["priced_requests"] == 1 and why[1]["best_ar_of_them"] == 0 and why[1]["tpf"] == 3.0
    assert why[1]["rate_best"] > why[1]["rate_all_ar"] > 0
    for _ in range(P.DECISIONS_KEPT + 3):
        pol.decide(0, 0, 3.0)
    assert len(pol.summary()["last_diffusion_decisions"]) == P.DECISIONS_KEPT


def test_a_batch_of_arrivals_is_priced_together():
    """The first of 16 requests that arrive together on an idle engine is priced as one of the
    16 (`arriving`: the rest of the batch), not as a lone request: AR, where alone it would be
    diffusion and then add a diffusion forward to every step of the 15 AR ones beside it."""
    pol = P.AdaptivePolicy()
    pol.set_costs(P.CostCurve([(1, 0.010), (16, 0.012)]), P.CostCurve([(1, 0.020), (16, 0.320)]))
    assert pol.decide(0, 0, 3.0) == P.DIFFUSION and pol.decide(0, 0, 3.0, arriving=0) == P.DIFFUSION
    assert pol.decide(0, 0, 3.0, arriving=15) == P.AR
    assert pol.decide(14, 0, 3.0, arriving=1) == P.AR and pol.decide(0, 0, 3.0, arriving=-3) == P.DIFFUSION


def test_tpf_estimate_starts_at_the_prior_and_follows_finished_requests():
    pol = P.AdaptivePolicy()
    assert pol.tpf == P.TPF_PRIOR
    for _ in range(40):
        pol.observe(30, 10)
    assert pol.tpf == pytest.approx(3.0, abs=1e-3) and pol.observed == 40
    pol.observe(0, 0)  # nothing decoded: no information
    assert pol.observed == 40


def test_prior_is_the_fixed_rate_rules_own_rate_until_a_request_finishes():
    assert P.prior_tpf(SamplingParams(generation_algorithm="steps", steps=8), BLOCK) == BLOCK / 9
    assert P.prior_tpf(SamplingParams(generation_algorithm="steps"), BLOCK) == BLOCK / (BLOCK + 1)
    assert P.prior_tpf(SamplingParams(), BLOCK) == P.TPF_PRIOR
    # a 32-row step costs 2.5 AR forwards: diffusion pays at 3.6 tokens per forward, not at 2
    pol = P.AdaptivePolicy()
    pol.set_costs(P.CostCurve([(1, 0.010)]), P.CostCurve([(1, 0.025)]))
    assert pol.decide(0, 0) == P.AR and pol.decide(0, 0, prior=BLOCK / 9) == P.DIFFUSION
    pol.observe(10, 10)  # observed: the estimate replaces every prior
    assert pol.decide(0, 0, prior=BLOCK / 9) == P.AR


# ----------------------------------------------------------- on the tiny model
@pytest.fixture(scope="module")
def model():
    import bitdlm
    from bitdlm.model import default_model_path

    m = bitdlm.load(default_model_path(), threads=1)
    assert m.meta["diffusion"]["block_size"] == BLOCK
    return m


PROMPTS = ["The cat", "Once upon a time", "Hello", "Tom and Lily went to the park",
           "One day", "The sun", "She said", "A little bird", "They played", "The end of the day"]


def _forced(llm, cost_ar, cost_d):
    """`llm`'s adaptive policy with these cost curves instead of the timed ones."""
    llm.engine.policy.set_costs(P.CostCurve(cost_ar), P.CostCurve(cost_d))
    return llm


def test_the_engine_and_generate_price_a_batch_of_arrivals_together(model):
    """Engine.add_request(..., arriving=k) and LLM.generate's window of prompts: the adaptive
    policy sees the requests that come with one (cost curves: diffusion alone, AR for 16), so a
    batch of 16 all decodes AR, where without the hint the first would have gone diffusion."""
    curves = ([(1, 0.010), (16, 0.012)], [(1, 0.020), (16, 0.320)])
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    eng = _forced(LLM(model, max_batch=16, decode_policy="adaptive"), *curves).engine
    assert [eng.add_request(f"r{i}", [5, 6, 7], sp, arriving=15 - i) for i in range(16)] == ["ar"] * 16
    lone = _forced(LLM(model, max_batch=16, decode_policy="adaptive"), *curves).engine
    assert lone.add_request("x", [5, 6, 7], sp) == "diffusion"
    llm = _forced(LLM(model, max_batch=16, decode_policy="adaptive"), *curves)
    assert [g.decode_mode for g in llm.generate(PROMPTS[:8] * 2, sp)] == ["ar"] * 16
    # (a fresh engine: this one remembers the 16 a step it just ran, and prices a lone one as one of them)
    alone = _forced(LLM(model, max_batch=16, decode_policy="adaptive"), *curves)
    assert alone.generate(PROMPTS[:1], sp)[0].decode_mode == "diffusion"


def test_calibration_times_scratch_forwards_and_frees_them(model):
    llm = LLM(model, max_batch=8, decode_policy="adaptive")
    before = model.kv_bytes_used()
    llm.engine.calibrate()
    pol = llm.engine.policy
    assert pol.calibrated and model.kv_bytes_used() == before
    assert 0 < pol.calibration_seconds < 5
    assert all(s > 0 for s in pol.cost_ar.secs + pol.cost_diffusion.secs)
    assert pol.cost_ar.ns[0] == 1 and max(pol.cost_ar.ns) <= 8
    # a 32-row block costs more than one row, and a real request still decodes afterwards
    assert pol.cost_diffusion(1) > pol.cost_ar(1)
    assert llm.generate("The cat", SamplingParams(max_tokens=8))[0].token_ids


def test_adaptive_outputs_equal_the_fixed_policy_for_the_reported_mode(model):
    """The guarantee, request by request: under load the policy mixes modes (cost curves
    whose best split of the 10 requests is 5 AR + 5 diffusion: each mode cheap up to 5
    requests, dear past them), and each output is exactly what the fixed policy gives that
    request in its reported mode (AR = block_length 1)."""
    llm = _forced(LLM(model, max_batch=16, decode_policy="adaptive"),
                  [(1, 0.010), (5, 0.0101), (6, 0.060), (16, 0.200)],
                  [(1, 0.0101), (5, 0.0102), (6, 0.060), (16, 0.200)])
    params = [SamplingParams(max_tokens=20 + 3 * i, ignore_eos=i % 2 == 0) for i in range(len(PROMPTS))]
    got = llm.generate(PROMPTS, params)
    modes = [g.decode_mode for g in got]
    assert set(modes) == {P.AR, P.DIFFUSION}, modes
    fixed = LLM(model, max_batch=16)  # decode_policy "fixed"
    as_ar = fixed.generate(PROMPTS, [SamplingParams(**{**vars(p), "block_length": 1}) for p in params])
    as_diffusion = fixed.generate(PROMPTS, params)
    assert all(g.decode_mode == P.DIFFUSION for g in as_diffusion) and all(g.decode_mode == P.AR for g in as_ar)
    # (a diffusion request whose block closed after AR ones had finished may have moved to AR:
    # its check is the block-end move's test below; the others decoded in one mode throughout)
    kept = [g.decode_mode for g in got if g.stats["decode_mode_at_end"] == g.decode_mode]
    assert set(kept) == {P.AR, P.DIFFUSION}, kept
    for g, ar, diff, m in zip(got, as_ar, as_diffusion, modes):
        if g.stats["decode_mode_at_end"] != m:
            continue
        want = ar if m == P.AR else diff
        assert (g.token_ids, g.text, g.finish_reason) == (want.token_ids, want.text, want.finish_reason), m
    # the check can fail: the two modes give different text for some of these prompts
    assert any(a.token_ids != d.token_ids for a, d in zip(as_ar, as_diffusion))
    assert llm.engine.policy.assigned == {P.AR: modes.count(P.AR), P.DIFFUSION: modes.count(P.DIFFUSION)}


def _run_engine(eng, arrivals):
    """Drive the engine: `arrivals` maps a step number to [(rid, prompt ids, params)] added
    before that step -> {rid: (token ids, first decode_mode reported, last one)}."""
    toks, modes, step = {}, {}, 0
    while True:
        batch = arrivals.get(step, [])
        for i, (rid, ids, sp) in enumerate(batch):  # a step's arrivals priced together, as the server's loop does
            eng.add_request(rid, ids, sp, arriving=len(batch) - 1 - i)
            toks[rid] = []
        if not eng.has_unfinished() and step > max(arrivals):
            break
        for o in eng.step():
            assert o.error is None, o.error
            toks[o.request_id] += o.new_token_ids
            modes.setdefault(o.request_id, [o.decode_mode, o.decode_mode])[1] = o.decode_mode
        step += 1
    return {rid: (toks[rid], *modes[rid]) for rid in toks}


def _reference_switched(model, prompt, first, switch_at, n):
    """The tokens a request gives that decodes its positions up to `switch_at` (a block end) as
    the diffusion tokens `first` and then greedy AR, driven straight on the core (no engine):
    the K/V of [0, switch_at) written by forwards of whole 32-blocks under the block mask,
    the last of them carrying the first AR token (shift), then one token per forward under
    the causal mask. Mask token banned, first index of the largest logit."""
    x = np.asarray(list(prompt) + list(first), np.int32)
    assert len(x) == switch_at and switch_at % BLOCK == 0  # (the prompt's blocks too: the same K/V as prefill's)
    mask = model.meta["mask_token_id"]
    sid = model.alloc_seq(switch_at + n + BLOCK)
    out = []
    try:
        for b in range(0, switch_at, BLOCK):
            lg = model.forward([(sid, x[b:b + BLOCK], b, b, True, np.array([BLOCK - 1], np.int32))], BLOCK)
        pos = switch_at
        while len(out) < n:
            lg = np.array(lg, np.float32).reshape(-1, lg.shape[-1])[-1]
            lg[mask] = -np.inf
            t = int(np.argmax(lg))
            out.append(t)
            lg = model.forward([(sid, np.array([t], np.int32), pos, pos, True, np.array([0], np.int32))], 1)
            pos += 1
    finally:
        model.free_seq(sid)
    return out


def test_a_burst_moves_its_lone_diffusion_request_to_ar_when_its_block_closes(model):
    """The first arrival of a burst finds an idle engine and takes diffusion; when its block
    closes beside the burst's AR requests, the policy prices it again and it decodes AR from
    there: its tokens are diffusion's up to that block end, then greedy AR against the K/V the
    blocks left (checked on a driver of the core alone), and it reports the move. Alone, it
    stays on diffusion."""

    cost_ar, cost_d = [(1, 0.010), (4, 0.0101), (16, 0.0104)], [(1, 0.0101), (2, 0.020), (16, 0.160)]
    prompt = LLM(model).engine.tokenizer.encode('def parse_args(argv):\n    """Parse the command line."""\n')
    switch_at = (len(prompt) // BLOCK + 1) * BLOCK  # the end of the first block it generates into
    sp = SamplingParams(max_tokens=70, ignore_eos=True)
    others = [(f"o{i}", list(range(100 + i, 120 + i)), SamplingParams(max_tokens=40, ignore_eos=True))
              for i in range(8)]
    llm = _forced(LLM(model, max_batch=16, decode_policy="adaptive"), cost_ar, cost_d)
    got = _run_engine(llm.engine, {0: [("first", prompt, sp)], 2: others})
    toks, mode0, mode1 = got["first"]
    assert (mode0, mode1) == (P.DIFFUSION, P.AR)
    # the burst ends on AR (the second arrival ties at two requests and takes diffusion too)
    assert all(got[r][2] == P.AR for r, _, _ in others)
    moved = [r for r, (_, m0, m1) in got.items() if (m0, m1) == (P.DIFFUSION, P.AR)]
    assert llm.engine.policy.switched == len(moved) and llm.engine.policy.summary()["switched_to_ar"] == len(moved)
    # alone (the same request, nothing beside it): diffusion to the end, the same first block
    alone = _forced(LLM(model, max_batch=16, decode_policy="adaptive"), cost_ar, cost_d)
    solo, m0, m1 = _run_engine(alone.engine, {0: [("first", prompt, sp)]})["first"]
    assert (m0, m1) == (P.DIFFUSION, P.DIFFUSION) and alone.engine.policy.switched == 0
    k = switch_at - len(prompt)
    assert toks[:k] == solo[:k]
    assert len(toks) == 70 and toks[k:] == _reference_switched(model, prompt, toks[:k], switch_at, 70 - k)
    # the check can fail: diffusion's own continuation differs from the AR one here
    assert solo[k:] != toks[k:]
    # LLM.generate (one output at the end, its tokens read back from the request's history)
    # gives what the streamed steps gave, for the same arrivals (all at once, priced together:
    # all AR from the start, nothing to move)
    reqs = [("first", prompt, sp)] + others
    streamed = _run_engine(_forced(LLM(model, max_batch=16, decode_policy="adaptive"), cost_ar, cost_d).engine,
                           {0: reqs})
    final = _forced(LLM(model, max_batch=16, decode_policy="adaptive"), cost_ar, cost_d)
    gens = final.generate([ids for _, ids, _ in reqs], [p for _, _, p in reqs])
    assert final.engine.policy.switched == 0 and {g.decode_mode for g in gens} == {P.AR}
    assert [g.token_ids for g in gens] == [streamed[r][0] for r, _, _ in reqs]
    assert [(g.decode_mode, g.stats["decode_mode_at_end"]) for g in gens] == [streamed[r][1:] for r, _, _ in reqs]


def test_the_engine_prices_its_decoding_forwards_and_not_its_prompt_chunks(model, monkeypatch):
    """Every forward of AR / the default diffusion with select outputs and no prompt chunk
    reaches observe_forward once, with its number of requests; prefill forwards never do."""
    llm = _forced(LLM(model, max_batch=8, decode_policy="adaptive"), [(1, 0.01)], [(1, 0.01)])
    eng = llm.engine
    seen, expected = [], []
    monkeypatch.setattr(eng.policy, "observe_forward", lambda mode, n, s: seen.append((mode, n)))
    real = eng.scheduler.forward

    def spy(key, batch, outputs):
        prefill = any(m.plan.kind == "prefill" for m in batch.members)
        n = len(batch.members) + (len(batch.group.seqs) if batch.group is not None else 0)
        if key.mode == "select" and not prefill:
            expected.append((P.mode_of(key.block_size), n))
        spy.prefills += prefill
        return real(key, batch, outputs)

    spy.prefills = 0
    monkeypatch.setattr(eng.scheduler, "forward", spy)
    long_prompt = " ".join(PROMPTS) * 3  # whole blocks: prefill forwards
    params = [SamplingParams(max_tokens=12), SamplingParams(max_tokens=12, block_length=1)]
    llm.generate([long_prompt, "The cat", "Hello"], params[0])
    llm.generate([long_prompt, "One day"], params[1])
    assert spy.prefills >= 2 and seen == expected
    assert {m for m, _ in seen} == {P.AR, P.DIFFUSION} and max(n for _, n in seen) >= 2


def _stale(pol, mode):
    """Back-date `mode`'s last price: the other mode served since, REPRICE_AFTER_S ago."""
    other = P.AR if mode == P.DIFFUSION else P.DIFFUSION
    pol.served_at[other] = time.monotonic()
    pol.priced_at[mode] = pol.served_at[other] - P.REPRICE_AFTER_S - 1.0


def test_an_idle_engine_times_a_stale_mode_again(model):
    """Engine.reprice_idle times the stale mode on a scratch sequence (freed) and sets its
    scale from that against the calibrated curve; never while a request is queued."""
    llm = LLM(model, max_batch=4, decode_policy="adaptive")
    eng = llm.engine
    eng.calibrate()
    pol = eng.policy
    assert eng.reprice_idle() is None  # nothing stale after calibration
    pol.cost_scale[P.DIFFUSION] = 4.0  # priced out
    _stale(pol, P.DIFFUSION)
    eng.add_request("r", eng.tokenizer.encode("The cat"), SamplingParams(max_tokens=4))
    assert eng.reprice_idle() is None and pol.repriced[P.DIFFUSION] == 0  # a request is queued
    while eng.has_unfinished():
        eng.step()
    _stale(pol, P.DIFFUSION)
    before = model.kv_bytes_used()
    assert eng.reprice_idle() == P.DIFFUSION
    assert pol.repriced[P.DIFFUSION] == 1 and model.kv_bytes_used() == before
    lo, hi = P.COST_SCALE_LIMITS
    assert lo < pol.cost_scale[P.DIFFUSION] < hi  # the tiny model's forward, timed again: not 4x the curve
    assert eng.reprice_idle() is None  # priced now


def test_the_server_times_a_stale_mode_while_idle(model, monkeypatch):
    """The engine thread, idle for REPRICE_IDLE_S, re-times the stale mode; /health shows it."""
    from fastapi.testclient import TestClient

    from bitdlm.server import engine_loop

    monkeypatch.setattr(engine_loop, "REPRICE_IDLE_S", 0.05)
    engine, app = _app(model, "adaptive")
    with TestClient(app) as c:
        assert c.post("/v1/completions", json={"prompt": "The cat", "max_tokens": 4}).status_code == 200
        pol = engine.policy
        _stale(pol, P.AR)  # (written from this thread: the engine thread only reads it while idle)
        deadline = time.monotonic() + 10
        while pol.repriced[P.AR] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.get("/health").json()["decode_policy_state"]["repriced"][P.AR] == 1
        assert c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4}).status_code == 200


def test_the_engine_reports_each_steps_request_count_as_the_load(model, monkeypatch):
    """observe_load gets, once per step that ran a forward, the requests running in it
    (those that finish in the step included)."""
    llm = _forced(LLM(model, max_batch=8, decode_policy="adaptive"), [(1, 0.01)], [(1, 0.01)])
    eng = llm.engine
    seen = []
    monkeypatch.setattr(eng.policy, "observe_load", seen.append)
    for i, prompt in enumerate(PROMPTS[:3]):
        eng.add_request(f"r{i}", eng.tokenizer.encode(prompt), SamplingParams(max_tokens=4 + 4 * i, ignore_eos=True))
    steps = 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
    assert len(seen) == steps and seen[0] == 3 and seen[-1] == 1 and sorted(seen, reverse=True) == seen


def test_explicit_decoding_is_never_reassigned(model):
    """Costs under which every free request gets AR: requests that chose their decoding
    keep it, and so do those without a cache (the cost model does not describe them)."""
    llm = _forced(LLM(model, decode_policy="adaptive"), [(1, 0.001)], [(1, 1.0)])
    pinned = [dict(block_length=BLOCK), dict(small_block_size=8), dict(generation_algorithm="steps", steps=8),
              dict(steps=8), dict(generation_algorithm="factor"), dict(decoding_set=True), dict(cache="none"),
              dict(block_length=16)]
    free = [dict(), dict(threshold=0.5), dict(cache="dual"), dict(decoding_set=False, small_block_size=8)]
    got = llm.generate(["The cat"] * (len(pinned) + len(free)),
                       [SamplingParams(max_tokens=4, **kw) for kw in pinned + free])
    assert [g.decode_mode for g in got] == [P.DIFFUSION] * len(pinned) + [P.AR] * len(free)
    assert llm.engine.policy.assigned[P.AR] == len(free)
    # block_length 1 asked for is AR under either policy, and not the policy's choice
    assert llm.generate("The cat", SamplingParams(max_tokens=4, block_length=1))[0].decode_mode == P.AR
    assert llm.engine.policy.assigned[P.AR] == len(free)


def test_fixed_policy_reports_the_mode_and_has_no_policy_state(model):
    llm = LLM(model)
    assert llm.engine.decode_policy == "fixed" and llm.engine.policy is None
    got = llm.generate(["The cat", "Hello"], [SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, block_length=1)])
    assert [g.decode_mode for g in got] == [P.DIFFUSION, P.AR]
    with pytest.raises(ValueError, match="decode_policy must be one of fixed, adaptive"):
        LLM(model, decode_policy="fast")
    # an AR engine has nothing to choose: adaptive decodes as fixed
    assert LLM(model, block_size=1, decode_policy="adaptive").engine.policy is None


# --------------------------------------------------------------------- the server
def _app(model, policy, **config):
    from bitdlm.engine import Engine
    from bitdlm.server import ServerConfig, create_app
    from bitdlm.tokenizer import model_tokenizer

    tok = model_tokenizer(model)
    engine = Engine(model, max_batch=4, tokenizer=tok, decode_policy=policy)
    cfg = ServerConfig(served_model_name="tiny", max_model_len=int(model.meta["max_position_embeddings"]),
                       vocab_size=int(model.meta["vocab_size"]), max_batch=4, **config)
    return engine, create_app(engine, tok, cfg)


def _metric(text, sample):
    import re

    m = re.search("^" + re.escape(sample) + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_server_reports_policy_modes_and_keeps_explicit_choices(model):
    from fastapi.testclient import TestClient

    # server defaults (--small-block-size, --steps) are not the client's choice: they pin nothing
    engine, app = _app(model, "adaptive",
                       default_params={"small_block_size": 8, "generation_algorithm": "steps", "steps": 8})
    with TestClient(app) as c:
        h = c.get("/health").json()
        assert h["decode_policy"] == "adaptive"
        assert h["decode_policy_state"]["calibrated"]  # timed on the engine thread before serving
        engine.policy.set_costs(P.CostCurve([(1, 0.001)]), P.CostCurve([(1, 1.0)]))  # AR wins

        def mode(path="/v1/completions", **body):
            r = c.post(path, json={"prompt": "The cat", "max_tokens": 4, **body})
            assert r.status_code == 200, r.text
            return r.headers.get("x-bitdlm-decode-mode")

        assert mode() == "ar"
        assert mode(prompt=["The cat", "Hello"]) == "ar,ar"
        assert mode(stream=True) == "ar"
        for explicit in (dict(small_block_size=8), dict(generation_algorithm="threshold"),
                         dict(block_length=32), dict(steps=8), dict(use_cache=False)):
            assert mode(**explicit) == "diffusion", explicit
        r = c.post("/generate", json={"text": "The cat", "max_new_tokens": 4})
        assert r.json()["meta_info"]["decode_mode"] == "ar" and r.headers["x-bitdlm-decode-mode"] == "ar"
        text = c.get("/metrics").text
        assert _metric(text, 'bitdlm_decode_policy_info{policy="adaptive"}') == 1.0
        assert _metric(text, 'bitdlm_requests_decode_mode_total{mode="ar"}') == 5.0
        assert _metric(text, 'bitdlm_requests_decode_mode_total{mode="diffusion"}') == 5.0
        assert _metric(text, "bitdlm_decode_policy_tokens_per_forward") > 0
        pol = engine.policy  # AR requests ran: its scale left 1.0, and /metrics and /health show it
        assert pol.forwards_observed["ar"] > 0 and pol.cost_scale["ar"] != 1.0
        assert _metric(text, 'bitdlm_decode_policy_cost_scale{mode="ar"}') == pytest.approx(pol.cost_scale["ar"])
        assert c.get("/health").json()["decode_policy_state"]["forwards_observed"]["ar"] == pol.forwards_observed["ar"]
    engine, app = _app(model, "fixed")
    with TestClient(app) as c:
        h = c.get("/health").json()
        assert h["decode_policy"] == "fixed" and "decode_policy_state" not in h
        assert c.post("/v1/completions", json={"prompt": "The cat", "max_tokens": 4}).headers[
            "x-bitdlm-decode-mode"] == "diffusion"
        text = c.get("/metrics").text
        assert _metric(text, 'bitdlm_decode_policy_info{policy="fixed"}') == 1.0
        assert _metric(text, "bitdlm_decode_policy_tokens_per_forward") is None
        assert _metric(text, 'bitdlm_decode_policy_cost_scale{mode="ar"}') is None


def test_bad_decode_policy_and_steps_flags_are_clear_errors(capsys):
    import re

    from bitdlm.cli import main
    from bitdlm.model import default_model_path
    from server_helpers import free_port

    def fails(argv, pattern):
        with pytest.raises(SystemExit) as ei:
            main(["serve", "--port", str(free_port())] + argv)
        err = capsys.readouterr().err
        assert ei.value.code == 2 and re.search(pattern, err), err

    # (the quoting of the choices differs between Python versions)
    fails(["--decode-policy", "fast"], r"--decode-policy: invalid choice: 'fast' \(choose from '?fixed'?, '?adaptive'?\)")
    fails(["--model", default_model_path(), "--steps", "2"],
          r"error: --steps 2: steps 2 is fewer than the 4 sub-blocks of a block")
    fails(["--steps", "0"], r"--steps must be >= 1")


def test_failed_calibration_leaves_requests_as_they_ask(model, monkeypatch):
    llm = LLM(model, decode_policy="adaptive")

    def no_memory(*a, **k):
        raise MemoryError("no KV cache left")

    monkeypatch.setattr(P, "calibrate", no_memory)
    g = llm.generate("The cat", SamplingParams(max_tokens=4))[0]
    assert g.decode_mode == P.DIFFUSION and not llm.engine.policy.calibrated
    assert llm.engine.policy.assigned == {P.AR: 0, P.DIFFUSION: 0}
