"""Sampling penalties (presence / frequency / repetition; bitdlm.penalties) through the engine.

The reference here is written from the definitions (vLLM's SamplingParams, OpenAI's API,
transformers' RepetitionPenaltyLogitsProcessor), one token id at a time, and drives its own
decoding loop over the packaged model's full-logits forward with the cache strategy "none"
(every forward recomputes the whole sequence): the engine, asked for cache "none", runs the
very same forwards, so every decision must agree exactly (no near-tie excuse)."""
from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

import bitdlm
from bitdlm import decoding, penalties
from bitdlm.data import default_model_path
from bitdlm.engine import Engine
from bitdlm.sampling_params import SamplingParamError, SamplingParams

MODEL = default_model_path()
PROMPT = "def fibonacci(n):\n"


@pytest.fixture(scope="module")
def model():
    assert MODEL is not None, "the packaged model is missing"
    return bitdlm.load(MODEL, threads=1)


def ref_penalise(row, prompt, gen, presence=0.0, frequency=0.0, repetition=1.0):
    """One logits row, penalised id by id in float32: the repetition penalty on every id of
    prompt + generated (divide a positive logit, multiply a negative one), then frequency *
    count and presence for every generated id (the prompt does not count)."""
    row = row.copy()
    r = np.float32(repetition)
    for t in set(prompt) | set(gen):
        row[t] = row[t] / r if row[t] > 0 else row[t] * r
    for t, n in Counter(gen).items():
        row[t] = row[t] - np.float32(frequency) * np.float32(n)
        row[t] = row[t] - np.float32(presence)
    return row


class RefDecoder:
    """Block diffusion with token shift, greedy or sampled, the threshold rule, no cache:
    a new block's first token is decided alone from the previous block's last row; the
    rest of a block is decided sub-block by sub-block from the rows before the masked
    positions. Penalties count the committed tokens after the prompt."""

    def __init__(self, model, bs, sbs, threshold, temperature=0.0, top_p=1.0, seed=None, **pen):
        self.m, self.bs, self.sbs, self.thr, self.pen = model, bs, sbs, threshold, pen
        self.T, self.top_p = temperature, top_p
        self.rng = np.random.default_rng(seed)
        self.mask = model.meta["mask_token_id"]
        self.forwards = 0

    def rows(self, seq, rows, prompt, gen):
        """(tokens, confidences) of the wanted rows of one forward over `seq`."""
        sid = self.m.alloc_seq(len(seq))
        try:
            lg = np.asarray(self.m.forward([(sid, np.asarray(seq, np.int32), 0, 0, False,
                                             np.asarray(rows, np.int32))], self.bs, "logits"))
        finally:
            self.m.free_seq(sid)
        self.forwards += 1
        lg = lg.reshape(len(rows), -1).copy()
        lg[:, self.mask] = -np.inf
        lg = np.stack([ref_penalise(r, prompt, gen, **self.pen) for r in lg])
        if self.T > 0:  # the engine's sampler, with the request's uniforms in the engine's order
            return decoding.select_rows(lg, self.T, self.top_p, self.rng.random(len(rows), dtype=np.float32))
        tok = lg.argmax(axis=1)
        z = lg.astype(np.float64)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        return tok, p[np.arange(len(tok)), tok] / p.sum(axis=1)

    def generate(self, prompt, max_tokens):
        P, bs = len(prompt), self.bs
        x = list(prompt)  # committed tokens, contiguous
        while len(x) < P + max_tokens:
            if len(x) % bs == 0:  # a new block: its first token alone
                tok, _ = self.rows(x, [len(x) - 1], prompt, x[P:])
                x.append(int(tok[0]))
                continue
            b0 = len(x) // bs * bs
            blk = x[b0:] + [self.mask] * (b0 + bs - len(x))
            while self.mask in blk:
                first = blk.index(self.mask)
                s0 = first // self.sbs * self.sbs
                pos = [i for i in range(s0, min(s0 + self.sbs, bs)) if blk[i] == self.mask]
                gen = x[P:b0] + [t for i, t in enumerate(blk) if b0 + i >= P and t != self.mask]
                tok, conf = self.rows(x[:b0] + blk, [b0 + i - 1 for i in pos], prompt, gen)
                take = {int(np.argmax(conf))} | {j for j, c in enumerate(conf) if c > self.thr}
                for j in take:
                    blk[pos[j]] = int(tok[j])
            x = x[:b0] + blk
        return x[P:P + max_tokens]


