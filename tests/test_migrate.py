"""The users' old files as they hold them (issue 23): SGLBITNT v1 files of their sgl-kernel
engine (both dialects), llama.cpp TQ1_0 / TQ2_0 GGUF files, checkpoints of their training
code (BitnetForCausalLM spelling, dlm_config.json, BitNetLlama tensor names) and their
convert command.

The old files are written here by helpers from the documented layouts (reference.md
section 8, ggml's TQ types through the `gguf` package), from a tiny Hugging Face
checkpoint; importing them must give what converting that checkpoint gives."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_models import CHAT_TEMPLATE, MASK_ID, child_env, make_hf_model
from bitdlm import packing
from bitdlm.convert import ConversionError, convert_report
from bitdlm.convert import gguf_file, sglbitnt
from bitdlm.format import ModelFile, ModelFormatError

ROOT = Path(__file__).resolve().parent.parent
# K a multiple of 128 (their converter pads K and takes mean|W| over the padding, a
# different quantization) and of 256 (one TQ block per 256 weights of a row)
SIZES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def _state(hf):
    from safetensors.torch import load_file

    return load_file(str(hf / "model.safetensors"))


# ----------------------------------------------------------------------------- SGLBITNT

def _sgl_pack(w):
    """Their packing, from the documented layout: K padded to 128, scale = mean|W| of the
    padded matrix, code = clamp(round(W / scale)) + 1, byte j of a 128-block holds k = j in
    bits 6-7, j+32 in 4-5, j+64 in 2-3, j+96 in 0-1."""
    w = w.float().numpy()
    m, k = w.shape
    kp = (k + 127) // 128 * 128
    w = np.pad(w, ((0, 0), (0, kp - k)))
    scale = np.float32(np.abs(w).mean())
    u = (np.clip(np.rint(w / scale), -1, 1) + 1).astype(np.uint8).reshape(m, kp // 128, 4, 32)
    packed = (u[:, :, 0] << 6) | (u[:, :, 1] << 4) | (u[:, :, 2] << 2) | u[:, :, 3]
    return packed.reshape(m, kp // 4), scale


def write_sglbitnt(hf, out, dialect: str, pack_lm_head: bool = False):
    """An SGLBITNT v1 file of checkpoint `hf` as their converters write it.
    dialect "scale-always": f16 non-linear tensors, the f32 scale after every has_scale;
    "scale-if-present": f32 non-linear tensors, the scale only with has_scale = 1."""
    import torch

    sd = _state(hf)
    cfg = json.loads((hf / "config.json").read_text())
    items = []
    for name in sorted(sd):
        t = sd[name]
        if t.ndim == 2 and "weight" in name and not any(s in name for s in ("norm", "embed", "lm_head")):
            packed, scale = _sgl_pack(t)
            items.append((name, 0, packed, scale))
        elif dialect == "scale-always":
            items.append((name, 2, t.to(torch.float16).numpy(), None))
        else:
            items.append((name, 1, t.float().numpy(), None))
    if pack_lm_head:
        packed, scale = _sgl_pack(sd["model.embed_tokens.weight"])
        items.append(("lm_head.weight", 0, packed, scale))
    with open(out, "wb") as f:
        c = json.dumps(cfg).encode()
        f.write(b"SGLBITNT" + struct.pack("<II", 1, len(c)) + c + struct.pack("<I", len(items)))
        for name, dt, a, scale in items:
            nb = name.encode()
            f.write(struct.pack("<I", len(nb)) + nb + struct.pack("<II", dt, a.ndim))
            f.write(struct.pack(f"<{a.ndim}I", *a.shape))
            f.write(struct.pack("<I", scale is not None))
            if scale is not None or dialect == "scale-always":
                f.write(struct.pack("<f", scale or 0.0))
            data = np.ascontiguousarray(a).tobytes()
            f.write(struct.pack("<Q", len(data)) + data)
    return out


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mig")
    hf = make_hf_model(tmp / "hf", seed=5, dtype="bfloat16", **SIZES)
    ref = convert_report(hf, tmp / "ref.bin", progress=False)
    return hf, Path(ref["output"])


def _codes(mf, name):
    return packing.unpack_i2(mf.array(name), mf.tensors[name].shape[1])


def _same_model(a, b, ids, tol=1e-4):
    """Same ternary codes, same scales (float32 reciprocal), same logits."""
    import bitdlm

    with ModelFile.open(a) as ma, ModelFile.open(b) as mb:
        assert ma.meta["mask_token_id"] == mb.meta["mask_token_id"] == MASK_ID
        assert ma.meta["chat_template"] == mb.meta["chat_template"] == CHAT_TEMPLATE
        assert ma.meta["tokenizer_json"] == mb.meta["tokenizer_json"]
        assert ma.meta["diffusion"] == mb.meta["diffusion"]
        for name, t in ma.tensors.items():
            if t.dtype == "i2_b128":
                np.testing.assert_array_equal(_codes(ma, name), _codes(mb, name), err_msg=name)
                assert abs(t.scale - mb.tensors[name].scale) <= 1e-6 * t.scale, name
            else:
                np.testing.assert_array_equal(ma.array(name), mb.array(name), err_msg=name)
    la, lb = bitdlm.load(a).logits(ids), bitdlm.load(b).logits(ids)
    np.testing.assert_allclose(la, lb, rtol=tol, atol=tol)


@pytest.mark.parametrize("dialect", list(sglbitnt.DIALECTS))
def test_sglbitnt_imports_as_the_checkpoint_it_came_from(hf_bf16, tmp_path, dialect):
    hf, ref = hf_bf16
    old = write_sglbitnt(hf, tmp_path / "hf.bin", dialect, pack_lm_head=dialect == "scale-if-present")
    # the tokenizer folder is found where their server looked: beside the file, by its stem
    (tmp_path / "hf").symlink_to(hf)
    r = sglbitnt.convert_report(old, tmp_path / "new.bin", progress=False)
    with ModelFile.open(r["output"], verify=True) as mf:
        assert mf.meta["source"]["converter"] == f"bitdlm convert (SGLBITNT v1, {dialect})"
    if dialect == "scale-if-present":  # their 2-bit copy of the tied lm_head is not used
        assert any("lm_head.weight" in d for d in r["dropped"])
    _same_model(ref, Path(r["output"]), np.arange(5, 40, dtype=np.int32))


def test_sglbitnt_cli_flags_and_errors(hf_bf16, tmp_path):
    hf, ref = hf_bf16
    old = write_sglbitnt(hf, tmp_path / "old.bin", "scale-always")
    env = child_env()
    cmd = [sys.executable, "-m", "bitdlm.cli", "convert", str(old), str(tmp_path / "n.bin"), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--tokenizer DIR" in r.stderr, r.stderr
    r = subprocess.run(cmd + ["--tokenizer", str(hf), "--mask-token-id", "2"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    with ModelFile.open(tmp_path / "n.bin") as mf:
        assert mf.meta["mask_token_id"] == 2
    # --embedding i8 reaches this path too: one int8 table (tied), or one clear line without --lm-head i8
    r = subprocess.run(cmd + ["--tokenizer", str(hf), "--embedding", "i8", "--force"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--lm-head i8" in r.stderr, r.stderr
    r = subprocess.run(cmd + ["--tokenizer", str(hf), "--embedding", "i8", "--lm-head", "i8", "--force"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "embedding F16 -> i8" in r.stdout, r.stderr + r.stdout
    with ModelFile.open(tmp_path / "n.bin", verify=True) as mf:
        assert mf.meta["quant"]["embedding"] == "i8" and "model.embed_tokens.weight" not in mf.tensors
    # everywhere else an SGLBITNT file is given: one line saying how to convert it
    with pytest.raises(ModelFormatError, match="SGLBITNT.*bitdlm convert OLD.bin NEW.bin"):
        ModelFile.open(old)
    r = subprocess.run([sys.executable, "-m", "bitdlm.cli", "info", str(old)], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bitdlm convert" in r.stderr, r.stderr
    # truncated: one clear error naming both dialects, no output
    bad = tmp_path / "bad.bin"
    bad.write_bytes(old.read_bytes()[:-10])
    with pytest.raises(ConversionError, match="not a valid SGLBITNT v1 file.*scale-always.*scale-if-present"):
        sglbitnt.convert_report(bad, tmp_path / "x.bin", tokenizer=hf, progress=False)
    assert not (tmp_path / "x.bin").exists()


def test_sglbitnt_padded_k_codes(tmp_path):
    """K = 64 and 160 (not multiples of 128): their padding is stripped, the codes and
    scale are theirs (mean|W| over the padded matrix)."""
    hf = make_hf_model(tmp_path / "hf", seed=2)
    old = write_sglbitnt(hf, tmp_path / "old.bin", "scale-always")
    r = sglbitnt.convert_report(old, tmp_path / "new.bin", tokenizer=hf, progress=False)
    sd = _state(hf)
    with ModelFile.open(r["output"]) as mf:
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
            packed, scale = _sgl_pack(sd[name])
            k = sd[name].shape[1]
            u = np.stack([(packed >> s) & 3 for s in (6, 4, 2, 0)], axis=1)  # [M, 4, Kp/4]
            m = packed.shape[0]
            want = u.reshape(m, 4, -1, 32).transpose(0, 2, 1, 3).reshape(m, -1)[:, :k].astype(np.int8) - 1
            np.testing.assert_array_equal(_codes(mf, name), want)
            assert mf.tensors[name].scale == pytest.approx(1.0 / scale, rel=1e-6)


# ----------------------------------------------------------------------------- GGUF

def write_gguf(hf, ref_bin, out, qtype: str):
    """A llama.cpp "bitnet" GGUF of the model in `ref_bin` (our conversion of `hf`): every
    ternary weight as codes / s_w quantized to `qtype` by the gguf package, the rest F32 /
    F16, the tokenizer as tokenizer.ggml.* metadata."""
    import gguf
    from gguf.quants import quantize

    q = getattr(gguf.GGMLQuantizationType, qtype)
    names = {v: k for k, v in gguf_file._GLOBAL.items()}
    names.update({f"model.layers.{i}.{v}.weight": f"blk.{i}.{k}.weight" for i in range(2)
                  for k, v in gguf_file._NAMES.items()})
    tok = json.loads((hf / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {a["id"]: a["content"] for a in tok["added_tokens"]}
    tokens = [added.get(i, t) for i, (t, _) in enumerate(vocab)] + \
        [added[i] for i in sorted(added) if i >= len(vocab)]
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    w = gguf.GGUFWriter(str(out), "bitnet")
    with ModelFile.open(ref_bin) as mf:
        meta = mf.meta
        w.add_context_length(meta["max_position_embeddings"])
        w.add_embedding_length(meta["hidden_size"])
        w.add_block_count(meta["num_hidden_layers"])
        w.add_feed_forward_length(meta["intermediate_size"])
        w.add_head_count(meta["num_attention_heads"])
        w.add_head_count_kv(meta["num_key_value_heads"])
        w.add_rope_freq_base(meta["rope_theta"])
        w.add_layer_norm_rms_eps(meta["rms_norm_eps"])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([3 if i in added else 1 for i in range(len(tokens))])
        w.add_token_merges(merges)
        w.add_eos_token_id(meta["eos_token_ids"][0])
        w.add_chat_template(meta["chat_template"])
        for name, t in mf.tensors.items():
            a = mf.array(name)
            if t.dtype == "i2_b128":
                vals = packing.unpack_i2(a, t.shape[1]).astype(np.float32) / np.float32(t.scale)
                w.add_tensor(names[name], quantize(vals, q), raw_dtype=q)
            else:
                w.add_tensor(names[name], np.array(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("qtype", ["TQ2_0", "TQ1_0"])
def test_gguf_tq_converts_to_identical_codes(hf_bf16, tmp_path, qtype):
    hf, ref = hf_bf16
    g = write_gguf(hf, ref, tmp_path / "m.gguf", qtype)
    r = gguf_file.convert_report(g, tmp_path / "g.bin", mask_token="<|mask|>", progress=False)
    with ModelFile.open(ref) as ma, ModelFile.open(r["output"], verify=True) as mb:
        assert mb.meta["chat_template"] == CHAT_TEMPLATE and mb.meta["mask_token_id"] == MASK_ID
        for name, t in ma.tensors.items():
            if t.dtype == "i2_b128":
                np.testing.assert_array_equal(_codes(ma, name), _codes(mb, name), err_msg=name)
                # the block scale d = 1/s_w is stored as f16
                assert mb.tensors[name].scale == pytest.approx(t.scale, rel=1e-3), name
            else:
                np.testing.assert_array_equal(ma.array(name), mb.array(name), err_msg=name)
        from tokenizers import Tokenizer

        a, b = Tokenizer.from_str(ma.meta["tokenizer_json"]), Tokenizer.from_str(mb.meta["tokenizer_json"])
        text = "def add(a, b):\n    return a + b <|im_end|> The quick brown fox, 12345!"
        assert a.encode(text).ids == b.encode(text).ids


def test_gguf_refuses_other_layouts(hf_bf16, tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "l.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConversionError, match="architecture 'llama' is not supported"):
        gguf_file.convert_report(tmp_path / "l.gguf", tmp_path / "o.bin", progress=False)
    with pytest.raises(ModelFormatError, match="GGUF file: convert it with `bitdlm convert"):
        ModelFile.open(tmp_path / "l.gguf")
    # a bitnet.cpp I2_S tensor (ggml type 36 in its fork): one line naming the missing piece
    data = bytearray((tmp_path / "l.gguf").read_bytes())
    at = data.find(b"token_embd.weight") + len("token_embd.weight") + 4 + 2 * 8  # after n_dims, dims
    data[at:at + 4] = (36).to_bytes(4, "little")
    (tmp_path / "i2s.gguf").write_bytes(bytes(data))
    with pytest.raises(ConversionError, match="I2_S / TL1 / TL2 types are not supported"):
        gguf_file.convert_report(tmp_path / "i2s.gguf", tmp_path / "o.bin", progress=False)


# ----------------------------------------------------------------------------- their checkpoints

def _rewrite(hf, out, rename, cfg_edit, dlm=None):
    """A copy of checkpoint `hf` with its tensors renamed and its config edited."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(hf, out)
    sd = _state(hf)
    save_file({rename(k): v for k, v in sd.items()}, str(out / "model.safetensors"))
    cfg = json.loads((hf / "config.json").read_text())
    cfg_edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    if dlm is not None:
        (out / "dlm_config.json").write_text(json.dumps(dlm))
    return out


