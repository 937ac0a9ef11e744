"""The incremental detokenizer's fast path (tokenizer.IncrementalDetokenizer: the bytes of
byte-level tokens, one bytes.decode per step) against its definition, a verbatim copy of
the two-decode detokenizer it replaced (OldDetokenizer): the same delta at every call over
many random token streams (multi-byte characters split across tokens, lone and invalid
bytes, U+FFFD itself, special and unknown ids, prompts that end mid-character), the
tokenizer's table checks, and tokenizers without the fast path."""
from __future__ import annotations

import random

import pytest

from bitdlm.tokenizer import IncrementalDetokenizer, Tokenizer, build_byte_table


class OldDetokenizer:
    """The detokenizer before the fast path, verbatim: the definition."""

    _CONTEXT = 5

    def __init__(self, tok, prompt_ids=None, skip_special_tokens=True):
        self.tok = tok
        self.skip = skip_special_tokens
        ctx = list(prompt_ids or [])[-self._CONTEXT:]
        self.ids = ctx
        self.prefix = 0
        self.read = len(ctx)

    def _decode(self, a, b=None):
        return self.tok._tok.decode(self.ids[a:b], skip_special_tokens=self.skip)

    def add(self, token_id):
        return self.add_many((token_id,))

    def add_many(self, token_ids):
        self.ids.extend(map(int, token_ids))
        before = self._decode(self.prefix, self.read)
        now = self._decode(self.prefix)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self):
        before = self._decode(self.prefix, self.read)
        now = self._decode(self.prefix)
        self.prefix = self.read = len(self.ids)
        return now[len(before):] if len(now) > len(before) else ""


@pytest.fixture(scope="module")
def packaged():
    from bitdlm.data import default_model_path
    from bitdlm.format import ModelFile

    return Tokenizer.from_meta(ModelFile.open(default_model_path()).meta)


