"""Decoding algorithms and cache strategies per request (bitdlm.decoding), per-request
error isolation in the engine, and their HTTP face.

Every (algorithm, cache) pair is checked token for token against the independent
reference decoder (tests/ref_decoder.py, transformers' BitNet + DynamicCache) on the
tiny sharpened models of tests/test_engine.py (f32 KV cache)."""
from __future__ import annotations

import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import bitdlm  # noqa: E402
from bitdlm import decoding  # noqa: E402
from bitdlm.engine import Engine, OutputProcessor, RequestState  # noqa: E402
from bitdlm.llm import LLM  # noqa: E402
from bitdlm.sampling_params import SamplingParams  # noqa: E402

from ref_decoder import RefDecoder  # noqa: E402
from engine_models import BS, SBS, Counting, backend, prompt_ids  # noqa: E402

pytestmark = pytest.mark.torch  # the reference decoder runs transformers

ALGOS = {"threshold": dict(threshold=0.7), "factor": dict(factor=1.0),
         "credit": dict(threshold=0.95, credit_alpha=1.5, decay_beta=0.5),
         "hierarchy": dict(threshold=0.95, low_threshold=0.2),
         "steps": dict(steps=3)}  # block 8 / sub-block 4: 2 + 1 steps, so 2+1 / 4 tokens; other sizes alike


# As in tests/test_default_model.py: online int8 activation quantization lets a 1e-6
# difference flip one activation code, so two correct implementations may part at a
# decision closer than this (top-1 vs top-2, a confidence vs its bound, the order of two
# candidates); tokens are compared exactly up to such a near-tie of the reference.
NEAR_TIE = 1e-3


def _ref(m, prompt, *, max_tokens, algorithm, cache, block_size=BS, sbs=SBS, **kw):
    d = m.meta["diffusion"]
    r = RefDecoder(m.hf, block_size=block_size, mask_id=m.meta["mask_token_id"], shift=d["shift_logits"])
    toks = r.generate(prompt, max_new_tokens=max_tokens, small_block_size=sbs, stop_ids=m.meta["eos_token_ids"],
                      algorithm=algorithm, cache=cache, **kw)
    return toks, r


def _agreed(got, want, ref, plen) -> int:
    """Tokens that agree; a divergence must follow a near-tie of the reference decoding."""
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if i is None:
        assert got == want, (plen, got, want)  # same tokens, same length
        return len(want)
    close = ref.closest_call_before(plen + i)
    assert close < NEAR_TIE, (plen, i, close, got, want)
    return i


# ------------------------------------------------------------- the rules alone
def test_threshold_rule():
    a = decoding.make("threshold", threshold=0.8)
    assert a.select(np.array([0.5, 0.9, 0.85, 0.1])).tolist() == [1, 2]
    assert a.select(np.array([0.5, 0.3])).tolist() == [0]  # always the most confident
    assert a.select(np.array([0.95, 0.9, 0.7]), np.array([False, True, True])).tolist() == [1]


def test_factor_rule_and_its_off_by_one():
    a = decoding.make("factor", factor=1.0)
    # bounds 1 - 1/(k+1): k=2: 0.667, k=3: 0.75, k=4: 0.8
    assert a.select(np.array([0.9, 0.99, 0.5])).tolist() == [0, 1]
    # upstream unmasks all three here (only the last fails); ours keeps the failing one masked
    assert a.select(np.array([0.7, 0.99, 0.74])).tolist() == [1, 2]
    assert a.select(np.array([0.99, 0.9, 0.8, 0.81])).tolist() == [0, 1, 2, 3]
    assert a.select(np.array([0.2, 0.1])).tolist() == [0]  # at least one
    assert decoding.make("factor", factor=3.0).select(np.array([0.3, 0.26, 0.1])).tolist() == [0, 1]
    assert a.select(np.array([0.99, 0.2, 0.98]), np.array([True, True, False])).tolist() == [0]


