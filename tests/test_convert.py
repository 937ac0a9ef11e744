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

from hf_models import (CHAT_TEMPLATE, EOS_ID, IM_END_ID, MASK_ID, TINY_CONFIG, child_env, convert_tiny,
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
            expect = torch.from_numpy(codes / ours_s).to(w.dtype).float().numpy()
            rtol = 2.5e-7 if w.dtype == torch.float32 else torch.finfo(w.dtype).eps
            np.testing.assert_allclose(expect, deq, rtol=rtol, atol=0, err_msg=name)
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


@pytest.mark.parametrize("dtype,shards", [("bfloat16", False), ("float16", False), ("float32", True),
                                          ("bfloat16", True)])
def test_master_weight_variants(tmp_path, dtype, shards):
    hf = make_hf_model(tmp_path / "hf", seed=1, dtype=dtype, shards=shards)
    if shards:
        assert (hf / "model.safetensors.index.json").is_file()
        assert len(list(hf.glob("*.safetensors"))) > 2
    out = convert(hf, tmp_path / "m.bin", progress=False)
    _check_master(out, hf, TINY_CONFIG["num_hidden_layers"])


def _transformers_linear(module):
    """Ternary codes int8 [out, in] held by a transformers BitLinear / offline AutoBitLinear."""
    from transformers.integrations.bitnet import AutoBitLinear, BitLinear, unpack_weights

    if isinstance(module, BitLinear):
        codes = unpack_weights(module.weight, dtype=torch.float32)
    else:
        assert isinstance(module, AutoBitLinear) and not module.online_quant
        codes = module.weight.detach()
    return codes.to(torch.int8).numpy()


@pytest.mark.parametrize("linear_class,shards,pack_uint8", [
    ("bitlinear", False, True), ("autobitlinear", False, True),
    ("bitlinear", True, True), ("autobitlinear", True, True),
    ("autobitlinear", False, False)])
def test_packed_checkpoints_match_transformers(tmp_path, linear_class, shards, pack_uint8):
    """transformers loads the packed checkpoint itself; its modules are the oracle for
    the codes and, through their forward, for the scale convention."""
    from transformers import BitNetForCausalLM

    hf = make_hf_model(tmp_path / "hf", seed=2, packed=linear_class, shards=shards,
                       weight_scale_dtype="bfloat16", pack_uint8=pack_uint8)
    out = convert(hf, tmp_path / "m.bin", progress=False)
    ref = BitNetForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    modules = dict(ref.named_modules())
    x = torch.randn(3, max(TINY_CONFIG["hidden_size"], TINY_CONFIG["intermediate_size"]),
                    generator=torch.Generator().manual_seed(0))
    with ModelFile.open(out, verify=True) as mf:
        assert mf.meta["source"]["weights"] == ["packed" if pack_uint8 else "offline"]
        for name in ternary_names(TINY_CONFIG["num_hidden_layers"]):
            t = mf.tensors[name]
            m, k = t.shape
            codes = packing.unpack_i2(mf.array(name), k)
            mod = modules[name[:-len(".weight")]]
            np.testing.assert_array_equal(codes, _transformers_linear(mod), err_msg=name)
            # our arithmetic: y = (codes . aq) / (s_w * s_a), exact int dot then one multiply
            xi = x[:, :k].numpy()
            aq, sa = packing.act_quant(xi)
            ours = (aq.astype(np.int64) @ codes.T.astype(np.int64)).astype(np.float32)
            ours /= (np.float32(t.scale) * sa[:, None])
            with torch.no_grad():
                theirs = mod(x[:, :k]).numpy()
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6, err_msg=name)


def test_unpack_hf_packed_matches_transformers():
    from transformers.integrations.bitnet import pack_weights, unpack_weights

    rng = np.random.default_rng(0)
    for m in (8, 12, 36):
        w = torch.from_numpy(rng.integers(-1, 2, size=(m, 20)).astype(np.int16))
        packed = pack_weights(w.clone())
        np.testing.assert_array_equal(unpack_hf_packed(packed.numpy(), m), w.numpy())
        np.testing.assert_array_equal(unpack_hf_packed(packed.numpy(), m),
                                      unpack_weights(packed, torch.float32)[:m].to(torch.int8).numpy())


