"""Converter tests: tiny random BitNet checkpoints made with transformers are
converted and every ternary code / scale is checked against transformers' own
quantization (WeightQuant, pack_weights / unpack_weights, BitLinear)."""
import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_models import (CHAT_TEMPLATE, EOS_ID, IM_END_ID, MASK_ID, TINY_CONFIG, convert_tiny,
                       make_hf_model, reference_quant, ternary_names)
from bitdlm import packing
from bitdlm.convert import ConversionError, convert, quantize_lm_head_i8, unpack_hf_packed
from bitdlm.format import ModelFile

ROOT = Path(__file__).resolve().parent.parent


def _hf_state(hf_dir):
    """The checkpoint's tensors as fp32 torch tensors (safetensors' own reader)."""
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def _check_master(bin_path, hf_dir, n_layers):
    """Codes, scales, embeddings and norms equal transformers' quantization of the checkpoint."""
    from transformers.integrations.bitnet import WeightQuant

    sd = _hf_state(hf_dir)
    with ModelFile.open(bin_path, verify=True) as mf:
        for name in ternary_names(n_layers):
            w = sd[name]
            codes_ref, scale_ref = reference_quant(w)
            t = mf.tensors[name]
            assert t.dtype == "i2_b128" and t.shape == tuple(w.shape)
            codes = packing.unpack_i2(mf.array(name), w.shape[1])
            np.testing.assert_array_equal(codes, codes_ref.numpy(), err_msg=name)
            # mean|W| is an fp32 reduction whose summation order is the library's
            # (torch eager, torch.compile and numpy differ, each within 1 ulp of the
            # exact mean): 1 / mean agrees to 2 ulp
            ours_s, ref_s = np.float32(t.scale), np.float32(scale_ref.item())
            assert abs(int(ours_s.view(np.int32)) - int(ref_s.view(np.int32))) <= 2, name
            # ... and with the same scale the rule (multiply, round half even, clamp) is identical
            same = (w.float() * torch.tensor(ours_s)).round().clamp(-1, 1).to(torch.int8)
            np.testing.assert_array_equal(codes, same.numpy(), err_msg=name)
            # transformers' own autograd function gives codes / scale in the weight dtype
            deq = WeightQuant.forward(None, w).float().numpy()
            np.testing.assert_allclose(codes / ours_s, deq, rtol=2.5e-7, atol=0, err_msg=name)
            assert ((deq != 0) == (codes != 0)).all() and (np.sign(deq) == codes).all()
        emb = sd["model.embed_tokens.weight"].float().numpy()
        np.testing.assert_array_equal(mf.array("model.embed_tokens.weight"), emb.astype(np.float16))
        for name in sd:
            if "norm" in name:
                np.testing.assert_array_equal(mf.array(name), sd[name].float().numpy(), err_msg=name)
        return dict(mf.meta)


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory):
    return convert_tiny(tmp_path_factory.mktemp("fp32"))


def test_fp32_codes_scales_and_metadata(fp32_model):
    hf = fp32_model.parent / "hf"
    meta = _check_master(fp32_model, hf, TINY_CONFIG["num_hidden_layers"])
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size", "max_position_embeddings"):
        assert meta[k] == TINY_CONFIG[k]
    assert meta["head_dim"] == TINY_CONFIG["hidden_size"] // TINY_CONFIG["num_attention_heads"]
    assert meta["rope_theta"] == TINY_CONFIG["rope_theta"]
    assert meta["rms_norm_eps"] == TINY_CONFIG["rms_norm_eps"]
    assert meta["tie_word_embeddings"] is True and meta["hidden_act"] == "relu2"
    assert meta["quant"] == {"weights": "i2_b128", "lm_head": "f16"}
    assert meta["mask_token_id"] == MASK_ID
    assert meta["eos_token_ids"] == [EOS_ID, IM_END_ID]
    assert meta["pad_token_id"] == EOS_ID and meta["bos_token_id"] is None
    assert meta["diffusion"] == {"block_size": 32, "small_block_size": 8, "threshold": 0.9,
                                 "shift_logits": True}
    assert meta["chat_template"] == CHAT_TEMPLATE
    # the tokenizer round-trips byte for byte and still works
    assert meta["tokenizer_json"] == (hf / "tokenizer.json").read_text()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(meta["tokenizer_json"])
    text = "Hello <|mask|> world"
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    assert MASK_ID in tok.encode(text).ids


def test_padding_when_k_not_multiple_of_128(fp32_model):
    with ModelFile.open(fp32_model) as mf:
        name = "model.layers.0.mlp.down_proj.weight"  # K = 160 -> padded to 256
        a = mf.array(name)
        assert a.shape == (TINY_CONFIG["hidden_size"], 256 // 4) and a.dtype == np.uint8
        # padding codes are t = 0 (2-bit code 1) as the kernels expect
        full = packing.unpack_i2(a, 256)
        assert (full[:, 160:] == 0).all()