def _engine_run(model, prompt, max_tokens, **kw):
    llm = bitdlm.LLM(model)
    out = llm.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, cache="none", **kw))[0]
    return out.token_ids, out.stats["forwards"]


PENALTIES = [dict(repetition=1.3), dict(presence=0.8, frequency=0.6),
             dict(presence=-0.5, frequency=1.2, repetition=1.15)]


def _params(pen):
    return {f"{k}_penalty": v for k, v in pen.items()}


@pytest.mark.parametrize("pen", PENALTIES, ids=str)
def test_autoregressive_matches_reference(model, pen):
    prompt = model.tokenizer.encode(PROMPT)
    ref = RefDecoder(model, 1, 1, 0.5, **pen)
    want = ref.generate(prompt, 40)
    got, forwards = _engine_run(model, prompt, 40, block_length=1, small_block_size=1, **_params(pen))
    assert got == want and forwards == ref.forwards
    plain, _ = _engine_run(model, prompt, 40, block_length=1, small_block_size=1)
    assert got != plain  # the penalty changed something


@pytest.mark.parametrize("pen", PENALTIES, ids=str)
@pytest.mark.parametrize("plen", [0, 3])  # the prompt ends on a block boundary, or 3 tokens into one
def test_diffusion_matches_reference(model, pen, plen):
    prompt = model.tokenizer.encode(PROMPT)
    prompt = prompt + list(range(400, 400 + (8 - len(prompt) % 8) % 8 + plen))  # whole blocks of 8, + plen
    n = 48 - plen  # the last wanted position ends a block
    ref = RefDecoder(model, 8, 4, 0.5, **pen)
    want = ref.generate(prompt, n)
    got, forwards = _engine_run(model, prompt, n, block_length=8, small_block_size=4, threshold=0.5,
                                **_params(pen))
    assert got == want
    assert forwards == ref.forwards < n  # the same forwards, some deciding several tokens


def test_sampling_matches_reference(model):
    prompt = model.tokenizer.encode(PROMPT)
    pen = dict(presence=0.3, frequency=0.3, repetition=1.2)
    ref = RefDecoder(model, 8, 4, 0.5, temperature=0.9, top_p=0.95, seed=7, **pen)
    n = 40 + (-len(prompt)) % 8
    want = ref.generate(prompt, n)
    got, _ = _engine_run(model, prompt, n, block_length=8, small_block_size=4, threshold=0.5,
                         temperature=0.9, top_p=0.95, seed=7, **_params(pen))
    assert got == want


class Modes:
    """The model, recording the output mode of every forward call."""

    def __init__(self, model):
        self.model, self.meta, self.tokenizer, self.modes = model, model.meta, model.tokenizer, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, items, bs, mode="select", **kw):
        self.modes.append(mode)
        return self.model.forward(items, bs, mode, **kw)