@pytest.mark.parametrize("tied", [True, False])
def test_lm_head_int8_and_untied_f16(tmp_path, tied, monkeypatch):
    import bitdlm.convert as conv

    monkeypatch.setattr(conv._row_blocks, "__defaults__", (96,))  # several row blocks (320 rows)
    hf = make_hf_model(tmp_path / "hf", seed=3, tie_word_embeddings=tied)
    sd = _hf_state(hf)
    w = sd["model.embed_tokens.weight" if tied else "lm_head.weight"].float().numpy()
    out = convert(hf, tmp_path / "i8.bin", lm_head="i8", progress=False)
    with ModelFile.open(out) as mf:
        assert mf.meta["quant"]["lm_head"] == "i8" and mf.meta["tie_word_embeddings"] is tied
        q, s = mf.array("lm_head.weight"), mf.array("lm_head.scale")
        assert q.dtype == np.int8 and q.shape == w.shape and s.shape == (w.shape[0],)
        # per-row absmax: the largest |value| of every row maps to 127 (the
        # padding_idx row of the embedding is all zeros and stays zero)
        amax = np.abs(w).max(axis=1)
        np.testing.assert_array_equal(np.abs(q).max(axis=1), np.where(amax > 0, 127, 0))
        nz = amax > 0
        np.testing.assert_allclose(s[nz], amax[nz] / 127, rtol=1e-6)
        assert np.isfinite(s).all() and (s > 0).all()
        assert np.all(np.abs(q * s[:, None] - w) <= s[:, None] * 0.5 * (1 + 1e-5))
        q2, s2 = quantize_lm_head_i8(w)
        np.testing.assert_array_equal(q, q2)
    if not tied:
        out = convert(hf, tmp_path / "f16.bin", progress=False)
        with ModelFile.open(out) as mf:
            np.testing.assert_array_equal(mf.array("lm_head.weight"), w.astype(np.float16))
            assert "lm_head.scale" not in mf.tensors


def test_dlm_config_keys_and_cli_overrides(tmp_path):
    extra = {"mask_token_id": 5, "bd_size": 16, "small_block_size": 4, "threshold": 0.75}
    hf = make_hf_model(tmp_path / "hf", seed=4, extra_config=extra)
    with ModelFile.open(convert(hf, tmp_path / "a.bin", progress=False)) as mf:
        assert mf.meta["mask_token_id"] == 5
        assert mf.meta["diffusion"] == {"block_size": 16, "small_block_size": 4, "threshold": 0.75,
                                        "shift_logits": True}
    # the script has the CLI's flags and overrides the config
    out = tmp_path / "b.bin"
    cmd = [sys.executable, str(ROOT / "scripts" / "convert_dlm_to_sglkernel.py"), str(hf), str(out),
           "--mask-token", "<|im_start|>", "--block-size", "8", "--small-block-size", "2",
           "--threshold", "1.0", "--no-shift", "--lm-head", "i8", "--quiet"]
    env = child_env()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    with ModelFile.open(out) as mf:
        assert mf.meta["mask_token_id"] == 2
        assert mf.meta["diffusion"] == {"block_size": 8, "small_block_size": 2, "threshold": 1.0,
                                        "shift_logits": False}
        assert mf.meta["quant"]["lm_head"] == "i8"
    # existing output without --force: refused, file untouched
    before = out.read_bytes()
    r = subprocess.run(cmd[:-1] + ["--mask-token", "7"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "already exists" in r.stderr and out.read_bytes() == before
    r = subprocess.run(cmd + ["--force", "--mask-token", "7"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    with ModelFile.open(out) as mf:
        assert mf.meta["mask_token_id"] == 7


def test_mask_token_from_tokenizer_config(tmp_path):
    from hf_models import write_tokenizer_files

    hf = make_hf_model(tmp_path / "hf", seed=5, extra_config={"mask_token_id": None})
    write_tokenizer_files(hf, TINY_CONFIG["vocab_size"], chat_template=False,
                          mask_in_tokenizer_config=True)
    with ModelFile.open(convert(hf, tmp_path / "a.bin", progress=False)) as mf:
        assert mf.meta["mask_token_id"] == MASK_ID
        assert mf.meta["chat_template"] is None


# ----------------------------------------------------------------------------- bad inputs

@pytest.fixture(scope="module")
def good_hf(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("goodhf") / "hf", seed=6)


def _edit_json(path, **upd):
    d = json.loads(path.read_text())
    d.update(upd)
    path.write_text(json.dumps(d))


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep if keep >= 0 else len(data) + keep])


BAD_INPUTS = {
    "missing config.json": (lambda d: (d / "config.json").unlink(), {}, "missing config.json"),
    "missing tokenizer.json": (lambda d: (d / "tokenizer.json").unlink(), {}, "tokenizer.json"),
    "missing weights": (lambda d: (d / "model.safetensors").unlink(), {}, "no model.safetensors"),
    "pytorch .bin weights": (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"), {},
                             "only safetensors"),
    "wrong architecture": (lambda d: _edit_json(d / "config.json", architectures=["LlamaForCausalLM"],
                                                model_type="llama"), {}, "unsupported architecture"),
    "wrong activation": (lambda d: _edit_json(d / "config.json", hidden_act="silu"), {}, "hidden_act"),
    "shape mismatch": (lambda d: _edit_json(d / "config.json", intermediate_size=192), {}, "shape"),
    "vocab too small for tokenizer": (lambda d: _edit_json(d / "config.json", vocab_size=300), {},
                                      "tokenizer has 320 tokens|shape"),
    "truncated safetensors": (lambda d: _truncate(d / "model.safetensors", -100), {}, "outside the file"),
    "garbage safetensors": (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64), {},
                            "not a safetensors file"),
    "bad config JSON": (lambda d: (d / "config.json").write_text("{oops"), {}, "invalid JSON"),
    "bad tokenizer": (lambda d: (d / "tokenizer.json").write_text("{}"), {}, "tokenizers"),
    "unknown mask token": (lambda d: None, {"mask_token": "<|nope|>"}, "not in the tokenizer"),
    "mask id out of vocab": (lambda d: None, {"mask_token": "999"}, "outside the vocabulary"),
    "bad block sizes": (lambda d: None, {"block_size": 12, "small_block_size": 8}, "multiple"),
    "bad threshold": (lambda d: None, {"threshold": 1.5}, "threshold"),
    "weight_scale without quantization_config": (
        lambda d: _add_tensor(d, "model.layers.0.mlp.up_proj.weight_scale"), {}, "scale convention"),
    "bias": (lambda d: _add_tensor(d, "model.layers.1.self_attn.q_proj.bias"), {}, "bias"),
    "NaN weight": (lambda d: _add_tensor(d, "model.layers.1.mlp.down_proj.weight", np.nan), {}, "NaN"),
    "bad DLM config key": (lambda d: _edit_json(d / "config.json", bd_size="big"), {}, "diffusion setting"),
}


def _add_tensor(hf, name, poison=None):
    """Add a 1-element tensor `name`, or with `poison` put that value into it."""
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(hf / "model.safetensors"))
    if poison is None:
        sd[name] = np.ones(1, np.float32)
    else:
        sd[name] = sd[name].copy()
        sd[name].flat[7] = poison
    save_file(sd, str(hf / "model.safetensors"))


