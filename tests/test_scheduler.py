"""The engine's scheduler on a fake model (no _core forward, no torch): admission
(max_batch, KV memory), grouping (one forward per block size and output kind),
retry (a failing batched forward pins the fault on its request), outputs
(tokens, stop tokens, length, abort), and the group path (engine/group.py)
against the per-request path, step by step.

The fake model's "prediction" for absolute position p is the token g(p), with
full confidence, so every request's output is known in advance: g(P), g(P+1),
... for a prompt of P tokens. Every forward is recorded with its items, which
are checked against what the block-causal contract allows them to hold."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from bitdlm.engine import Engine
from bitdlm.sampling_params import SamplingParams

V, MASK, EOS, CTX = 64, 1, 0, 128


def g(p: int) -> int:
    """The fake model's token at absolute position p (never EOS or the mask)."""
    return 2 + (p * 7) % (V - 4)


class FakeModel:
    """Model interface of bitdlm.model.Model: meta, alloc_seq / free_seq, forward."""

    def __init__(self, block_size=4, kv_slots=None):
        self.meta = {"vocab_size": V, "max_position_embeddings": CTX, "mask_token_id": MASK,
                     "eos_token_ids": [EOS],
                     "diffusion": {"block_size": block_size, "small_block_size": block_size,
                                   "shift_logits": True, "threshold": 0.9}}
        self.kv_slots = kv_slots  # None: unlimited
        self.live: dict[int, int] = {}
        self.next_id = 0
        self.calls = []  # (block_size, mode, [seq_id per item])
        self.poisoned: set[int] = set()  # seq ids whose forward raises
        self.prompts: dict[int, list[int]] = {}

    def alloc_seq(self, capacity):
        if self.kv_slots is not None and len(self.live) >= self.kv_slots:
            raise MemoryError("fake KV budget exhausted")
        sid = self.next_id
        self.next_id += 1
        self.live[sid] = capacity
        return sid

    def free_seq(self, sid):
        del self.live[sid]

    def _check_item(self, sid, tokens, start, ctx_len, write, out):
        assert sid in self.live, f"forward on freed sequence {sid}"
        assert start + len(tokens) <= self.live[sid] and ctx_len <= self.live[sid]
        assert all(0 <= o < len(tokens) for o in out)
        assert tokens.dtype == np.int32
        # out_idx: an int32 array, or a list of ints (the group path's)
        assert out.dtype == np.int32 if isinstance(out, np.ndarray) else all(type(o) is int for o in out)

    def forward(self, items, block_size, mode="logits", temperature=None, top_p=None, uniforms=None,
                banned=None):
        self.calls.append((block_size, mode, [it[0] for it in items]))
        if any(it[0] in self.poisoned for it in items):
            raise RuntimeError("simulated core fault")
        rows = []
        for sid, tokens, start, ctx_len, write, out in items:
            self._check_item(sid, tokens, start, ctx_len, write, out)
            rows += [g(start + int(o) + 1) for o in out]  # shift: row i predicts position i + 1
        if mode == "logits":
            lg = np.full((len(rows), V), -10.0, np.float32)
            lg[np.arange(len(rows)), rows] = 10.0
            return lg
        return np.asarray(rows, np.int32), np.ones(len(rows), np.float32)


def collect(outs, step_outputs):
    for o in step_outputs:
        outs.setdefault(o.request_id, []).append(o)
    return outs


def run(eng, outs=None):
    """Step until done -> {request_id: [outputs]} (added to `outs`)."""
    outs = {} if outs is None else outs
    for _ in range(1000):
        if not eng.has_unfinished():
            return outs
        collect(outs, eng.step())
    raise AssertionError("the engine did not finish")


def tokens(outs, rid):
    return sum((o.new_token_ids for o in outs[rid]), [])


def expected(prompt_len, n):
    return [g(p) for p in range(prompt_len, prompt_len + n)]