def test_hierarchy_rule():
    a = decoding.make("hierarchy", threshold=0.9, low_threshold=0.4)
    # runs of neighbours [10, 11, 12] and [14, 15]: each run's best above 0.4, plus > 0.9
    conf = np.array([0.5, 0.7, 0.3, 0.45, 0.2])
    assert a.select(conf, positions=[10, 11, 12, 14, 15]).tolist() == [1, 3]
    # the same confidences as one run: only its best (and nothing above 0.9)
    assert a.select(conf, positions=[10, 11, 12, 13, 14]).tolist() == [1]
    # a run whose best is below low_threshold gives nothing; the most confident always
    assert a.select(np.array([0.3, 0.35, 0.95]), positions=[0, 1, 5]).tolist() == [2]
    assert a.select(np.array([0.1, 0.2]), positions=[0, 2]).tolist() == [1]
    # masked picks the candidates; runs are over their positions
    assert a.select(np.array([0.6, 0.99, 0.5]), np.array([True, False, True]), positions=[0, 1, 2]).tolist() \
        == [0, 2]


def test_aliases_pick_rule_and_cache():
    sp = SamplingParams(generation_algorithm="dinfer_hierarchy")
    sp.validate()
    assert sp.cache_strategy() == "dual" and sp.algorithm_values() == {}
    assert decoding.make("dinfer_hierarchy").name == "hierarchy"
    assert SamplingParams(generation_algorithm="basic").cache_strategy() == "none"
    assert SamplingParams(generation_algorithm="basic", cache="prefix").cache_strategy() == "prefix"
    assert SamplingParams(generation_algorithm="prefix_cache", use_block_cache=True).cache_strategy() == "dual"
    assert decoding.make("dinfer_credit", threshold=0.5).name == "credit"


def test_credit_accumulates_for_a_stable_top1():
    V = 6
    lg = np.log(np.array([[0.5, 0.3, 0.1, 0.05, 0.03, 0.02]], np.float32))
    a = decoding.make("credit", threshold=0.9)
    confs = [float(a.fuse([3], lg)[1][0]) for _ in range(4)]
    assert all(b > c for b, c in zip(confs[1:], confs))  # the same top-1 gains credit every step
    assert confs[0] > 0.5  # even the first step boosts the top-1
    # by hand: credit after 2 steps = 0.5**0.2 * 0.8 + 0.5**0.2
    c = 0.5 ** 0.2 * 0.8 + 0.5 ** 0.2
    f = lg[0] + np.array([0.7 * math.log1p(c)] + [0] * (V - 1))
    want = np.exp(f[0]) / np.exp(f).sum()
    b = decoding.make("credit", threshold=0.9)
    b.fuse([3], lg)
    assert abs(float(b.fuse([3], lg)[1][0]) - want) < 1e-6
    b.reset()
    assert abs(float(b.fuse([3], lg)[1][0]) - confs[0]) < 1e-7  # a new block forgets


def _steps_rule(steps, bs=32, sbs=8):
    a = decoding.make("steps", steps=steps)
    a.configure(bs, sbs)
    return a


def _counts(a, masks, sub, sbs=8):
    """Tokens the rule unmasks per step while it decodes sub-block `sub` starting with `masks` masks."""
    counts, left = [], list(range(sub * sbs + sbs - masks, sub * sbs + sbs))
    conf = np.random.default_rng(masks).random(sbs)
    while left:
        pos = np.array(left)
        sel = a.select(conf[pos - sub * sbs], positions=pos)
        counts.append(len(sel))
        left = [p for i, p in enumerate(left) if i not in set(sel.tolist())]
    return counts