@pytest.mark.parametrize("label", list(BAD_INPUTS))
def test_bad_inputs_leave_no_output(good_hf, tmp_path, label):
    import shutil

    mutate, kwargs, pattern = BAD_INPUTS[label]
    hf = tmp_path / "hf"
    shutil.copytree(good_hf, hf)
    mutate(hf)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ConversionError, match=pattern):
        convert(hf, out_dir / "m.bin", progress=False, **kwargs)
    assert list(out_dir.iterdir()) == []  # neither the output nor a temporary file


def test_bad_paths(good_hf, tmp_path):
    with pytest.raises(ConversionError, match="no such directory"):
        convert(tmp_path / "nope", tmp_path / "m.bin")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConversionError, match="not a directory"):
        convert(tmp_path / "file", tmp_path / "m.bin")
    with pytest.raises(ConversionError, match="is a directory"):
        convert(good_hf, tmp_path)
    with pytest.raises(ConversionError, match="does not exist"):
        convert(good_hf, tmp_path / "no" / "m.bin")
    with pytest.raises(ConversionError, match="already exists"):
        convert(good_hf, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


def test_missing_shard(tmp_path):
    hf = make_hf_model(tmp_path / "hf", seed=7, shards=True)
    sorted(hf.glob("model-*.safetensors"))[1].unlink()
    with pytest.raises(ConversionError, match="shard listed in the index is missing"):
        convert(hf, tmp_path / "m.bin", progress=False)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob(".*bitdlm-tmp*"))


def test_reference_model_helper_matches_bin(fp32_model):
    """hf_models.load_reference_model (the oracle other tests use) is quantized, and every
    BitLinear of it computes y = (codes . a_q) / (s_w * s_a) with the .bin's codes and scale."""
    from hf_models import load_reference_model
    from transformers.integrations.bitnet import AutoBitLinear

    ref = load_reference_model(fp32_model.parent / "hf")
    modules = dict(ref.named_modules())
    x = torch.randn(4, 160, generator=torch.Generator().manual_seed(1))
    with ModelFile.open(fp32_model) as mf:
        for name in ternary_names(TINY_CONFIG["num_hidden_layers"]):
            mod = modules[name[:-len(".weight")]]
            assert isinstance(mod, AutoBitLinear) and mod.online_quant
            t = mf.tensors[name]
            codes = packing.unpack_i2(mf.array(name), t.shape[1])
            aq, sa = packing.act_quant(x[:, :t.shape[1]].numpy())
            ours = (aq.astype(np.int64) @ codes.T.astype(np.int64)).astype(np.float32)
            ours /= np.float32(t.scale) * sa[:, None]
            with torch.no_grad():
                theirs = mod(x[:, :t.shape[1]]).numpy()
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6, err_msg=name)
        assert not isinstance(ref.lm_head, AutoBitLinear)
        assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()  # tied
        norm = ref.model.layers[0].mlp.ffn_sub_norm.weight.detach().numpy()
        np.testing.assert_array_equal(mf.array("model.layers.0.mlp.ffn_sub_norm.weight"), norm)
        assert not np.allclose(norm, 1.0)  # randomised norms


def test_conversion_is_deterministic(fp32_model, tmp_path):
    again = convert(fp32_model.parent / "hf", tmp_path / "again.bin", progress=False)
    assert again.read_bytes() == fp32_model.read_bytes()