PROMPTS = {"a": [5, 6, 7], "b": [9] * 4, "c": [11] * 6}


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_outputs_are_the_models_tokens(cache):
    model = FakeModel()
    eng = Engine(model, max_batch=8)
    for rid, p in PROMPTS.items():
        eng.add_request(rid, p, SamplingParams(max_tokens=9, ignore_eos=True, cache=cache))
    outs = run(eng)
    for rid, p in PROMPTS.items():
        assert tokens(outs, rid) == expected(len(p), 9)
        last = outs[rid][-1]
        assert last.finished and last.finish_reason == "length" and last.error is None
        assert last.num_prompt_tokens == len(p) and last.num_generated_tokens == 9
        assert all(not o.finished for o in outs[rid][:-1])
    assert model.live == {}  # every cache freed


def test_admission_respects_max_batch_and_queues_the_rest():
    model = FakeModel()
    eng = Engine(model, max_batch=2)
    for rid, p in PROMPTS.items():
        eng.add_request(rid, p, SamplingParams(max_tokens=6, ignore_eos=True))
    assert eng.num_waiting() == 3 and eng.num_running() == 0
    outs = collect({}, eng.step())
    assert eng.num_running() == 2 and eng.num_waiting() == 1
    outs = run(eng, outs)
    assert all(len(sids) <= 2 for _, _, sids in model.calls)
    assert max(len(set(sids)) for _, _, sids in model.calls) == 2
    for rid, p in PROMPTS.items():  # the queued one ran once a slot was free
        assert tokens(outs, rid) == expected(len(p), 6)
    assert model.live == {}


def test_out_of_kv_memory_waits_while_others_run_and_fails_alone():
    model = FakeModel(kv_slots=1)
    eng = Engine(model, max_batch=4)
    eng.add_request("a", PROMPTS["a"], SamplingParams(max_tokens=5, ignore_eos=True))
    eng.add_request("b", PROMPTS["b"], SamplingParams(max_tokens=5, ignore_eos=True))
    outs = run(eng)  # b waits for a's cache, then runs
    assert tokens(outs, "a") == expected(3, 5) and tokens(outs, "b") == expected(4, 5)
    model.kv_slots = 0  # nothing running and still no memory: the request fails, clearly
    eng.add_request("c", PROMPTS["c"], SamplingParams(max_tokens=5))
    (out,) = eng.step()
    assert out.finish_reason == "error" and "out of KV cache memory" in out.error
    assert not eng.has_unfinished()


def test_one_forward_per_block_size_and_output_kind_per_step():
    model = FakeModel(block_size=4)
    eng = Engine(model, max_batch=8)
    params = {"bs4": SamplingParams(max_tokens=10, ignore_eos=True),
              "bs8": SamplingParams(max_tokens=10, ignore_eos=True, block_length=8),
              "credit": SamplingParams(max_tokens=10, ignore_eos=True, generation_algorithm="credit"),
              "bs4b": SamplingParams(max_tokens=10, ignore_eos=True)}
    for rid, sp in params.items():
        eng.add_request(rid, [3, 4, 5], sp)
    outs = collect({}, eng.step())  # admission; the first step's forwards
    first = list(model.calls)
    sid = {rid: i for i, rid in enumerate(params)}  # ids in admission order
    groups = {(bs, mode): sorted(sids) for bs, mode, sids in first}
    assert groups == {(4, "select"): [sid["bs4"], sid["bs4b"]], (8, "select"): [sid["bs8"]],
                      (4, "logits"): [sid["credit"]]}
    n0 = len(model.calls)
    collect(outs, eng.step())
    step2 = model.calls[n0:]
    assert len({(bs, mode) for bs, mode, _ in step2}) == len(step2)  # one call per group
    assert sorted(s for _, _, sids in step2 for s in sids) == sorted(sid.values())  # each request once
    run(eng, outs)
    assert eng.stats.forwards == len(model.calls)
    for rid in params:  # every group decodes the model's tokens
        assert tokens(outs, rid) == expected(3, 10), rid
    assert model.live == {}


def test_failed_batched_forward_is_retried_and_fails_only_its_request():
    model = FakeModel()
    eng = Engine(model, max_batch=8)
    for rid, p in PROMPTS.items():
        eng.add_request(rid, p, SamplingParams(max_tokens=8, ignore_eos=True))
    outs = collect({}, eng.step())
    model.poisoned.add(eng.scheduler.running["b"].seq_id)
    n0 = len(model.calls)
    collect(outs, eng.step())
    retry = model.calls[n0:]
    # the batched call (3 items) failed, then each item alone: b's fails, a's and c's run
    assert [len(sids) for _, _, sids in retry] == [3, 1, 1, 1]
    run(eng, outs)
    assert outs["b"][-1].finish_reason == "error" and "simulated core fault" in outs["b"][-1].error
    for rid in "ac":
        assert tokens(outs, rid) == expected(len(PROMPTS[rid]), 8)
        assert outs[rid][-1].finish_reason == "length" and outs[rid][-1].error is None
    assert model.live == {}