def test_steps_rule_schedule():
    # LLaDA: 11 steps over 4 sub-blocks -> 3, 3, 3, 2; 8 masks in 3 steps -> 3, 3, 2; 7 in 3 -> 3, 2, 2
    a = _steps_rule(11)
    assert [a.sub_block_steps(j) for j in range(4)] == [3, 3, 3, 2]
    assert _counts(a, 8, 0) == [3, 3, 2] and _counts(a, 7, 1) == [3, 2, 2] and _counts(a, 8, 3) == [4, 4]
    a.reset()  # a new block: sub-block 0 gets its steps again
    assert _counts(a, 3, 0) == [1, 1, 1] and _counts(a, 2, 2) == [1, 1]
    assert _counts(_steps_rule(4), 8, 1) == [8]  # 8 tokens per forward
    assert _counts(_steps_rule(None), 8, 0) == [1] * 8  # default: one per step
    assert _counts(_steps_rule(64), 8, 0) == [1] * 8  # more steps than masks: one per step, no empty step
    assert _counts(_steps_rule(1, bs=1, sbs=1), 1, 0, sbs=1) == [1]  # autoregressive


def test_steps_rule_takes_the_most_confident_and_the_leftmost_of_ties():
    # 8 steps per block of 32: 2 per sub-block of 8, so 4 masks go 2 at a time
    assert _steps_rule(8).select(np.array([0.2, 0.9, 0.5, 0.8]), positions=np.arange(4, 8)).tolist() == [1, 3]
    assert _steps_rule(8).select(np.array([0.3, 0.7, 0.7, 0.7]), positions=np.arange(8, 12)).tolist() == [1, 2]
    assert _steps_rule(8).select(np.array([0.9, 0.5, 0.5]), np.array([False, True, True]),
                                 positions=np.array([9, 10, 11])).tolist() == [1]


def test_steps_rule_needs_a_step_per_sub_block():
    with pytest.raises(ValueError, match="fewer than the 4 sub-blocks"):
        _steps_rule(3)
    _steps_rule(4)
    with pytest.raises(ValueError, match="positions"):
        decoding.make("steps", steps=4).select(np.array([0.5]))


def test_describe_lists_every_rule_with_defaults():
    d = decoding.describe()
    got = {a["name"]: {p["name"]: p["default"] for p in a["parameters"]} for a in d["algorithms"]}
    assert got == {"threshold": {"threshold": None}, "factor": {"factor": 1.0},
                   "credit": {"threshold": None, "credit_alpha": 0.7, "boost_gamma": 0.2, "decay_beta": 0.8},
                   "hierarchy": {"threshold": None, "low_threshold": 0.4},
                   "steps": {"steps": None}}
    assert {a["name"]: (a["algorithm"], a["cache"]) for a in d["aliases"]} == {
        "basic": ("threshold", "none"), "prefix_cache": ("threshold", "prefix"), "dual_cache": ("threshold", "dual"),
        "dinfer_blockwise": ("threshold", "dual"), "dinfer_hierarchy": ("hierarchy", "dual"),
        "dinfer_credit": ("credit", "dual")}
    assert d["default"] == "threshold" and d["default_cache"] == "prefix"
    assert [c["name"] for c in d["caches"]] == ["none", "prefix", "dual"]


# ------------------------------------------------------------- SamplingParams
def test_sampling_params_module():
    import bitdlm.llm

    assert bitdlm.SamplingParams is bitdlm.llm.SamplingParams is SamplingParams
    code = "import sys, bitdlm.engine; sys.exit('bitdlm.llm' in sys.modules)"
    from hf_models import child_env

    assert subprocess.run([sys.executable, "-c", code], env=child_env()).returncode == 0