def _trained(decoder: str) -> Tokenizer:
    """A small BPE trained here on multilingual text: byte-level (the fast path), or
    sentencepiece-like (Metaspace + byte fallback: no fast path)."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    text = ["héllo wörld 日本語のテキスト テキスト façade naïve 😀😁 emoji Ünïcödé ✓✓ €100 ½",
            "the quick brown fox jumps over the lazy dog", "Grüße aus Köln — «quotes» 你好，世界"] * 20
    if decoder == "bytelevel":
        hf = HF(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        tr = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|mask|>"],
                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        hf = HF(models.BPE(byte_fallback=True, unk_token="<unk>"))
        hf.pre_tokenizer = pre_tokenizers.Metaspace()
        hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                        decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        tr = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"] +
                                 [f"<0x{b:02X}>" for b in range(256)])
    hf.train_from_iterator(text, tr)
    hf.add_tokens(["<added>"])  # a non-special added token
    return Tokenizer(hf.to_str())


def _pools(tok: Tokenizer) -> dict:
    """Ids by kind: multi-byte pieces, plain ones, single bytes (continuation / lead bytes),
    a U+FFFD token, added tokens, ids past the vocabulary."""
    hf = tok._tok
    n = hf.get_vocab_size(with_added_tokens=True)
    added = sorted(hf.get_added_tokens_decoder())
    plain = [i for i in range(n) if i not in added]
    tbl = tok._byte_table()
    multi = [i for i in plain if tbl is not None and tbl[i] is not None and any(b >= 0x80 for b in tbl[i])]
    raw = [i for i in plain if tbl is not None and tbl[i] is not None and len(tbl[i]) == 1 and tbl[i][0] >= 0x80]
    fffd = tok.encode("\ufffd", add_special_tokens=False)
    return dict(plain=plain, multi=multi or plain, raw=raw or plain, added=added, fffd=fffd, past=[n, n + 7])


def _stream(rng, pools, n):
    kinds = ["plain"] * 6 + ["multi"] * 6 + ["raw"] * 3 + ["added", "fffd", "past"]
    out = []
    while len(out) < n:
        k = rng.choice(kinds)
        if k == "fffd":
            out += pools["fffd"]
        elif pools[k]:
            out.append(rng.choice(pools[k]))
    return out[:n]


def _compare(tok, rng, pools, streams=300, check_fast=True):
    fast_steps = 0
    for s in range(streams):
        prompt = _stream(rng, pools, rng.randint(0, 8))
        ids = _stream(rng, pools, rng.randint(1, 40))
        skip = rng.random() < 0.7
        new, old = IncrementalDetokenizer(tok, prompt, skip), OldDetokenizer(tok, prompt, skip)
        i = 0
        while i < len(ids):
            k = rng.randint(1, 6)
            chunk = ids[i:i + k]
            i += k
            fast_steps += new._pend is not None
            if k == 1 and rng.random() < 0.5:
                got, want = new.add(chunk[0]), old.add(chunk[0])
            else:
                got, want = new.add_many(tuple(chunk) if rng.random() < 0.2 else chunk), old.add_many(chunk)
            assert got == want, (s, prompt, ids[:i], skip)
            assert (new.prefix, new.read) == (old.prefix, old.read)
            if rng.random() < 0.05:  # flush mid-stream (stop strings do), then go on
                assert new.flush() == old.flush()
        assert new.flush() == old.flush(), (s, prompt, ids, skip)
    if check_fast:
        assert fast_steps > streams  # the fast path did most of the work


def test_fast_path_matches_definition_packaged(packaged):
    assert packaged._byte_table() is not None
    _compare(packaged, random.Random(1), _pools(packaged), streams=400)


def test_fast_path_matches_definition_trained_bytelevel():
    tok = _trained("bytelevel")
    assert tok._byte_table() is not None
    _compare(tok, random.Random(2), _pools(tok), streams=400)


def test_no_fast_path_without_bytelevel_decoder():
    tok = _trained("metaspace")
    assert tok._byte_table() is None
    d = tok.detokenizer([])
    assert d._pend is None
    _compare(tok, random.Random(3), _pools(tok), streams=100, check_fast=False)


def test_byte_table_checks(packaged):
    hf = packaged._tok
    tbl = build_byte_table(hf)
    added = set(hf.get_added_tokens_decoder())
    assert all((tbl[i] is None) == (i in added) for i in range(len(tbl)))
    assert b"".join(tbl[i] for i in packaged.encode("héllo 日本語", add_special_tokens=False)) == \
        "héllo 日本語".encode()


def test_split_character_is_held_back(packaged):
    """A character whose bytes span tokens comes out whole, once, with the token that ends it."""
    tbl = packaged._byte_table()
    one = {tbl[i]: i for i in range(len(tbl)) if tbl[i] is not None and len(tbl[i]) == 1}
    ids = [one[bytes([b])] for b in "日".encode()]
    for prompt in ([], ids[:1]):  # (a prompt ending mid-character: its context holds the lead byte)
        new, old = packaged.detokenizer(prompt), OldDetokenizer(packaged, prompt)
        got = [new.add(t) for t in ids] + [new.flush()]
        assert got == [old.add(t) for t in ids] + [old.flush()]
    assert [packaged.detokenizer([]).add_many(ids[:k]) for k in (1, 2, 3)] == ["", "", "日"]


# ------------------------------------------------------- the engine's outputs
class PoolModel:
    """A fake model (no _core) whose token for absolute position p is drawn from `pool` by a
    hash of p and the sequence's first prompt token, with a hashed confidence: every run of
    the same requests gives the same tokens, whatever else runs beside them."""

    def __init__(self, pool, vocab, block_size=8, sbs=4):
        self.meta = {"vocab_size": vocab, "max_position_embeddings": 256, "mask_token_id": 1,
                     "eos_token_ids": [0],
                     "diffusion": {"block_size": block_size, "small_block_size": sbs,
                                   "shift_logits": True, "threshold": 0.7}}
        self.pool = pool
        self.seqs, self.next = {}, 0

    def alloc_seq(self, capacity):
        self.next += 1
        self.seqs[self.next] = None
        return self.next

    def free_seq(self, sid):
        del self.seqs[sid]

    def forward(self, items, block_size, mode="select", **kw):
        import numpy as np

        assert mode == "select"
        tok, conf = [], []
        for sid, tokens, start, _ctx, _w, out in items:
            if self.seqs[sid] is None:  # (the first item of a sequence starts at its prompt)
                self.seqs[sid] = int(tokens[0])
            for o in np.asarray(out).tolist():
                h = ((start + o + 1) * 2654435761 + self.seqs[sid] * 40503) % 1000003
                tok.append(self.pool[h % len(self.pool)])
                conf.append((h % 997) / 997.0)
        return np.asarray(tok, np.int32), np.asarray(conf, np.float32)


def _engine_outputs(tok, pool, reqs, old: bool):
    from bitdlm.engine import Engine

    model = PoolModel(pool, tok._tok.get_vocab_size(with_added_tokens=True))
    if old:  # the definition: the two-decode detokenizer
        tok = Tokenizer(tok._tok.to_str())
        tok._bytes = None
    eng = Engine(model, max_batch=16, tokenizer=tok)
    for rid, prompt, sp in reqs:
        eng.add_request(rid, prompt, sp)
    got = []
    while eng.has_unfinished():
        assert len(got) < 2000, "the requests never end"
        got.append([(o.request_id, o.new_token_ids, o.text, o.finished, o.finish_reason, o.num_generated_tokens,
                     o.forwards, o.decode_mode) for o in eng.step()])
    return got


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_engine_outputs_match_definition(packaged, seed):
    """Many requests (AR and diffusion, group and per-request paths, stop strings with
    multi-byte characters, EOS, special tokens kept or skipped): every step's outputs, text
    deltas included, equal those of the same engine with the two-decode detokenizer."""
    from bitdlm.sampling_params import SamplingParams

    rng = random.Random(seed)
    pools = _pools(packaged)
    pool = pools["multi"][:200] + pools["raw"][:20] + pools["plain"][:100] + [0] * 3
    texts = packaged.decode(rng.sample(pool, 60))
    reqs = []
    for i in range(40):
        stops = [texts[j:j + rng.randint(1, 3)] for j in rng.sample(range(len(texts) - 3), rng.randint(0, 3))]
        stops = [s for s in stops if s.strip()]
        sp = SamplingParams(max_tokens=rng.randint(1, 60), stop=stops or None, ignore_eos=rng.random() < 0.5,
                            skip_special_tokens=rng.random() < 0.7,
                            block_length=1 if rng.random() < 0.4 else None,
                            generation_algorithm="steps" if rng.random() < 0.3 else "threshold",
                            **({"cache": "dual"} if rng.random() < 0.3 else {}))
        reqs.append((f"r{i}", [rng.choice(pools["plain"][2:]) for _ in range(rng.randint(1, 20))], sp))
    new, old = _engine_outputs(packaged, pool, reqs, False), _engine_outputs(packaged, pool, reqs, True)
    assert new == old
    flat = [o for step in new for o in step]
    ends = {o[0]: o for o in flat if o[3]}
    ids = {rid: [t for o in flat if o[0] == rid for t in o[1]] for rid in ends}
    reasons = ["string" if o[4] == "stop" and ids[rid][-1:] != [0] else o[4] for rid, o in ends.items()]
    assert {"string", "stop", "length"} <= set(reasons)  # stop strings, EOS and max_tokens all end some
    assert any("\ufffd" not in o[2] and any(ord(c) > 0x7ff for c in o[2]) for o in flat)  # multi-byte text


def test_byte_table_tokens_outside_the_alphabet():
    """ByteLevel decodes a token holding a character outside its byte alphabet as the token's
    UTF-8 (the whole token); the table does the same, and its checks pass."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models

    from bitdlm.tokenizer import _bytes_to_unicode

    odd = ["hé", "日本", "a b", "Ġ日", "Ġa\x7f"]
    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    for t in odd:
        vocab[t] = len(vocab)
    hf = HF(models.BPE(vocab=vocab, merges=[]))
    hf.decoder = decoders.ByteLevel()
    tbl = build_byte_table(hf)
    assert [tbl[vocab[t]] for t in odd] == [b"h\xe9", "日本".encode(), b"a b", "Ġ日".encode(), "Ġa\x7f".encode()]
    tok = Tokenizer(hf.to_str())
    _compare(tok, random.Random(4), dict(plain=list(vocab.values()), multi=[vocab[t] for t in odd],
                                         raw=list(range(128, 200)), added=[], fffd=[], past=[len(vocab)]), streams=200)