def test_stop_token_abort_and_dropped_outputs():
    model = FakeModel()
    eng = Engine(model, max_batch=8)
    stop = g(3 + 2)  # the third generated token of a 3-token prompt
    eng.add_request("s", PROMPTS["a"], SamplingParams(max_tokens=20, stop_token_ids=[stop]))
    eng.add_request("x", PROMPTS["b"], SamplingParams(max_tokens=20))
    eng.add_request("y", PROMPTS["c"], SamplingParams(max_tokens=20))
    outs = collect({}, eng.step())
    eng.abort("x")  # reported by the next step
    eng.abort("y")
    eng.drop_outputs({"y"})  # its caller has gone: nobody is told
    assert eng.num_running() == 1
    run(eng, outs)
    assert tokens(outs, "s") == expected(3, 3) and outs["s"][-1].finish_reason == "stop"
    assert outs["x"][-1].finish_reason == "abort"
    assert not any(o.finished for o in outs.get("y", []))  # y's abort output was dropped
    assert model.live == {}


def _ar_walk(monkeypatch, general: bool):
    """Outputs and every running request's block state after every step, AR requests (beside a
    diffusion one), with RequestState.start_block or, `general`, its general case only."""
    from bitdlm.engine import RequestState

    if general:
        monkeypatch.setattr(RequestState, "start_block", RequestState._open_block)
    eng = Engine(FakeModel(), max_batch=8)
    reqs = {"a": ([5, 6, 7], "prefix"), "n": ([9] * 4, "none"), "end": ([11] * (CTX - 4), "prefix"),
            "one": ([3], "none")}
    for rid, (p, cache) in reqs.items():
        eng.add_request(rid, p, SamplingParams(max_tokens=9, ignore_eos=True, cache=cache, block_length=1))
    eng.add_request("d", [4] * 6, SamplingParams(max_tokens=9, ignore_eos=True))
    outs, states = {}, []
    while eng.has_unfinished():
        collect(outs, eng.step())
        states.append([(s.rid, s.bstart, s.blk.tolist(), s.masked.tolist(), s.first, list(s.hist), s.scratch,
                        s.prefilling, s.emitted) for s in eng.scheduler.running.values()])
    monkeypatch.undo()
    return {r: (tokens(outs, r), outs[r][-1].finish_reason) for r in outs}, states


def test_ar_start_block_fast_path_keeps_the_general_state(monkeypatch):
    fast, general = _ar_walk(monkeypatch, False), _ar_walk(monkeypatch, True)
    assert fast == general
    assert fast[0]["a"] == (expected(3, 9), "length") and fast[0]["end"] == (expected(CTX - 4, 4), "length")


def test_make_output_fills_every_field_by_name():
    """make_output passes RequestOutput's fields by position: each lands where its name says."""
    import dataclasses

    from bitdlm.engine.output_processor import make_output

    eng = Engine(FakeModel(), max_batch=1)
    eng.add_request("r", [5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True, block_length=1))
    seq = eng.scheduler.waiting["r"]
    seq.forwards, seq.emitted = 7, 2
    seq.finish("length")
    assert dataclasses.asdict(make_output(seq, (4, 5), "t", "e")) == dict(
        request_id="r", new_token_ids=[4, 5], text="t", finished=True, finish_reason="length",
        num_prompt_tokens=3, num_generated_tokens=2, forwards=7, error="e", decode_mode="ar")