@pytest.mark.parametrize("kw, match", [
    (dict(top_p=1e-320), "top_p"),  # 0.0 in float32: the core would reject it in the batched step
    (dict(top_p=float("nan")), "top_p"),
    (dict(temperature=1e39), "temperature"),  # inf in float32
    (dict(temperature=float("inf")), "temperature"),
    (dict(threshold=float("nan")), "threshold"),
    (dict(threshold=0.0), "threshold"),
    (dict(generation_algorithm="beam"), "threshold, factor, credit, hierarchy, steps"),
    (dict(generation_algorithm=None), "threshold, factor, credit, hierarchy, steps"),
    (dict(cache="full"), "none, prefix, dual"),
    (dict(cache="prefix", use_block_cache=True), "use_block_cache"),
    (dict(factor=0.0), "factor"),
    (dict(factor=float("inf")), "factor"),
    (dict(generation_algorithm="factor", factor=-1), "factor"),
    (dict(decay_beta=1.5), "decay_beta"),
    (dict(credit_alpha=-0.1), "credit_alpha"),
    (dict(boost_gamma=True), "boost_gamma"),
    (dict(steps=0), "steps"),
    (dict(steps=2.0), "steps"),
    (dict(steps=True), "steps"),
    (dict(generation_algorithm="steps", steps=-3), "steps"),
    (dict(block_length=0), "block_length"),
    (dict(block_length=2.0), "block_length"),
    (dict(seed=-1), "seed"),  # numpy's generator takes none
])
def test_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw).validate()


def test_tiny_temperature_is_greedy(models):
    # 1e-40 is a float32 denormal: logits / T would overflow to NaN confidences in the core
    m = models[True]
    llm = LLM(backend(m))
    prompt = prompt_ids(5, seed=90)
    greedy = llm.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    for algo in ("threshold", "credit"):
        sp = SamplingParams(max_tokens=12, ignore_eos=True, temperature=1e-40, seed=1, generation_algorithm=algo)
        assert llm.generate(prompt, sp)[0].token_ids == llm.generate(
            prompt, SamplingParams(max_tokens=12, ignore_eos=True, generation_algorithm=algo))[0].token_ids
    assert llm.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True, temperature=1e-40))[0].token_ids \
        == greedy


def test_engine_rejects_what_it_cannot_run(models):
    m = models[True]
    eng = Engine(backend(m))
    for kw, match in [(dict(top_p=1e-320), "top_p"), (dict(block_length=6, small_block_size=4), "small_block_size"),
                      (dict(generation_algorithm="steps", steps=1), "fewer than the 2 sub-blocks"),
                      (dict(block_length=4, small_block_size=8), "small_block_size"),
                      (dict(block_length=10 ** 6), "block_length")]:
        with pytest.raises(ValueError, match=match):
            eng.add_request("r", [5, 6], SamplingParams(**kw))
        assert not eng.has_unfinished()
    eng_ns = Engine(backend(models[False]))
    with pytest.raises(ValueError, match="shifted"):
        eng_ns.add_request("r", [5, 6], SamplingParams(block_length=1))


# ------------------------------------------------------------- against the reference
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("algorithm", list(ALGOS))
def test_matches_reference(models, shift, cache, algorithm):
    m = models[shift]
    kw = ALGOS[algorithm]
    llm = LLM(backend(m))
    agreed = differs = 0
    for plen in (1, BS, BS + 3):
        prompt = prompt_ids(plen, seed=200 + plen)
        want, ref = _ref(m, prompt, max_tokens=18, algorithm=algorithm, cache=cache, **kw)
        got = llm.generate(prompt, SamplingParams(max_tokens=18, generation_algorithm=algorithm, cache=cache,
                                                  **kw))[0]
        agreed += _agreed(got.token_ids, want, ref, plen)
        if algorithm in ("credit", "hierarchy"):  # must change decisions, not be the threshold rule in disguise
            plain = llm.generate(prompt, SamplingParams(max_tokens=18, threshold=kw["threshold"], cache=cache))[0]
            differs += plain.token_ids != got.token_ids
    assert agreed >= 30, agreed
    assert algorithm not in ("credit", "hierarchy") or differs, f"{algorithm} decoded exactly like the threshold rule"