def _bitnet_llama(name):
    """Their BitNetLlama's state_dict names."""
    name = name.replace("model.layers.", "transformer.layers.").replace("model.norm.", "transformer.norm.")
    name = name.replace("model.embed_tokens.", "embed_tokens.")
    return name.replace("attn_sub_norm", "subln").replace("ffn_sub_norm", "subln")


def _sequential(name):
    """Their SubLN insertion: o_proj / down_proj as nn.Sequential(sub-norm, linear)."""
    for lin, norm in (("self_attn.o_proj", "self_attn.attn_sub_norm"), ("mlp.down_proj", "mlp.ffn_sub_norm")):
        name = name.replace(f"{lin}.weight", f"{lin}.1.weight").replace(f"{norm}.weight", f"{lin}.0.weight")
    return name


def _llama_cfg(cfg):
    cfg["num_kv_heads"] = cfg.pop("num_key_value_heads")
    cfg.pop("model_type")
    cfg.pop("architectures")


@pytest.mark.parametrize("kind", ["BitnetForCausalLM", "BitNetLlama", "Sequential"])
def test_their_checkpoints(hf_bf16, tmp_path, kind):
    hf, ref = hf_bf16
    if kind == "BitnetForCausalLM":  # a saved step's spelling, with dlm_config.json beside
        src = _rewrite(hf, tmp_path / "ck", lambda n: n, lambda c: c.update(architectures=["BitnetForCausalLM"]),
                       dlm={"bd_size": 16, "mask_token": "<|im_start|>", "num_diffusion_steps": 8})
    elif kind == "BitNetLlama":
        src = _rewrite(hf, tmp_path / "ck", _bitnet_llama, _llama_cfg)
    else:
        src = _rewrite(hf, tmp_path / "ck", _sequential, lambda c: None)
    r = convert_report(src, tmp_path / "out.bin", progress=False)
    with ModelFile.open(ref) as ma, ModelFile.open(r["output"]) as mb:
        for name in ma.tensors:
            np.testing.assert_array_equal(ma.array(name), mb.array(name), err_msg=name)
        if kind == "BitnetForCausalLM":
            assert mb.meta["diffusion"]["block_size"] == 16 and mb.meta["mask_token_id"] == 2
            assert r["diffusion"]["block_size"]["source"] == "dlm_config.json bd_size"
        else:
            assert mb.meta["num_key_value_heads"] == ma.meta["num_key_value_heads"]
            assert any("read as their Hugging Face BitNet names" in g for g in r["guessed"])


