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
from bitdlm.convert import (ConversionError, convert, convert_report, format_summary, quantize_lm_head_i8,
                            run_cli, unpack_hf_packed)
from bitdlm.format import ModelFile, embedding_table

pytestmark = pytest.mark.torch

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


@pytest.mark.slow
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
    assert meta["quant"] == {"weights": "i2_b128", "lm_head": "f16", "embedding": "f16"}
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
    from bitdlm.convert import tensors

    monkeypatch.setattr(tensors.row_blocks, "__defaults__", (96,))  # several row blocks (320 rows)
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


@pytest.mark.parametrize("tied,lm_head", [(True, "i8"), (False, "f16"), (False, "i8")])
def test_embedding_int8(tmp_path, tied, lm_head, monkeypatch):
    """--embedding i8: per-row absmax int8 rows (tied: the int8 lm_head's table, no f16 embedding in
    the file), the precision line measures the dequantized rows, the file shrinks by the f16 table."""
    from bitdlm.convert import tensors

    monkeypatch.setattr(tensors.row_blocks, "__defaults__", (96,))  # several row blocks (320 rows)
    hf = make_hf_model(tmp_path / "hf", seed=5, tie_word_embeddings=tied)
    sd = _hf_state(hf)
    emb = sd["model.embed_tokens.weight"].float().numpy()
    r = convert_report(hf, tmp_path / "e.bin", lm_head=lm_head, embedding="i8", progress=False)
    q2, s2 = quantize_lm_head_i8(emb)
    with ModelFile.open(r["output"], verify=True) as mf:
        assert mf.meta["quant"] == {"weights": "i2_b128", "lm_head": lm_head, "embedding": "i8"}
        weight, scale = embedding_table(mf.meta)
        np.testing.assert_array_equal(mf.array(weight), q2)
        np.testing.assert_array_equal(mf.array(scale), s2)
        assert ("model.embed_tokens.weight" in mf.tensors) != tied
        if not tied:
            head = sd["lm_head.weight"].float().numpy()
            want = quantize_lm_head_i8(head)[0] if lm_head == "i8" else head.astype(np.float16)
            np.testing.assert_array_equal(mf.array("lm_head.weight"), want)
    p = r["precision"]["model.embed_tokens.weight"]
    err = float(np.abs(q2.astype(np.float32) * s2[:, None] - emb).max())
    assert p["stored"] == "i8" and p["source_dtype"] == "F32" and p["max_abs_error"] == err > 0
    assert list(r["precision"])[0] == "model.embed_tokens.weight"
    assert (r["precision"].get("lm_head.weight") == p) == tied  # tied: one table, one measure
    text = format_summary(r)
    assert f"embedding F32 -> i8: max |delta| {err:.3g}" in text
    assert ("one table of the tied int8 lm_head" in text) == tied
    assert not any("embed_tokens" in d for d in r["dropped"])  # the rows' source is used
    r16 = convert_report(hf, tmp_path / "f.bin", lm_head=lm_head, progress=False)
    V, H = emb.shape
    saved = V * H * 2 - (0 if tied else V * H + V * 4)
    assert abs(r16["bytes"] - r["bytes"] - saved) <= 3 * 64  # (alignment and header padding)


