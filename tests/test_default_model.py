"""The default model shipped in the package (python/bitdlm/data/tiny-bitdlm.bin,
trained by scripts/train_tiny_dlm.py): it loads, greedy decoding is
deterministic, and bitdlm decodes exactly like the independent torch reference
decoder (tests/ref_decoder.py) running transformers' BitNet on the same weights.

The bf16 training checkpoint is not in the repository: the transformers model
is rebuilt from the .bin itself, as an "offline" autobitlinear BitNet whose
ternary weights are the exact codes of the file and whose weight_scale is
mean|W| = 1 / s_w (reference.md section 1), so both sides compute with the
same integers."""
from __future__ import annotations

import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import bitdlm  # noqa: E402
from bitdlm.data import DEFAULT_MODEL_NAME, default_model_path  # noqa: E402

MODEL = default_model_path()
TEXT = ('The "for" statement is used to iterate over the elements of a sequence (such as a string, '
        'tuple or list) or other iterable object. Each item in turn is assigned to the target list.')


@pytest.fixture(scope="module")
def model():
    assert MODEL is not None, f"{DEFAULT_MODEL_NAME} is not in python/bitdlm/data"
    return bitdlm.load(MODEL, threads=1)


@pytest.fixture(scope="module")
def llm(model):
    return bitdlm.LLM(model)