class HashModel(FakeModel):
    """FakeModel whose rows depend on the item's tokens: token and confidence from a hash of
    the input token and the position, the confidence on a coarse grid (ties for the rules)."""

    def __init__(self, shift=True, **kw):
        super().__init__(**kw)
        self.meta["diffusion"]["shift_logits"] = shift
        self.items = []  # per call: every item as a comparable tuple

    def forward(self, items, block_size, mode="logits", temperature=None, top_p=None, uniforms=None,
                banned=None):
        self.calls.append((block_size, mode, [it[0] for it in items]))
        self.items.append((block_size, mode, sorted((sid, t.tolist(), s, c, w, np.asarray(o, np.int64).tolist())
                                                    for sid, t, s, c, w, o in items)))  # (out_idx: array or list)
        toks, confs = [], []
        for sid, tokens, start, ctx_len, write, out in items:
            self._check_item(sid, tokens, start, ctx_len, write, out)
            for o in np.asarray(out, np.int64).tolist():
                h = (int(tokens[o]) * 2654435761 + (start + o) * 40503) % 1000003
                toks.append(2 + h % (V - 4))
                confs.append((h % 11) / 10)
        if mode == "logits":
            lg = np.full((len(toks), V), -10.0, np.float32)
            lg[np.arange(len(toks)), toks] = 10.0 * np.asarray(confs, np.float32)
            return lg
        return np.asarray(toks, np.int32), np.asarray(confs, np.float32)


def _mixed_requests(rng, n):
    """n requests of random rules, caches, block and sub-block sizes, lengths and stops."""
    reqs = []
    for i in range(n):
        bl = [None, None, 1, 4, 6][int(rng.integers(5))]  # (6: the last block is cut by the context)
        kw = dict(max_tokens=int(rng.integers(1, 40)), ignore_eos=True, block_length=bl,
                  cache=str(rng.choice(["prefix", "dual", "none"], p=[0.4, 0.45, 0.15])))
        if bl == 1:
            kw["cache"] = "prefix"
        elif rng.random() < 0.7:
            kw["small_block_size"] = int(rng.choice([d for d in (2, 3, 4) if (bl or 8) % d == 0]))
        rule = str(rng.choice(["threshold", "factor", "steps", "hierarchy", "credit"], p=[0.4, 0.2, 0.2, 0.1, 0.1]))
        kw["generation_algorithm"] = rule
        if rule == "threshold":
            kw["threshold"] = float(rng.choice([0.6, 0.9, 1.0]))
        if rule == "steps":
            kw["steps"] = int(rng.choice([4, 8]))
        x = rng.random()
        if x < 0.05:
            kw["temperature"], kw["seed"] = 0.7, i
        elif x < 0.1:
            kw["repetition_penalty"] = 1.3
        elif x < 0.2:
            kw["stop_token_ids"] = [int(t) for t in rng.integers(2, V - 2, 3)]
        plen = int(rng.choice([1, 3, 4, 7, 9, CTX - 6]))
        reqs.append((f"r{i}", rng.integers(2, V - 2, plen).tolist(), SamplingParams(**kw)))
    return reqs