def test_their_llama_export_names_the_missing_piece(hf_bf16, tmp_path):
    """A SubLN-inserted Llama (silu) is not a BitNet b1.58 model: one line says why."""
    hf, _ = hf_bf16
    src = _rewrite(hf, tmp_path / "ck", _sequential,
                   lambda c: c.update(architectures=["LlamaForCausalLM"], hidden_act="silu"))
    with pytest.raises(ConversionError, match="unsupported architecture"):
        convert_report(src, tmp_path / "o.bin", progress=False)


def test_convert_script_replaces_output_atomically(hf_bf16, tmp_path):
    """Their convert command run onto an existing output replaces it (as their script did),
    through a temporary file renamed over it."""
    hf, _ = hf_bf16
    out = tmp_path / "OUT.bin"
    out.write_bytes(b"old")
    r = subprocess.run([sys.executable, "scripts/convert_dlm_to_sglkernel.py", str(hf), str(out), "--quiet"],
                       cwd=ROOT, capture_output=True, text=True, env=child_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    with ModelFile.open(out, verify=True):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT.bin"]
    # `bitdlm convert` still wants --force
    r = subprocess.run([sys.executable, "-m", "bitdlm.cli", "convert", str(hf), str(out), "--quiet"],
                       capture_output=True, text=True, env=child_env(), timeout=120)
    assert r.returncode == 2 and "--force" in r.stderr


# ----------------------------------------------------------------------------- their serve command

def test_old_serve_flags_parse_with_the_old_meaning():
    from bitdlm import serve_cli

    p = serve_cli.old_parser()
    a = p.parse_args(["--model-path", "m.bin", "--mask-token-id", "128256", "--tokenizer", "tok"])
    assert (a.model, a.mask_token_id, a.tokenizer, a.port, a.host) == ("m.bin", 128256, "tok", 30000, "127.0.0.1")
    assert a.default_max_tokens == 128 and a.health_status == "healthy"
    # the Rust dlm_server's spellings: -m, -p, -h (host), --max-sequences
    a = p.parse_args(["-m", "x.bin", "-p", "9000", "-h", "0.0.0.0", "--max-sequences", "4"])
    assert (a.model, a.port, a.host, a.max_batch) == ("x.bin", 9000, "0.0.0.0", 4)
    assert "--model-path" in p.format_help()


def test_old_serve_command_line_answers_generate_and_chat(tmp_path):
    """`serve_dlm_native.py --model-path M --mask-token-id ID --block-size 32 --threshold 0.95`
    as typed: /generate and /v1/chat/completions (official openai client) under the old model
    id, /health's "healthy", 128 tokens when a chat request sets no max_tokens."""
    import httpx

    from hf_models import convert_tiny
    from server_helpers import client_for, running_server

    model = convert_tiny(tmp_path)
    cmd = [sys.executable, str(ROOT / "scripts" / "serve_dlm_native.py"), "--model-path", str(model),
           "--mask-token-id", str(MASK_ID), "--block-size", "32", "--threshold", "0.95", "--threads", "1"]
    with running_server(model, tmp_path / "server.log", cmd=cmd) as srv:
        h = httpx.get(srv.base + "/health", trust_env=False).json()
        assert h["status"] == "healthy" and h["mode"] == "dlm_block_diffusion" and "threads" in h
        c = client_for(srv.base, key="unused")
        assert [m.id for m in c.models.list().data] == ["model", "dlm-bitnet-native", "dlm"]
        r = c.chat.completions.create(model="dlm-bitnet-native", messages=[{"role": "user", "content": "hi"}],
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 128 and r.model == "model"
        r = c.chat.completions.create(model="dlm", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        assert r.usage.completion_tokens <= 5
        g = httpx.post(srv.base + "/generate", json={"text": "The quick brown", "max_new_tokens": 6,
                                                      "ignore_eos": True}, trust_env=False, timeout=60)
        assert g.status_code == 200, g.text
        body = g.json()
        assert isinstance(body["text"], str) and body["meta_info"]["completion_tokens"] == 6
        assert body["meta_info"]["latency"] > 0 and body["meta_info"]["tok_per_sec"] > 0
        # SGLang's spelling: prompt + sampling_params.max_new_tokens
        g = httpx.post(srv.base + "/generate", json={"prompt": "Hello", "ignore_eos": True,
                                                      "sampling_params": {"max_new_tokens": 3, "temperature": 0}},
                       trust_env=False, timeout=60).json()
        assert g["meta_info"]["completion_tokens"] == 3
        bad = httpx.post(srv.base + "/generate", json={"max_new_tokens": 3}, trust_env=False, timeout=60)
        assert bad.status_code == 400 and "text" in bad.json()["error"]["message"]
    log = (tmp_path / "server.log").read_text()
    assert "to accept remote clients pass --host 0.0.0.0" in log