@pytest.mark.parametrize("algorithm", list(ALGOS))
def test_block_length_per_request_matches_reference(models, algorithm):
    m = models[True]
    kw = ALGOS[algorithm]
    llm = LLM(backend(m))
    agreed = 0
    for bl, sbs in ((4, 2), (16, 8), (1, 1)):
        prompt = prompt_ids(6, seed=300 + bl)
        want, ref = _ref(m, prompt, max_tokens=14, algorithm=algorithm, cache="prefix", block_size=bl, sbs=sbs,
                         **kw)
        got = llm.generate(prompt, SamplingParams(max_tokens=14, generation_algorithm=algorithm, block_length=bl,
                                                  small_block_size=sbs, **kw))[0]
        agreed += _agreed(got.token_ids, want, ref, len(prompt))
    assert agreed >= 24, agreed


def test_none_cache_recomputes_from_zero(models):
    m = models[True]
    be = backend(m)
    prompt = prompt_ids(BS + 3, seed=7)
    LLM(be).generate(prompt, SamplingParams(max_tokens=12, cache="none", ignore_eos=True))
    # every step ran the whole sequence so far from position 0, and nothing was prefilled
    assert be.token_counts[0] == BS * 2 and max(be.token_counts) == len(prompt) - 3 + 2 * BS
    be2 = backend(m)
    LLM(be2).generate(prompt, SamplingParams(max_tokens=12, cache="prefix", ignore_eos=True))
    assert max(be2.token_counts) == BS


def test_steps_fixes_the_forwards(models):
    # a prompt of one block (its last logits give the first token), 3 blocks of 8 in sub-blocks of 4:
    # per block, steps S and one commit; S = 2: the carried token leaves 3 masks + 4 masks, one step each
    m = models[True]
    llm = LLM(backend(m))
    prompt = prompt_ids(BS, seed=17)
    for steps, per_block in ((2, 3), (3, 4), (8, 8)):  # steps 8 >= masks per sub-block: 3 + 4 steps, + commit
        g = llm.generate(prompt, SamplingParams(max_tokens=3 * BS, ignore_eos=True, generation_algorithm="steps",
                                                steps=steps))[0]
        assert len(g.token_ids) == 3 * BS
        assert g.stats["forwards"] == 1 + 2 * per_block + (per_block - 1), (steps, g.stats)


def test_factor_and_credit_decode_in_parallel(models):
    m = models[True]
    llm = LLM(backend(m))
    prompt = prompt_ids(5, seed=16)
    tpf = {}
    for name, kw in [("threshold", dict(threshold=1.0)), ("factor", dict(factor=2.0)),
                     ("credit", dict(threshold=0.9))]:
        g = llm.generate(prompt, SamplingParams(max_tokens=24, ignore_eos=True, generation_algorithm=name, **kw))[0]
        tpf[name] = g.stats["tokens_per_forward"]
    assert tpf["factor"] > 1.3 * tpf["threshold"] and tpf["credit"] > 1.1 * tpf["threshold"], tpf


def test_mixed_batch_equals_alone(models):
    m = models[True]
    prompts = [prompt_ids(n, seed=40 + n) for n in (1, BS - 1, BS, BS + 3, 5, 9)]
    params = [SamplingParams(max_tokens=12, generation_algorithm="factor", cache="none"),
              SamplingParams(max_tokens=9, generation_algorithm="credit", cache="dual"),
              SamplingParams(max_tokens=14, threshold=0.5, block_length=4, small_block_size=2),
              SamplingParams(max_tokens=10, generation_algorithm="credit", block_length=16),
              SamplingParams(max_tokens=8, temperature=0.8, seed=3, generation_algorithm="credit", cache="none"),
              SamplingParams(max_tokens=11, temperature=0.7, seed=4, top_p=0.9, generation_algorithm="factor",
                             block_length=4)]
    alone = [LLM(backend(m)).generate(p, sp)[0] for p, sp in zip(prompts, params)]
    be = backend(m)
    together = LLM(be).generate(prompts, params)
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    # one forward per (block size, select / logits) group and step: never one per request
    assert max(be.calls) >= 2
    assert be.kv == {} and be.model.kv_bytes_used() == 0