def _walk(group_path: bool, shift: bool, seed: int):
    """Outputs, forwards and every running request's block state after every step."""
    rng = np.random.default_rng(seed)
    model = HashModel(shift=shift, block_size=8)
    eng = Engine(model, max_batch=8)
    eng.scheduler.group_path = group_path
    reqs = [r for r in _mixed_requests(rng, 24) if shift or r[2].block_length != 1]
    # and three whose last block the context cuts to 2 of 6 positions, side by side
    reqs[3:3] = [(f"cut{i}", [7 + i] * (CTX - 5), SamplingParams(max_tokens=10, ignore_eos=True, block_length=6,
                  small_block_size=(2, 3, 6)[i], cache=("prefix", "dual", "dual")[i])) for i in range(3)]
    pending = list(reqs)
    outs, states = {}, []
    while pending or eng.has_unfinished():
        assert len(states) < 2000, "the engine did not finish"
        for _ in range(int(rng.integers(0, 3)) if eng.has_unfinished() else 1):  # arrivals mid-run
            if pending:
                eng.add_request(*pending.pop(0))
        step = eng.step()
        states.append((sorted((o.request_id, o.new_token_ids, o.finished, o.finish_reason, o.forwards,
                               o.num_generated_tokens) for o in step),
                       sorted((s.rid, s.bstart, s.blk.tolist(), s.masked.tolist(), s.first, list(s.hist), s.scratch,
                               s.prefilling, s.emitted, s.committed, s.forwards)
                              for s in eng.scheduler.running.values())))
    assert model.live == {}
    return {r: (tokens(outs, r) if r in outs else None) for r, _, _ in reqs}, states, model.items, eng.stats.forwards


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_group_path_equals_the_per_request_path(shift, seed, monkeypatch, caplog):
    """engine/group.py against RequestState.plan / apply, step by step over mixed requests:
    the same forwards (items), block states and outputs."""
    from bitdlm.engine import group as _group

    seen = {"decide": 0, "commit": 0, "full": 0, "sub": 0, "cut": 0}
    plan = _group.plan

    def counted(dec, com, table):
        gp = plan(dec, com, table)
        seen["cut"] += sum(len(s.blk) < table.blk.shape[1] for s in gp.seqs)  # a block cut by the context
        seen["decide"] += gp.n_decide
        seen["commit"] += len(gp.seqs) - gp.n_decide
        seen["full"] += sum(gp.full)
        seen["sub"] += sum(it[2] != it[3] for it in gp.items)  # a sub-block step reads the block's scratch
        return gp

    monkeypatch.setattr(_group, "plan", counted)
    # groups as small as these mixed batches make (the defaults are tuned for speed)
    monkeypatch.setattr(_group, "DECIDE_MIN", 1 + seed % 3)
    monkeypatch.setattr(_group, "COMMIT_MIN", 1 + seed % 2)
    group, single = _walk(True, shift, seed), _walk(False, shift, seed)
    assert min(seen.values()) > 0, seen  # the group path took every kind of step
    assert "one by one" not in caplog.text  # and never fell back to the per-request path
    assert group[3] == single[3]  # forwards
    for a, b in zip(group[2], single[2]):
        assert a == b
    assert len(group[1]) == len(single[1])
    for a, b in zip(group[1], single[1]):
        assert a == b
    assert group[0] == single[0]


def _group_walk():
    """Outputs of mixed requests (group path) and the forwards."""
    model = HashModel(block_size=8)
    eng = Engine(model, max_batch=8)
    for rid, p, sp in _mixed_requests(np.random.default_rng(3), 24):
        eng.add_request(rid, p, sp)
    outs = run(eng)
    return {r: (tokens(outs, r), outs[r][-1].finish_reason, outs[r][-1].error) for r in outs}, eng.stats.forwards


def test_group_path_faults_fall_back_to_the_per_request_path(monkeypatch):
    """A group plan or group rule that raises leaves the step to the per-request path (nothing
    fails); a fault in one request's part of a group step ends that request alone."""
    from bitdlm.engine import RequestState
    from bitdlm.engine import group as _group

    monkeypatch.setattr(_group, "DECIDE_MIN", 2)
    monkeypatch.setattr(_group, "COMMIT_MIN", 2)
    want = _group_walk()

    raised = {}

    def broken(*a, **kw):
        raised[name] = raised.get(name, 0) + 1
        raise RuntimeError("injected")

    orig = {"plan": _group.plan, "select": _group.GroupPlan.select}
    for target, name in ((_group, "plan"), (_group.GroupPlan, "select")):
        monkeypatch.setattr(target, name, broken)
        assert _group_walk() == want, name
        monkeypatch.setattr(target, name, orig[name])
    assert raised["plan"] > 3 and raised["select"] > 3
    close = RequestState.close_block
    bad = {"n": 0, "rid": None}

    def close_bad(seq, carried):
        # the first request the group path (not apply()) commits
        if sys._getframe(1).f_code.co_name == "_apply_group" and bad["rid"] in (None, seq.rid):
            bad["n"] += 1
            bad["rid"] = seq.rid
            raise KeyError("injected")
        return close(seq, carried)

    monkeypatch.setattr(RequestState, "close_block", close_bad)
    got = _group_walk()
    r = bad["rid"]
    assert bad["n"] == 1 and got[0][r][1] == "error" and "injected" in got[0][r][2]
    assert {k: v for k, v in got[0].items() if k != r} == {k: v for k, v in want[0].items() if k != r}