def test_off_penalties_keep_the_fused_path_and_mix_in_a_batch(model):
    """Penalties at their defaults (0, 0, 1) are off: the fused select path, the same tokens.
    A penalised request beside unpenalised ones decodes as alone, and they as alone."""
    prompt = model.tokenizer.encode(PROMPT)
    m = Modes(model)
    llm = bitdlm.LLM(m)
    off = SamplingParams(max_tokens=40, presence_penalty=0.0, frequency_penalty=0, repetition_penalty=1)
    assert not off.penalized()
    alone_plain = llm.generate(prompt, SamplingParams(max_tokens=40))[0].token_ids
    assert llm.generate(prompt, off)[0].token_ids == alone_plain
    assert set(m.modes) == {"select"}
    pen = SamplingParams(max_tokens=40, repetition_penalty=1.3)
    m.modes.clear()
    alone_pen = llm.generate(prompt, pen)[0].token_ids
    assert "logits" in m.modes and alone_pen != alone_plain
    credit = SamplingParams(max_tokens=40, generation_algorithm="credit", frequency_penalty=0.7)
    alone_credit = llm.generate(prompt, credit)[0].token_ids
    assert alone_credit != llm.generate(prompt, SamplingParams(max_tokens=40, generation_algorithm="credit"))[0].token_ids
    both = llm.generate([prompt] * 4, [SamplingParams(max_tokens=40), pen, off, credit])
    assert [b.token_ids for b in both] == [alone_plain, alone_pen, alone_plain, alone_credit]


def test_generated_tokens_are_the_committed_ones(model):
    """What the penalties count mid-block: history, then the block's decided positions
    after the prompt (never the prompt's part of the block, never a masked position)."""
    eng = Engine(model, block_size=8)
    eng.add_request("r", [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
                    SamplingParams(max_tokens=30, repetition_penalty=1.2))
    eng.step()  # prefill: the block [18, 19, 20, masks...] opens
    seq = eng.scheduler.running["r"]
    assert seq.generated().tolist() == []
    seq.blk[4] = 77
    seq.masked[4] = False
    seq.hist = [5, 6]
    assert seq.generated().tolist() == [5, 6, 77]


def test_apply_is_the_id_by_id_definition():
    rng = np.random.default_rng(3)
    lg = rng.normal(0, 3, (5, 300)).astype(np.float32)
    lg[:, 7] = 0.0
    prompt, gen = rng.integers(0, 300, 40), rng.integers(0, 300, 60)
    for pen in PENALTIES + [dict(repetition=0.7)]:
        got = penalties.apply(lg.copy(), prompt, gen, **pen)
        want = np.stack([ref_penalise(r, prompt.tolist(), gen.tolist(), **pen) for r in lg])
        assert np.array_equal(got, want), pen


@pytest.mark.torch
def test_repetition_penalty_is_transformers_processor():
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(4)
    lg = rng.normal(0, 3, (4, 500)).astype(np.float32)
    ids = rng.integers(0, 500, 80)
    for r in (0.6, 1.1, 1.3, 2.0):
        want = RepetitionPenaltyLogitsProcessor(r)(torch.from_numpy(ids)[None].repeat(4, 1),
                                                   torch.from_numpy(lg.copy())).numpy()
        got = penalties.apply(lg.copy(), ids[:30], ids[30:], repetition=r)
        assert np.array_equal(got, want), r


@pytest.mark.parametrize("field,value", [
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("presence_penalty", math.nan),
    ("presence_penalty", "1"), ("presence_penalty", True), ("frequency_penalty", math.inf),
    ("frequency_penalty", 3), ("frequency_penalty", None), ("repetition_penalty", 0),
    ("repetition_penalty", -1.0), ("repetition_penalty", 1e-320), ("repetition_penalty", math.nan),
    ("repetition_penalty", "1.2"), ("repetition_penalty", 1e39)])
def test_bad_penalty_names_its_field(field, value):
    with pytest.raises(SamplingParamError, match=field) as e:
        SamplingParams(**{field: value}).validate()
    assert e.value.param == field


def test_generate_cli_flags():
    cmd = [sys.executable, "-m", "bitdlm.cli", "generate", "def f(x):", "--max-tokens", "8", "--threads", "1"]
    ok = subprocess.run(cmd + ["--repetition-penalty", "1.2", "--presence-penalty", "0.5",
                               "--frequency-penalty", "0.5"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(cmd + ["--presence-penalty", "3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "presence_penalty" in bad.stderr