# ------------------------------------------------------------- errors stay with their request
class Faulty(Counting):
    """Counting backend whose forward raises for calls holding a poisoned sequence, or for every
    call while `broken`."""

    def __init__(self, path):
        super().__init__(path)
        self.poisoned, self.broken = set(), False

    def forward(self, items, *args, **kw):
        if self.broken or any(it[0] in self.poisoned for it in items):
            self.calls.append(len(items))
            raise RuntimeError("simulated core fault")
        return super().forward(items, *args, **kw)


def _run(eng):
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


def _alone(m, prompt, sp):
    return LLM(backend(m)).generate(prompt, sp)[0].token_ids


def test_forward_fault_fails_only_its_request(models):
    m = models[True]
    be = Faulty(m.path)
    eng = Engine(be, tokenizer=be.tokenizer)
    sp = SamplingParams(max_tokens=10, ignore_eos=True)
    prompts = {r: prompt_ids(4 + i, seed=60 + i) for i, r in enumerate("abc")}
    for r, p in prompts.items():
        eng.add_request(r, p, sp)
    eng.scheduler.admit([])
    be.poisoned.add(eng.scheduler.running["b"].seq_id)
    outs = _run(eng)
    last = {r: o[-1] for r, o in outs.items()}
    assert last["b"].finish_reason == "error" and "simulated core fault" in last["b"].error
    for r in "ac":
        assert last[r].finish_reason == "length" and last[r].error is None
        assert sum((o.new_token_ids for o in outs[r]), []) == _alone(m, prompts[r], sp)
    assert be.kv == {}


def test_value_the_core_rejects_fails_only_its_request(models):
    # a top_p that is 0.0 in float32 slipped past validation (changed after add_request): the
    # core rejects the batched forward; the retry item by item pins it on that request alone
    m = models[True]
    be = backend(m)
    eng = Engine(be, tokenizer=be.tokenizer)
    good = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.7, seed=5)
    bad = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.7, seed=6)
    eng.add_request("good", prompt_ids(4, seed=95), good)
    eng.add_request("bad", prompt_ids(5, seed=96), bad)
    bad.top_p = 1e-320
    outs = _run(eng)
    assert outs["bad"][-1].finish_reason == "error" and "top_p" in outs["bad"][-1].error
    assert outs["good"][-1].finish_reason == "length"
    assert sum((o.new_token_ids for o in outs["good"]), []) == _alone(m, prompt_ids(4, seed=95), good)
    assert be.kv == {}


def test_nobodys_fault_fails_the_step_and_the_engine_goes_on(models):
    m = models[True]
    be = Faulty(m.path)
    eng = Engine(be, tokenizer=be.tokenizer)
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    eng.add_request("a", prompt_ids(3, seed=1), sp)
    eng.add_request("b", prompt_ids(4, seed=2), sp)
    eng.step()
    be.broken = True
    outs = eng.step()
    assert sorted(o.request_id for o in outs) == ["a", "b"]
    assert all(o.finished and o.finish_reason == "error" and o.error for o in outs)
    assert not eng.has_unfinished() and be.kv == {}
    be.broken = False
    eng.add_request("c", prompt_ids(5, seed=3), sp)
    outs = _run(eng)
    assert sum((o.new_token_ids for o in outs["c"]), []) == _alone(m, prompt_ids(5, seed=3), sp)


@pytest.mark.parametrize("cls, where", [(RequestState, "plan"), (RequestState, "apply"),
                                        (OutputProcessor, "collect")])