def test_group_ar_commit_fault_ends_that_request_alone(monkeypatch):
    """A rule whose reset raises while the group path commits AR blocks at once
    (GroupPlan.commit_ar) ends its request alone; the others decode as without it."""
    from bitdlm.engine import group as _group

    monkeypatch.setattr(_group, "COMMIT_MIN", 2)
    used = {"n": 0}
    commit_ar = _group.GroupPlan.commit_ar

    def counted(self, carried):
        done = commit_ar(self, carried)
        used["n"] += sum(d is True for d in done or ())
        return done

    monkeypatch.setattr(_group.GroupPlan, "commit_ar", counted)

    def walk(bad):
        eng = Engine(HashModel(block_size=8), max_batch=8)
        for i in range(6):
            eng.add_request(f"a{i}", [5 + i, 6, 7], SamplingParams(max_tokens=12, ignore_eos=True, block_length=1))
        if bad:
            calls = {"n": 0}

            def reset():
                calls["n"] += 1
                if calls["n"] == 5:
                    raise KeyError("injected")

            eng.scheduler.waiting["a2"].algo.reset = reset
        outs = run(eng)
        assert not eng.scheduler.running and eng.model.live == {}
        return {r: (tokens(outs, r), outs[r][-1].finish_reason, outs[r][-1].error) for r in outs}

    want, got = walk(False), walk(True)
    assert used["n"] > 50
    assert got["a2"][1] == "error" and "injected" in got["a2"][2] and len(got["a2"][0]) < 12
    assert {k: v for k, v in got.items() if k != "a2"} == {k: v for k, v in want.items() if k != "a2"}
    assert all(len(v[0]) == 12 and v[1] == "length" for v in want.values())


def test_failed_batched_forward_with_a_group_is_retried_one_by_one(monkeypatch):
    """The group path's requests join the per-request retry of a failed call: only the
    offending request fails."""
    from bitdlm.engine import group as _group

    monkeypatch.setattr(_group, "DECIDE_MIN", 2)
    model = FakeModel()
    eng = Engine(model, max_batch=8)
    prompts = {f"q{i}": [5 + i] * (3 + i) for i in range(6)}
    for rid, p in prompts.items():
        eng.add_request(rid, p, SamplingParams(max_tokens=8, ignore_eos=True))
    outs = collect({}, eng.step())  # prefill
    groups = eng.scheduler.schedule([])  # (plans are pure: the next step plans the same)
    assert sum(len(b.group.seqs) for b in groups.values() if b.group is not None) >= 4
    model.poisoned.add(eng.scheduler.running["q2"].seq_id)
    n0 = len(model.calls)
    collect(outs, eng.step())
    assert [len(sids) for _, _, sids in model.calls[n0:]] == [6] + [1] * 6
    run(eng, outs)
    assert outs["q2"][-1].finish_reason == "error" and "simulated core fault" in outs["q2"][-1].error
    for rid, p in prompts.items():
        if rid != "q2":
            assert tokens(outs, rid) == expected(len(p), 8) and outs[rid][-1].finish_reason == "length"
    assert model.live == {}


def test_generate_checks_params_and_prompts_once(monkeypatch):
    """LLM.generate validates each distinct SamplingParams once and checks each prompt once
    (then Engine.add_checked), not again per request; add_request alone still checks both."""
    from bitdlm import LLM

    calls = {"validate": 0, "check_prompt": 0}
    validate, check_prompt = SamplingParams.validate, Engine.check_prompt

    def counted_validate(self):
        calls["validate"] += 1
        return validate(self)

    def counted_check(self, prompt_ids):
        calls["check_prompt"] += 1
        return check_prompt(self, prompt_ids)

    monkeypatch.setattr(SamplingParams, "validate", counted_validate)
    monkeypatch.setattr(Engine, "check_prompt", counted_check)
    gens = LLM(FakeModel()).generate([[5, 6, 7]] * 10, SamplingParams(max_tokens=5, ignore_eos=True))
    assert calls == {"validate": 1, "check_prompt": 10}
    assert [g.token_ids for g in gens] == [expected(3, 5)] * 10
    assert gens[0].prompt_token_ids == [5, 6, 7]
    eng = Engine(FakeModel())
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add_request("x", [5], SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="mask token"):
        eng.add_request("x", [5, MASK], SamplingParams())
    assert not eng.has_unfinished()
