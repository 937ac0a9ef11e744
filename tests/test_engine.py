"""Scheduler tests: bitdlm's Engine / LLM against the independent reference
decoder (tests/ref_decoder.py, transformers + DynamicCache) on tiny random
BitNet models."""
from __future__ import annotations

import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from bitdlm.engine import Engine  # noqa: E402
from bitdlm.llm import LLM, SamplingParams  # noqa: E402
from bitdlm.tokenizer import Tokenizer  # noqa: E402

from ref_decoder import RefDecoder  # noqa: E402

BS, SBS = 8, 4


# ----------------------------------------------------------------- fixtures
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer as T, decoders, models, pre_tokenizers, trainers

    tok = T(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|bos|>", "<|eos|>", "<|mask|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, héllo wörld", "日本語 テキスト"] * 20
    tok.train_from_iterator(corpus, trainer)
    return tok.to_str()


class TorchModel:
    """Test double of bitdlm.model.Model on top of transformers: same forward
    contract (items, block rule, write / replace semantics, select mode)."""

    def __init__(self, hf, meta):
        self.hf, self.meta = hf, meta
        self.tokenizer = Tokenizer.from_meta(meta)
        self.kv = {}
        self._next = 0
        self.calls = []

    def alloc_seq(self, capacity):
        sid = self._next
        self._next += 1
        self.kv[sid] = dict(cap=capacity, layers=None)
        return sid

    def free_seq(self, sid):
        del self.kv[sid]

    @torch.no_grad()
    def forward(self, items, block_size, mode, temperature=None, top_p=None, uniforms=None, banned=None):
        from transformers.cache_utils import DynamicCache

        self.calls.append(len(items))
        all_logits = []
        for sid, tokens, start, ctx_len, write, out_idx in items:
            st = self.kv[sid]
            n = len(tokens)
            assert start + n <= st["cap"] and ctx_len <= st["cap"]
            keep = [p for p in range(ctx_len) if not (start <= p < start + n)]
            cache = DynamicCache()
            kv_pos = torch.tensor(keep, dtype=torch.long)
            if st["layers"] is not None and keep:
                cache = DynamicCache(ddp_cache_data=[(k[:, :, keep], v[:, :, keep]) for k, v in st["layers"]])
            q = torch.arange(start, start + n)
            kvp = torch.cat([kv_pos, q])
            ok = (kvp[None] // block_size) <= (q[:, None] // block_size)
            mask = torch.where(ok, 0.0, torch.finfo(torch.float32).min)[None, None]
            out = self.hf(torch.tensor(np.asarray(tokens, np.int64))[None], attention_mask=mask,
                          position_ids=q[None], past_key_values=cache, use_cache=True)
            if write:
                if st["layers"] is None:
                    st["layers"] = [(torch.zeros(1, lay.keys.shape[1], st["cap"], lay.keys.shape[3]),
                                     torch.zeros(1, lay.keys.shape[1], st["cap"], lay.keys.shape[3]))
                                    for lay in cache.layers]
                for (k, v), lay in zip(st["layers"], cache.layers):
                    k[:, :, start:start + n] = lay.keys[:, :, -n:]
                    v[:, :, start:start + n] = lay.values[:, :, -n:]
            all_logits.append(out.logits[0, torch.as_tensor(np.asarray(out_idx, np.int64))].float())
        logits = torch.cat(all_logits)
        if mode == "logits":
            return logits.numpy()
        if banned is not None and len(banned):
            logits[:, torch.as_tensor(np.asarray(banned, np.int64))] = float("-inf")
        toks, confs = [], []
        for i in range(logits.shape[0]):
            t = 0.0 if temperature is None else float(temperature[i])
            if t == 0:
                p = torch.softmax(logits[i], -1)
                j = int(p.argmax())
                toks.append(j)
                confs.append(float(p[j]))
                continue
            p = torch.softmax(logits[i] / t, -1)
            ps, idx = torch.sort(p, descending=True)
            cum = torch.cumsum(ps, 0)
            keepm = (cum - ps) < float(top_p[i])
            ps = torch.where(keepm, ps, 0.0)
            ps = ps / ps.sum()
            k = int(torch.searchsorted(torch.cumsum(ps, 0), torch.tensor(float(uniforms[i])), right=True))
            k = min(k, int(keepm.sum()) - 1)
            toks.append(int(idx[k]))
            confs.append(float(ps[k]))
        return np.asarray(toks, np.int32), np.asarray(confs, np.float32)


def _make_hf(vocab, seed, sharpen, max_pos=96):
    from transformers import BitNetConfig, BitNetForCausalLM, BitNetQuantConfig
    from transformers.integrations.bitnet import replace_with_bitnet_linear

    torch.manual_seed(seed)
    cfg = BitNetConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=None,
                       initializer_range=0.3)
    m = BitNetForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        # random weights give near-uniform confidences; large embeddings and a larger
        # final norm sharpen them so that thresholds < 1 unmask several tokens per step
        m.model.norm.weight.mul_(sharpen)
    sd = m.state_dict()
    replace_with_bitnet_linear(m, modules_to_not_convert=["lm_head"],
                               quantization_config=BitNetQuantConfig(linear_class="autobitlinear",
                                                                     quantization_mode="online"))
    m.load_state_dict(sd, assign=True, strict=False)
    m.tie_weights()
    return m.eval()


@pytest.fixture(scope="module")
def tok_json():
    return _tokenizer_json()


def _meta(tok_json, hf, shift=True, block_size=BS):
    t = Tokenizer(tok_json)
    return dict(vocab_size=hf.config.vocab_size, max_position_embeddings=hf.config.max_position_embeddings,
                bos_token_id=t.token_to_id("<|bos|>"), eos_token_ids=[t.token_to_id("<|eos|>")],
                mask_token_id=t.token_to_id("<|mask|>"), pad_token_id=None,
                diffusion=dict(block_size=block_size, small_block_size=SBS, threshold=0.9, shift_logits=shift),
                chat_template=("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                               "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"),
                tokenizer_json=tok_json)


@pytest.fixture(scope="module")
def models(tok_json):
    vocab = Tokenizer(tok_json).vocab_size
    out = {}
    for shift in (True, False):
        hf = _make_hf(vocab, seed=1 if shift else 2, sharpen=5.0)
        out[shift] = (hf, _meta(tok_json, hf, shift=shift))
    return out


def _backend(hf, meta):
    return TorchModel(hf, meta)


def _ref(hf, meta, prompt, *, max_tokens, threshold, use_block_cache=False, block_size=BS, sbs=SBS,
         stop_ids=None):
    d = meta["diffusion"]
    r = RefDecoder(hf, block_size=block_size, mask_id=meta["mask_token_id"], shift=d["shift_logits"])
    return r.generate(prompt, max_new_tokens=max_tokens, small_block_size=sbs, threshold=threshold,
                      stop_ids=meta["eos_token_ids"] if stop_ids is None else stop_ids,
                      use_block_cache=use_block_cache)


def _prompt(n, seed=0, vocab=300, avoid=(0, 1, 2)):
    rng = np.random.default_rng(seed)
    p = rng.integers(3, vocab, n).tolist()
    return [t for t in p if t not in avoid] + [3] * sum(t in avoid for t in p)


# ----------------------------------------------------------------- tests
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("threshold", [1.0, 0.9, 0.5])
@pytest.mark.parametrize("plen", [1, BS - 1, BS, BS + 1])
def test_matches_reference(models, shift, threshold, plen):
    hf, meta = models[shift]
    prompt = _prompt(plen, seed=plen)
    want = _ref(hf, meta, prompt, max_tokens=20, threshold=threshold)
    llm = LLM(_backend(hf, meta))
    got = llm.generate(prompt, SamplingParams(max_tokens=20, threshold=threshold, ignore_eos=False))[0]
    assert got.token_ids == want
    assert got.stats["forwards"] > 0