def test_embedding_int8_refusals(tmp_path):
    hf = make_hf_model(tmp_path / "hf", seed=5)  # tied
    out = tmp_path / "x.bin"
    with pytest.raises(ConversionError, match="--embedding i8 of a tied model .* add --lm-head i8"):
        convert(hf, out, embedding="i8", progress=False)
    with pytest.raises(ConversionError, match="--embedding must be f16 or i8"):
        convert(hf, out, embedding="i4", lm_head="i8", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no output, no temporary file
    env = child_env()
    cmd = [sys.executable, "-m", "bitdlm.cli", "convert", str(hf), str(out), "--quiet", "--embedding", "i8"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--lm-head i8" in r.stderr, r.stderr
    r = subprocess.run(cmd + ["--lm-head", "i8"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "embedding F32 -> i8: max |delta|" in r.stdout and "tied int8 lm_head" in r.stdout
    r = subprocess.run([sys.executable, "-m", "bitdlm.cli", "info", str(out), "--summary"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0 and "embedding: i8, rows of lm_head.weight x lm_head.scale" in r.stdout


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
    # existing output: `bitdlm convert` without --force refuses, file untouched ...
    before = out.read_bytes()
    cli = [sys.executable, "-m", "bitdlm.cli", "convert", *cmd[2:]]
    r = subprocess.run(cli[:-1] + ["--mask-token", "7"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "already exists" in r.stderr and out.read_bytes() == before
    # ... the script replaces it, as the users' old script did (atomically: tests/test_migrate.py)
    r = subprocess.run(cmd + ["--mask-token", "7"], capture_output=True, text=True, env=env, timeout=120)
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
    # config.json with the wrong types or absurd values: a clear error, nothing sized from them
    "config is a list": (lambda d: (d / "config.json").write_text("[1, 2]"), {}, "expected a JSON object"),
    "config not UTF-8": (lambda d: (d / "config.json").write_bytes(b'{"a": "\xff"}'), {}, "invalid JSON"),
    "config nested too deep": (lambda d: (d / "config.json").write_text("[" * 5000 + "]" * 5000), {}, "invalid JSON"),
    "hidden_size string": (lambda d: _edit_json(d / "config.json", hidden_size="64"), {}, "hidden_size must be an integer"),
    "hidden_size fraction": (lambda d: _edit_json(d / "config.json", hidden_size=64.5), {}, "hidden_size must be an integer"),
    "hidden_size bool": (lambda d: _edit_json(d / "config.json", hidden_size=True), {}, "hidden_size must be an integer"),
    "layers 2^31": (lambda d: _edit_json(d / "config.json", num_hidden_layers=2**31), {}, "num_hidden_layers"),
    "vocab 2^31": (lambda d: _edit_json(d / "config.json", vocab_size=2**31), {}, "vocab_size"),
    "missing hidden_size": (lambda d: _edit_json(d / "config.json", hidden_size=None), {}, "lacks 'hidden_size'"),
    "rope_parameters string": (lambda d: _edit_json(d / "config.json", rope_parameters="x"), {}, "rope_parameters"),
    "rope_theta inf": (lambda d: (d / "config.json").write_text(
        (d / "config.json").read_text().replace('"rope_theta": 10000.0', '"rope_theta": Infinity')), {}, "rope_theta"),
    "eps string": (lambda d: _edit_json(d / "config.json", rms_norm_eps="tiny"), {}, "rms_norm_eps"),
    "tie string": (lambda d: _edit_json(d / "config.json", tie_word_embeddings="yes"), {}, "tie_word_embeddings"),
    "architectures dict": (lambda d: _edit_json(d / "config.json", architectures={"a": 1}), {}, "architectures"),
    "quantization_config list": (lambda d: _edit_json(d / "config.json", quantization_config=[1]), {},
                                 "quantization_config"),
    "eos id string": (lambda d: _edit_json(d / "generation_config.json", eos_token_id="x"), {}, "eos_token_id"),
    "mask id float": (lambda d: _edit_json(d / "config.json", mask_token_id=1.5), {}, "mask_token_id"),
    "tokenizer_config list": (lambda d: (d / "tokenizer_config.json").write_text("[]"), {}, "expected a JSON object"),
    "chat template lone surrogate": (lambda d: _edit_json(d / "tokenizer_config.json", chat_template="a\ud800"), {},
                                     "surrogate"),
    "tokenizer not UTF-8": (lambda d: (d / "tokenizer.json").write_bytes(b"\xff\xfe"), {}, "UTF-8"),
    "head_dim odd": (lambda d: _edit_json(d / "config.json", head_dim=15), {}, "shape|even|must equal hidden_size"),
    "heads x head_dim != hidden": (lambda d: _edit_json(d / "config.json", head_dim=64), {},
                                   "= 256 must equal hidden_size"),
    "hidden not a multiple of heads": (lambda d: _edit_json(d / "config.json", num_attention_heads=5,
                                                            num_key_value_heads=5), {}, "multiple"),
    # tensors missing, mis-shaped or of the wrong dtype: refused before the output exists
    "missing tensor": (lambda d: _drop_tensor(d, "model.layers.1.post_attention_layernorm.weight"), {},
                       "no tensor 'model.layers.1.post_attention_layernorm.weight'"),
    "int norm": (lambda d: _add_tensor(d, "model.norm.weight", dtype=np.int32), {}, "expected a float tensor"),
    "mis-shaped embedding": (lambda d: _add_tensor(d, "model.embed_tokens.weight", shape=(320, 32)), {}, "shape"),
    "untied without lm_head": (lambda d: _edit_json(d / "config.json", tie_word_embeddings=False), {},
                               "no lm_head.weight"),
    "packed without scale": (lambda d: _add_tensor(d, "model.layers.0.mlp.up_proj.weight", shape=(40, 64),
                                                   dtype=np.uint8), {}, "weight_scale is missing"),
    "corrupt safetensors entry": (lambda d: _patch_st_header(d, '"shape":[64]', '"shape":["a"]'), {}, "corrupted"),
    "safetensors dtype list": (lambda d: _patch_st_header(d, '"dtype":"F32"', '"dtype":["F"]'), {}, "dtype"),
}


def _drop_tensor(hf, name):
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(hf / "model.safetensors"))
    del sd[name]
    save_file(sd, str(hf / "model.safetensors"))


def _patch_st_header(hf, old, new):
    """Replace text in the safetensors JSON header (first occurrence), keeping its length field right."""
    import struct as st

    data = (hf / "model.safetensors").read_bytes()
    (n,) = st.unpack("<Q", data[:8])
    header = data[8:8 + n].decode()
    assert old in header, header[:200]
    header = header.replace(old, new, 1)
    header = header + " " * max(0, n - len(header))
    raw = header.encode()
    (hf / "model.safetensors").write_bytes(st.pack("<Q", len(raw)) + raw + data[8 + n:])


def _add_tensor(hf, name, poison=None, shape=(1,), dtype=np.float32):
    """Add (or replace) tensor `name` of ones, or with `poison` put that value into the existing one."""
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(hf / "model.safetensors"))
    if poison is None:
        sd[name] = np.ones(shape, dtype)
    else:
        sd[name] = sd[name].copy()
        sd[name].flat[7] = poison
    save_file(sd, str(hf / "model.safetensors"))


@pytest.mark.parametrize("label", list(BAD_INPUTS))
def test_bad_inputs_leave_no_output(good_hf, tmp_path, label, capsys):
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
    # the CLI: exit 2 and the message in one line
    args = _cli_args(hf, out_dir / "m.bin", **kwargs)
    assert run_cli(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("bitdlm convert: error: ") and err.count("\n") == 1, err
    assert list(out_dir.iterdir()) == []


def _cli_args(hf, out, **kwargs):
    import argparse

    from bitdlm.convert import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    flags = []
    for k, v in kwargs.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    return p.parse_args([str(hf), str(out), "--quiet", *flags])


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


def test_odd_quantization_config_values_do_not_reach_the_header(good_hf, tmp_path):
    """Found by the fuzzer: a -Infinity inside quantization_config made the header
    unserialisable (ValueError). Provenance keeps plain values only."""
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(good_hf, hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitnet", "x": float("-inf"), "y": [[[]]], "z": 10**400}
    (hf / "config.json").write_text(json.dumps(cfg))
    with ModelFile.open(convert(hf, tmp_path / "m.bin", progress=False)) as mf:
        assert mf.meta["source"]["quantization_config"] == {"quant_method": "bitnet"}


@pytest.mark.parametrize("linear_class", ["int2", None, 5])
def test_packed_checkpoint_with_wrong_linear_class(tmp_path, linear_class, capsys):
    hf = make_hf_model(tmp_path / "hf", seed=8, packed="bitlinear")
    cfg = json.loads((hf / "config.json").read_text())
    if linear_class is None:
        del cfg["quantization_config"]
    else:
        cfg["quantization_config"]["linear_class"] = linear_class
    (hf / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "out").mkdir()
    assert run_cli(_cli_args(hf, tmp_path / "out" / "m.bin")) == 2
    err = capsys.readouterr().err
    assert "scale convention is unknown" in err and "autobitlinear" in err
    assert list((tmp_path / "out").iterdir()) == []


# ----------------------------------------------------------------------------- summary

def test_summary_fp32_tokens_template_precision(fp32_model, tmp_path):
    hf = fp32_model.parent / "hf"
    r = convert_report(hf, tmp_path / "m.bin", progress=False)
    assert Path(r["output"]).read_bytes() == fp32_model.read_bytes()  # the same conversion
    t = r["tokens"]
    assert t["mask"] == {"id": MASK_ID, "token": "<|mask|>", "source": "recognised name '<|mask|>' in tokenizer.json"}
    assert t["bos"]["id"] is None and "none" in t["bos"]["source"]
    assert [(e["id"], e["token"]) for e in t["eos"]] == [(EOS_ID, "<|endoftext|>"), (IM_END_ID, "<|im_end|>")]
    assert t["eos"][0]["source"] == "generation_config.json eos_token_id"
    assert r["chat_template"] == {"present": True, "source": "tokenizer_config.json chat_template",
                                  "chars": len(CHAT_TEMPLATE)}
    assert r["diffusion"]["block_size"] == {"value": 32, "source": "default"}
    assert any(g.startswith("head_dim not in config.json") for g in r["guessed"])
    # precision: the max |f16 - fp32| of the embedding, measured independently here
    emb = _hf_state(hf)["model.embed_tokens.weight"].numpy()
    err = float(np.abs(emb.astype(np.float16).astype(np.float32) - emb).max())
    p = r["precision"]["model.embed_tokens.weight"]
    assert p["source_dtype"] == "F32" and p["stored"] == "f16" and not p["exact"]
    assert p["max_abs_error"] == err > 0 and p["max_abs_value"] == float(np.abs(emb).max())
    text = format_summary(r)
    assert f"mask token:    {MASK_ID} '<|mask|>' (recognised name '<|mask|>'" in text
    assert f"max |delta| {err:.3g}" in text and "tied lm_head" in text and "logit" in text


def test_summary_bf16_loses_only_f16_subnormals(tmp_path):
    hf = make_hf_model(tmp_path / "hf", seed=9, dtype="bfloat16")
    r = convert_report(hf, tmp_path / "m.bin", progress=False)
    p = r["precision"]["model.embed_tokens.weight"]
    # bf16 -> f16 keeps every value in f16's normal range (|w| >= 2^-14) exactly; smaller
    # ones become f16 subnormals, off by at most half their spacing (2^-25)
    assert p["source_dtype"] == "BF16" and 0 < p["max_abs_error"] <= 2.0**-25
    from safetensors import safe_open

    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight").float().numpy()
    moved = emb.astype(np.float16).astype(np.float32) != emb
    assert moved.any() and (np.abs(emb[moved]) < 2.0**-14).all()
    assert float(np.abs(emb.astype(np.float16).astype(np.float32) - emb).max()) == p["max_abs_error"]
    assert f"embedding BF16 -> f16: max |delta| {p['max_abs_error']:.3g}" in format_summary(r)


def test_summary_no_template_config_mask_dropped_i8(tmp_path, capsys):
    from hf_models import write_tokenizer_files

    hf = make_hf_model(tmp_path / "hf", seed=9, extra_config={"mask_token_id": 5})
    write_tokenizer_files(hf, TINY_CONFIG["vocab_size"], chat_template=False)
    _edit_json(hf / "generation_config.json", eos_token_id=[EOS_ID, 999])
    _add_tensor(hf, "model.rotary_emb.inv_freq", shape=(8,))
    r = convert_report(hf, tmp_path / "m.bin", progress=False, lm_head="i8", block_size=16)
    assert r["tokens"]["mask"]["id"] == 5 and r["tokens"]["mask"]["source"] == "config.json mask_token_id"
    i8 = r["precision"]["lm_head.weight"]
    assert i8["stored"] == "i8" and 0 < i8["max_abs_error"] <= i8["max_abs_value"] / 127 / 2 * (1 + 1e-5)
    assert r["chat_template"]["present"] is False
    assert r["diffusion"]["block_size"] == {"value": 16, "source": "flag"}
    assert any("eos id 999" in d for d in r["dropped"])
    assert any("model.rotary_emb.inv_freq" in d for d in r["dropped"])
    text = format_summary(r)
    assert "chat template: none" in text and "--chat" in text and "lm_head F32 -> i8: max |delta|" in text
    assert "dropped:       eos id 999" in text


def test_no_mask_token_is_said(tmp_path):
    hf = make_hf_model(tmp_path / "hf", seed=10)
    tok = json.loads((hf / "tokenizer.json").read_text())
    for a in tok["added_tokens"]:
        if a["content"] == "<|mask|>":
            a["content"] = "<|not_a_mask|>"
    vocab = tok["model"]["vocab"]
    vocab["<|not_a_mask|>"] = vocab.pop("<|mask|>")
    (hf / "tokenizer.json").write_text(json.dumps(tok))
    r = convert_report(hf, tmp_path / "m.bin", progress=False)
    assert r["tokens"]["mask"]["id"] is None and "known name" in r["tokens"]["mask"]["source"]
    assert any("--mask-token" in g for g in r["guessed"])


def test_script_as_typed(good_hf, tmp_path):
    """`python scripts/convert_dlm_to_sglkernel.py HF_DIR OUT.bin`, from the repository root."""
    out = tmp_path / "OUT.bin"
    r = subprocess.run([sys.executable, "scripts/convert_dlm_to_sglkernel.py", str(good_hf), str(out)],
                       cwd=ROOT, capture_output=True, text=True, env=child_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout and "mask token:    1 '<|mask|>'" in r.stdout
    assert "precision:     embedding F32 -> f16: max |delta|" in r.stdout
    with ModelFile.open(out, verify=True) as mf:
        assert mf.meta["mask_token_id"] == MASK_ID
    # a bad input through the script: exit 2, one line, no traceback
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"hidden_size": "big"}')
    r = subprocess.run([sys.executable, "scripts/convert_dlm_to_sglkernel.py", str(tmp_path / "bad"),
                        str(tmp_path / "x.bin")], cwd=ROOT, capture_output=True, text=True, env=child_env(),
                       timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


# ----------------------------------------------------------------------------- temporary files

def _big_checkpoint(hf):
    """~60 MB of float16 weights: converting it takes a while (numpy-written, no torch model)."""
    from np_models import numpy_checkpoint

    return numpy_checkpoint(hf, hidden=512, inter=1536, layers=6, heads=8, kv_heads=8, vocab=16384,
                            dtype=np.float16)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_killed_conversion_leaves_no_file(tmp_path, sig):
    import signal
    import time

    hf = _big_checkpoint(tmp_path / "hf")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "m.bin"
    # preexec: a shell starts background jobs with SIGINT ignored, and Python keeps an
    # inherited SIG_IGN; the child gets the default disposition an interactive user has
    proc = subprocess.Popen([sys.executable, "-m", "bitdlm.cli", "convert", str(hf), str(out), "--quiet"],
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        tmp = []
        while not tmp and time.monotonic() < deadline and proc.poll() is None:
            tmp = [p for p in out_dir.iterdir() if ".bitdlm-tmp-" in p.name]
            time.sleep(0.002)
        assert tmp, "the conversion never created its temporary file (or finished too fast)"
        assert tmp[0].name == f".m.bin.bitdlm-tmp-{proc.pid}"
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == (143 if sig == "SIGTERM" else 130), err
    assert "no output written" in err and "Traceback" not in err
    assert list(out_dir.iterdir()) == []


def test_stale_temp_files_of_dead_pids_are_removed(good_hf, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".m.bin.bitdlm-tmp-{dead.pid}"
        stale_other = tmp_path / f".other.bin.bitdlm-tmp-{dead.pid}-2"
        live = tmp_path / f".m.bin.bitdlm-tmp-{alive.pid}"
        foreign = tmp_path / ".m.bin.tmp-123"  # not ours: left alone
        for p in (stale, stale_other, live, foreign):
            p.write_bytes(b"partial")
        convert(good_hf, tmp_path / "m.bin", progress=False)
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == sorted(["m.bin", live.name, foreign.name])
    finally:
        alive.kill()
        alive.wait()