def test_exception_in_one_requests_step_ends_it_alone(models, monkeypatch, cls, where):
    m = models[True]
    be = backend(m)
    eng = Engine(be, tokenizer=be.tokenizer)
    orig = getattr(cls, where)
    calls = {"n": 0}

    def boom(*a):
        seq = next(x for x in a if isinstance(x, RequestState))
        if seq.rid == "bad":
            calls["n"] += 1
            if calls["n"] == 2:  # not at once: the request has already taken part in a step
                raise KeyError("injected")
        return orig(*a)

    monkeypatch.setattr(cls, where, boom)
    # the per-request path (the group path's faults: tests/test_scheduler.py)
    eng.scheduler.group_path = cls is OutputProcessor
    sp = SamplingParams(max_tokens=9, ignore_eos=True, generation_algorithm="factor")
    good = {"g1": prompt_ids(3, seed=70), "g2": prompt_ids(BS + 2, seed=71)}
    eng.add_request("g1", good["g1"], sp)
    eng.add_request("bad", prompt_ids(5, seed=72), sp)
    eng.add_request("g2", good["g2"], sp)
    outs = _run(eng)
    assert outs["bad"][-1].finish_reason == "error" and "injected" in outs["bad"][-1].error
    monkeypatch.setattr(cls, where, orig)
    for r, p in good.items():
        assert outs[r][-1].finish_reason == "length"
        assert sum((o.new_token_ids for o in outs[r]), []) == _alone(m, p, sp)
    assert be.kv == {}


