"""The engine's scheduler on a fake model (no _core forward, no torch): admission
(max_batch, KV memory), grouping (one forward per block size and output kind),
retry (a failing batched forward pins the fault on its request), and outputs
(tokens, stop tokens, length, abort).

The fake model's "prediction" for absolute position p is the token g(p), with
full confidence, so every request's output is known in advance: g(P), g(P+1),
... for a prompt of P tokens. Every forward is recorded with its items, which
are checked against what the block-causal contract allows them to hold."""
from __future__ import annotations

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
        assert tokens.dtype == np.int32 and out.dtype == np.int32

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