def hf_from_bin(path):
    """transformers' BitNetForCausalLM (fp32, offline AutoBitLinear) with the
    exact ternary codes, scales, norms and embeddings of a bitdlm .bin."""
    import torch
    from transformers import BitNetConfig, BitNetForCausalLM, BitNetQuantConfig
    from transformers.integrations.bitnet import AutoBitLinear, replace_with_bitnet_linear

    from bitdlm.format import ModelFile
    from bitdlm.packing import unpack_i2

    mf = ModelFile.open(path)
    m = mf.meta
    assert m["tie_word_embeddings"] and m["quant"]["lm_head"] == "f16"
    cfg = BitNetConfig(
        vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_hidden_layers"], num_attention_heads=m["num_attention_heads"],
        num_key_value_heads=m["num_key_value_heads"], head_dim=m["head_dim"],
        max_position_embeddings=m["max_position_embeddings"], rms_norm_eps=m["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": m["rope_theta"]},
        hidden_act=m["hidden_act"], tie_word_embeddings=True, pad_token_id=None)
    model = BitNetForCausalLM(cfg)
    replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"], quantization_config=BitNetQuantConfig(
        linear_class="autobitlinear", quantization_mode="offline"))
    sd = {}
    for name, t in mf.tensors.items():
        a = mf.array(name)
        if t.dtype == "i2_b128":
            sd[name] = torch.from_numpy(unpack_i2(a, t.shape[1]).astype(np.float32))
            # autobitlinear offline: y = (x_q @ codes) * weight_scale, weight_scale = mean|W| = 1/s_w
            sd[name[:-len("weight")] + "weight_scale"] = torch.tensor([1.0 / t.scale], dtype=torch.float32)
        else:
            sd[name] = torch.from_numpy(np.array(a, dtype=np.float32))
    missing, unexpected = model.load_state_dict(sd, assign=True, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    n_bit = sum(isinstance(x, AutoBitLinear) and not x.online_quant for x in model.modules())
    assert n_bit == 7 * m["num_hidden_layers"]
    mf.close()
    return model.float().eval()


@pytest.fixture(scope="module")
def hf():
    import torch

    torch.set_num_threads(1)
    return hf_from_bin(MODEL)


# ------------------------------------------------------------------ the file
def test_shipped_in_package_and_small():
    assert MODEL is not None
    p = Path(MODEL)
    assert p.parent == Path(bitdlm.__file__).resolve().parent / "data"
    assert p.stat().st_size <= 10 * 2**20


def test_loads_with_diffusion_metadata(model):
    m = model.meta
    assert m["architecture"] == "bitnet" and m["hidden_act"] == "relu2"
    tok = model.tokenizer
    assert m["mask_token_id"] == tok.encode("<|mask|>")[0]
    assert m["eos_token_ids"] == tok.encode("<|endoftext|>")
    d = m["diffusion"]
    assert d["shift_logits"] is True
    assert d["block_size"] % d["small_block_size"] == 0
    assert "Assistant:" in m["chat_template"]
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert len(ids) < len(TEXT) / 2.5  # a real BPE, not bytes
    logits = model.logits(ids[:16])
    assert logits.shape == (16, m["vocab_size"]) and np.isfinite(logits).all()


def test_forward_matches_transformers(model, hf):
    """Teacher-forced logits: bitdlm's C++ forward vs transformers on the same codes."""
    import torch

    ids = model.tokenizer.encode(TEXT)[:32]
    got = model.logits(ids)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95
    # a trained (if weak) model: its next-token accuracy beats the best constant guess
    targets = np.asarray(ids[1:])
    acc = (want[:-1].argmax(-1) == targets).mean()
    best_constant = np.bincount(targets).max() / len(targets)
    assert acc > best_constant, (acc, best_constant)


# ------------------------------------------------------------------ decoding
def test_greedy_is_deterministic(llm):
    params = bitdlm.SamplingParams(max_tokens=48, temperature=0.0)
    prompts = ['The "while" statement', "User: What is a list?\nAssistant:", "Return a new list"]
    a = llm.generate(prompts, params)
    b = llm.generate(prompts, params)
    c = [llm.generate(p, params)[0] for p in prompts]  # alone == batched
    for x, y, z in zip(a, b, c):
        assert x.token_ids == y.token_ids == z.token_ids
        assert x.text == y.text
        assert len(x.token_ids) > 0 and x.text.strip()


def _prompts(tok):
    ids = tok.encode(TEXT)
    # around the block boundary: prompt remainder in the first block, or exactly whole blocks
    return [ids[:1], ids[:7], ids[:31], ids[:32], ids[:33]]


@pytest.fixture(scope="module")
def llm_f32kv():
    # f32 KV cache: bitdlm then computes like the fp32 oracle (the default f16
    # cache adds its own rounding).
    return bitdlm.LLM(bitdlm.load(MODEL, threads=1, kv_dtype="f32"))


def _all_prompts(tok):
    return _prompts(tok) + [tok.encode(t) for t in ("Return a new list", "User: What is a class?\nAssistant:")]


class BitdlmForward:
    """bitdlm's own forward behind the reference decoder's `forward` hook: one
    sequence and its KV cache, logits for every row."""

    def __init__(self, model, capacity: int):
        self.model, self.bs = model, model.meta["diffusion"]["block_size"]
        self.sid = model.alloc_seq(capacity)

    def __call__(self, ids, start, write):
        out = np.arange(len(ids), dtype=np.int32)
        lg = self.model.forward([(self.sid, np.asarray(ids, np.int32), start, start, write, out)], self.bs, "logits")
        return np.asarray(lg).reshape(len(ids), -1)

    def close(self):
        self.model.free_seq(self.sid)


@pytest.mark.parametrize("threshold", [1.0, 0.9, 0.6])
def test_engine_follows_reference_algorithm(model, llm, threshold):
    """The scheduler alone: the independent reference decoder driven by
    bitdlm's forward must make exactly the engine's decisions (same numerics,
    so no float near-tie can excuse a difference)."""
    from ref_decoder import RefDecoder

    m, d = model.meta, model.meta["diffusion"]
    params = bitdlm.SamplingParams(max_tokens=40, temperature=0.0, threshold=threshold)
    for prompt in _all_prompts(model.tokenizer):
        fwd = BitdlmForward(model, (len(prompt) + 40 + 31) // 32 * 32)
        try:
            ref = RefDecoder(None, block_size=d["block_size"], mask_id=m["mask_token_id"], shift=d["shift_logits"],
                             max_len=m["max_position_embeddings"], forward=fwd)
            want = ref.generate(prompt, max_new_tokens=40, small_block_size=d["small_block_size"],
                                threshold=threshold, stop_ids=m["eos_token_ids"])
        finally:
            fwd.close()
        out = llm.generate(prompt, params)[0]
        assert out.token_ids == want, (len(prompt), out.token_ids, want)


# Online int8 activation quantization makes every implementation chaotic at
# the 1e-2 level: a 1e-6 difference in summation order moves an activation
# across a rounding boundary, one int8 code changes and the logits move by up
# to ~0.1. Measured on the shipped model: transformers fp32 vs transformers
# fp64 differ that much on about half of 32-token windows -- as often as bitdlm
# differs from either. So greedy decoding can only be compared until the first
# decision that such noise can flip: a top-1 / top-2 probability gap, a
# confidence against the threshold, or the most confident position against
# the runner-up closer than NEAR_TIE.
NEAR_TIE = 0.01


@pytest.mark.parametrize("threshold", [1.0, 0.9, 0.6])
def test_matches_torch_reference_decoder(model, llm_f32kv, hf, threshold):
    from ref_decoder import RefDecoder

    m = model.meta
    d = m["diffusion"]
    assert d["block_size"] == 32 and len(_prompts(model.tokenizer)[3]) == 32
    ref = RefDecoder(hf, block_size=d["block_size"], mask_id=m["mask_token_id"], shift=d["shift_logits"])
    params = bitdlm.SamplingParams(max_tokens=40, temperature=0.0, threshold=threshold)
    agreed = 0
    for prompt in _all_prompts(model.tokenizer):
        want = ref.generate(prompt, max_new_tokens=40, small_block_size=d["small_block_size"],
                            threshold=threshold, stop_ids=m["eos_token_ids"])
        got = llm_f32kv.generate(prompt, params)[0].token_ids
        i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if i is None:
            assert got == want, (len(prompt), got, want)  # same tokens, same length
            agreed += len(want)
            continue
        # a divergence must follow a near-tie of the reference decoding
        close = ref.closest_call_before(len(prompt) + i)
        assert close < NEAR_TIE, (len(prompt), i, close, got, want)
        agreed += i
    assert agreed >= 40, agreed


def test_cli_generate_uses_the_default_model():
    from hf_models import child_env

    env = child_env(OMP_NUM_THREADS=1)
    env.pop("BITDLM_MODEL", None)
    r = subprocess.run([sys.executable, "-m", "bitdlm.cli", "generate", "The \"if\" statement",
                        "--max-tokens", "16"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 0


def test_cli_generate_profile():
    from hf_models import child_env

    env = child_env(OMP_NUM_THREADS=1)
    r = subprocess.run([sys.executable, "-m", "bitdlm.cli", "generate", "The \"if\" statement", "--max-tokens", "8",
                        "--profile"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stderr.splitlines() if line.strip()}
    for phase in ("gemm_qkv", "gemm_gate_up", "attention", "lm_head"):
        assert phase in rows and float(rows[phase][1]) > 0, r.stderr
    assert "forwards)" in r.stderr