# ------------------------------------------------------------- HTTP
@pytest.mark.server
def test_http_algorithm_fields(models):
    from fastapi.testclient import TestClient

    from bitdlm.server import ServerConfig, create_app

    m = models[True]
    be = backend(m)
    eng = Engine(be, tokenizer=be.tokenizer)
    cfg = ServerConfig(served_model_name="tiny", max_model_len=m.meta["max_position_embeddings"],
                       vocab_size=m.meta["vocab_size"], max_batch=4)
    with TestClient(create_app(eng, be.tokenizer, cfg)) as c:
        r = c.get("/generation/algorithms")
        assert r.status_code == 200 and r.json() == decoding.describe()
        prompt = prompt_ids(6, seed=80)
        body = dict(prompt=prompt, max_tokens=10, temperature=0, ignore_eos=True)
        r = c.post("/v1/completions", json={**body, "generation_algorithm": "beam"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "threshold, factor, credit, hierarchy, steps" in err["message"] and err["param"] == "generation_algorithm"
        r = c.post("/v1/completions", json={**body, "use_cache": False, "use_dual_cache": True})
        assert r.status_code == 400
        r = c.post("/v1/completions", json={**body, "generation_algorithm": "steps", "steps": 1})
        assert r.status_code == 400 and "sub-blocks" in r.json()["error"]["message"], r.text
        for extra, sp in [
            (dict(generation_algorithm="factor", factor=1.5, use_cache=False),
             SamplingParams(generation_algorithm="factor", factor=1.5, cache="none")),
            (dict(generation_algorithm="credit", threshold=0.8, use_dual_cache=True, block_length=4),
             SamplingParams(generation_algorithm="credit", threshold=0.8, cache="dual", block_length=4)),
            (dict(generation_algorithm="steps", steps=2), SamplingParams(generation_algorithm="steps", steps=2)),
        ]:
            r = c.post("/v1/completions", json={**body, **extra})
            assert r.status_code == 200, r.text
            sp.max_tokens, sp.ignore_eos = 10, True
            want = LLM(backend(m)).generate(prompt, sp)[0]
            assert r.json()["choices"][0]["text"] == want.text
            assert r.json()["usage"]["completion_tokens"] == len(want.token_ids)


def test_generate_cli_steps():
    from hf_models import child_env

    def run(*args):
        return subprocess.run([sys.executable, "-m", "bitdlm.cli", "generate", "def f(x):", "--max-tokens", "32",
                               "--ignore-eos", "--stats", *args], env=child_env(), capture_output=True, text=True)

    # the packaged model: blocks of 32 in sub-blocks of 8, a 5-token prompt; 8 steps per block = 2 per
    # sub-block (sub-block 0 holds 3 masks: 2 steps too), a commit whose last logits give block 1's first
    # token, then 1 or 2 steps reach the 32nd token: 1 when the step's 4 most confident positions are
    # block 1's positions 1-4 (which depends on the model), else 2
    p = run("--steps", "8")
    assert p.returncode == 0, p.stderr
    assert "generated: 32" in p.stderr and ("forwards: 10 " in p.stderr or "forwards: 11 " in p.stderr), p.stderr
    for args, msg in ((("--steps", "2"), "fewer than the 4 sub-blocks"), (("--steps", "8", "--threshold", "0.5"),
                                                                          "two decoding rules")):
        p = run(*args)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr


def _rule_pair(rng):
    """Two fresh instances of one random rule with random parameters (steps: configured)."""
    name = ["threshold", "factor", "steps", "hierarchy"][int(rng.integers(4))]
    vals = {"threshold": float(rng.choice([0.3, 0.5, 0.9, 1.0])), "factor": float(rng.choice([0.5, 1.0, 3.0])),
            "steps": int(rng.choice([4, 8, 11, 32])), "low_threshold": 0.4}
    pair = [decoding.make(name, **vals) for _ in range(2)]
    for a in pair:
        a.configure(32, 8)
    return pair


def test_select_many_equals_select_request_by_request():
    # the engine's batched selection against each rule's own select(), over the steps of one
    # block: random confidences on a coarse grid (ties), mixed rules, a request per row
    rng = np.random.default_rng(7)
    for _ in range(30):
        pairs = [_rule_pair(rng) for _ in range(int(rng.integers(1, 12)))]
        masked = [np.ones(32, bool) for _ in pairs]
        for _step in range(40):
            live = [i for i, m in enumerate(masked) if m.any()]
            if not live:
                break
            confs, poss = [], []
            for i in live:
                s0 = int(np.argmax(masked[i])) // 8 * 8
                pos = np.nonzero(masked[i][s0:s0 + 8])[0] + s0
                poss.append(pos)
                confs.append(np.round(rng.random(pos.size), 1).astype(np.float32))
            many = decoding.select_many([pairs[i][0] for i in live], confs, poss)
            for j, i in enumerate(live):
                want = pairs[i][1].select(confs[j], positions=poss[j])
                assert np.nonzero(many[j])[0].tolist() == want.tolist(), (type(pairs[i][1]).__name__, confs[j])
                masked[i][poss[j][want]] = False


def test_segment_ranks_equal_the_lexsort():
    # select_flat's ranking (_core.segment_ranks) against np.lexsort((-c, seg)) inverted per
    # segment, over ties, near float32 neighbours, 0 and -0, NaN, inf and > 1, empty segments
    from bitdlm import _core

    rng = np.random.default_rng(11)
    for case in range(400):
        nseg = int(rng.integers(1, 300))
        seg = np.sort(rng.integers(0, nseg, int(rng.integers(0, 600))))
        kind = case % 5
        if kind == 0:
            c = np.round(rng.random(seg.size), 2) * rng.choice([1.0, -1.0], seg.size)  # ties, 0 and -0
        elif kind == 1:  # near float32 neighbours, small or at a coarse key's bound
            base = nseg * 2.0 ** -27 if case % 2 else 10.0 ** rng.uniform(-12, -3)
            c = base * (1 + rng.integers(0, 3, seg.size) * 2.0 ** -22)
        elif kind == 2:
            c = 10.0 ** rng.uniform(-6, 0, seg.size)
        elif kind == 3:
            c = rng.random(seg.size)
            if seg.size:
                c[rng.integers(0, seg.size, 3)] = [np.nan, np.inf, 1.5] if case % 2 else np.nan
        else:
            c = 1 - rng.integers(0, 3, seg.size) * 2.0 ** -24  # adjacent float32 values below 1
        counts = np.bincount(seg, minlength=nseg).astype(np.int64)
        for cc in (c.astype(np.float32).astype(np.float64), c):
            order = np.lexsort((-cc, seg))
            want = np.empty(cc.size, np.int64)
            want[order] = np.arange(cc.size) - (np.cumsum(counts) - counts)[seg[order]]
            assert _core.segment_ranks(cc, counts).tolist() == want.tolist(), case
    with pytest.raises(ValueError, match="add up"):
        _core.segment_ranks(np.zeros(3), np.array([1, 1], np.int64))
