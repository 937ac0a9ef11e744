"""The default model shipped in the package (python/bitdlm/data/tiny-bitdlm.bin:
the ternary code DLM of issue 13, trained by scripts/train_gpu.sh): it loads,
greedy decoding is deterministic, bitdlm decodes exactly like the independent
torch reference decoder (tests/ref_decoder.py) running transformers' BitNet on
the same weights, it decodes more than one token per forward at the file's
default threshold, and its greedy outputs on fixed prompts match
tests/data/default_model_golden.json (regenerate deliberately with
`PYTHONPATH=python python3 tests/test_default_model.py --update`).

The bf16 training checkpoint is not in the repository: the transformers model
is rebuilt from the .bin itself, as an "offline" autobitlinear BitNet whose
ternary weights are the exact codes of the file and whose weight_scale is
mean|W| = 1 / s_w (reference.md section 1), so both sides compute with the
same integers."""
from __future__ import annotations

import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import hashlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import bitdlm  # noqa: E402
from bitdlm.data import DEFAULT_MODEL_NAME, default_model_path  # noqa: E402

MODEL = default_model_path()
TEXT = ('def count_words(path, encoding="utf-8"):\n'
        '    """Return a dict mapping each word of the file to its number of occurrences."""\n'
        '    counts = {}\n'
        '    with open(path, encoding=encoding) as f:\n'
        '        for line in f:\n'
        '            for word in line.split():\n'
        '                counts[word] = counts.get(word, 0) + 1\n'
        '    return counts\n')
# code prompts (the model is trained on CPython's standard library)
CODE_PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n\ndef main():",
                'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):',
                "    def test_split(self):\n        self.assertEqual("]
GOLDEN = Path(__file__).resolve().parent / "data" / "default_model_golden.json"
GOLDEN_TOKENS = 40

pytestmark = pytest.mark.slow  # the 2-layer default model, decoded in full (minutes on 2 cores)


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
    assert p.stat().st_size <= 16 * 2**20  # issue 13's size limit


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
    assert tok.encode("\n        ") == tok.encode("\n        ")[:1]  # newline + indentation: one token
    logits = model.logits(ids[:16])
    assert logits.shape == (16, m["vocab_size"]) and np.isfinite(logits).all()


@pytest.mark.torch
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
    prompts = CODE_PROMPTS[:3]
    a = llm.generate(prompts, params)
    b = llm.generate(prompts, params)
    c = [llm.generate(p, params)[0] for p in prompts]  # alone == batched
    for x, y, z in zip(a, b, c):
        assert x.token_ids == y.token_ids == z.token_ids
        assert x.text == y.text
        assert len(x.token_ids) > 0 and x.text.strip()


def test_batched_rules_equal_each_request_alone(llm):
    # a batch runs every request's rule in one select_many pass per rule class; alone, a
    # request's own select() decides: the same tokens and text for every rule and cache
    P = bitdlm.SamplingParams
    params = [P(max_tokens=24, generation_algorithm=a, cache=c, **kw)
              for a, kw in [("threshold", {"threshold": 0.5}), ("threshold", {"threshold": 0.8}),
                            ("factor", {"factor": 1.0}), ("factor", {"factor": 2.0}),
                            ("steps", {"steps": 8}), ("steps", {"steps": 11}), ("hierarchy", {})]
              for c in ("prefix", "dual")]
    prompts = [CODE_PROMPTS[i % len(CODE_PROMPTS)] for i in range(len(params))]
    together = llm.generate(prompts, params)
    alone = [llm.generate(p, sp)[0] for p, sp in zip(prompts, params)]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert [g.text for g in together] == [g.text for g in alone]
    assert all(len(g.token_ids) == 24 or g.finish_reason == "stop" for g in together)


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
    return _prompts(tok) + [tok.encode(t) for t in CODE_PROMPTS[:2]]


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


@pytest.mark.parametrize("threshold", [1.0, 0.5])  # one token per step; the file's default
def test_engine_follows_reference_algorithm(model, llm, threshold):
    """The scheduler alone: the independent reference decoder driven by
    bitdlm's forward must make exactly the engine's decisions (same numerics,
    so no float near-tie can excuse a difference)."""
    from ref_decoder import RefDecoder

    m, d = model.meta, model.meta["diffusion"]
    params = bitdlm.SamplingParams(max_tokens=32, temperature=0.0, threshold=threshold)
    for prompt in _all_prompts(model.tokenizer):
        fwd = BitdlmForward(model, (len(prompt) + 32 + 31) // 32 * 32)
        try:
            ref = RefDecoder(None, block_size=d["block_size"], mask_id=m["mask_token_id"], shift=d["shift_logits"],
                             max_len=m["max_position_embeddings"], forward=fwd)
            want = ref.generate(prompt, max_new_tokens=32, small_block_size=d["small_block_size"],
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


def _torch_prompts(tok):
    # fewer and shorter than the scheduler test's: the fp32 torch model is the slow side
    p = _prompts(tok)
    return [p[0], p[2], p[4], tok.encode(CODE_PROMPTS[0])]


@pytest.mark.torch
@pytest.mark.parametrize("threshold", [1.0, 0.5])  # one token per step; the file's default
def test_matches_torch_reference_decoder(model, llm_f32kv, hf, threshold):
    from ref_decoder import RefDecoder

    m = model.meta
    d = m["diffusion"]
    assert d["block_size"] == 32 and len(_prompts(model.tokenizer)[3]) == 32
    ref = RefDecoder(hf, block_size=d["block_size"], mask_id=m["mask_token_id"], shift=d["shift_logits"])
    params = bitdlm.SamplingParams(max_tokens=32, temperature=0.0, threshold=threshold)
    agreed = 0
    for prompt in _torch_prompts(model.tokenizer):
        want = ref.generate(prompt, max_new_tokens=32, small_block_size=d["small_block_size"],
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
    assert agreed >= 32, agreed


def test_cli_generate_uses_the_default_model():
    from hf_models import child_env

    env = child_env(OMP_NUM_THREADS=1)
    env.pop("BITDLM_MODEL", None)
    r = subprocess.run([sys.executable, "-m", "bitdlm.cli", "generate", "def fibonacci(n):",
                        "--max-tokens", "16"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 0


def test_cli_generate_profile():
    from hf_models import child_env

    env = child_env(OMP_NUM_THREADS=1)
    r = subprocess.run([sys.executable, "-m", "bitdlm.cli", "generate", "def fibonacci(n):", "--max-tokens", "8",
                        "--profile"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stderr.splitlines() if line.strip()}
    for phase in ("gemm_qkv", "gemm_gate_up", "attention", "lm_head"):
        assert phase in rows and float(rows[phase][1]) > 0, r.stderr
    assert "forwards)" in r.stderr
    # the parallel regions: every kind the forward ran, wall = fork + work + imbalance + join
    for kind in ("[ternary_gemm]", "[lm_head]", "[attention]"):
        wall, fork, work, imb, join = map(float, rows[kind][3:8])
        assert float(rows[kind][1]) > 0 and wall > 0 and abs(fork + work + imb + join - wall) <= 0.01, r.stderr


# ------------------------------------------------------------------ parallel decoding
# Issue 13's test: > 1.5 tokens per forward on a few fixed prompts at the file's
# default threshold (0.5: the lowest whose held-out parse rate stays within 10
# points of threshold 1.0's). Met, narrowly, on these prompts: 256 tokens in
# 167 forwards (1.53) on avx2, 161 (1.59) with BITDLM_ISA=scalar. The issue's
# real target, >= 2.0 over the held-out prompts, is NOT met: 1.41 there
# (docs/tiny_model.md) -- a 7-minute model is rarely confident enough to
# unmask several tokens at once.
TPF_FLOOR = 1.5


def test_tokens_per_forward_at_default_threshold(llm):
    params = bitdlm.SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)  # file default threshold
    outs = llm.generate(CODE_PROMPTS, params)
    toks = sum(len(o.token_ids) for o in outs)
    fwd = sum(o.stats["forwards"] for o in outs)
    assert toks == 64 * len(CODE_PROMPTS)
    assert toks / fwd > TPF_FLOOR, (toks, fwd)
    # and threshold 1.0 (one token per step) is the slower schedule on the same prompts
    one = llm.generate(CODE_PROMPTS, bitdlm.SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True,
                                                           threshold=1.0))
    assert sum(o.stats["forwards"] for o in one) > fwd


# ------------------------------------------------------------------ golden outputs
def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_golden(path=MODEL) -> dict:
    """Greedy outputs (f32 KV cache) of CODE_PROMPTS at the file's default
    threshold and at 1.0, each with `stable`: how many leading tokens were
    decided without a near-tie (every decision margin >= NEAR_TIE, measured by
    the reference decoder driven by bitdlm's own forward). Past a near-tie
    another ISA's float rounding may flip a decision: measured, BITDLM_ISA=scalar
    leaves the avx2 golden at token 16 and 32 of two prompts (stable: 1 and 6)."""
    from ref_decoder import RefDecoder

    model = bitdlm.load(path, threads=1, kv_dtype="f32")
    m, d = model.meta, model.meta["diffusion"]
    llm = bitdlm.LLM(model)
    rows = []
    for threshold in (d["threshold"], 1.0):
        params = bitdlm.SamplingParams(max_tokens=GOLDEN_TOKENS, temperature=0.0, threshold=threshold)
        for text in CODE_PROMPTS:
            prompt = model.tokenizer.encode(text)
            got = llm.generate(text, params)[0].token_ids
            fwd = BitdlmForward(model, (len(prompt) + GOLDEN_TOKENS + 31) // 32 * 32)
            try:
                ref = RefDecoder(None, block_size=d["block_size"], mask_id=m["mask_token_id"],
                                 shift=d["shift_logits"], max_len=m["max_position_embeddings"], forward=fwd)
                want = ref.generate(prompt, max_new_tokens=GOLDEN_TOKENS, small_block_size=d["small_block_size"],
                                    threshold=threshold, stop_ids=m["eos_token_ids"])
            finally:
                fwd.close()
            assert got == want, (text, got, want)  # the scheduler test's property, here too
            stable = next((i for i in range(len(want)) if ref.closest_call_before(len(prompt) + i) < NEAR_TIE),
                          len(want))
            rows.append({"prompt": text, "threshold": threshold, "token_ids": got, "stable": stable,
                         "text": model.tokenizer.decode(got)})
    return {"model_sha256": _sha256(path), "default_threshold": d["threshold"], "max_tokens": GOLDEN_TOKENS,
            "kv_dtype": "f32", "near_tie": NEAR_TIE, "outputs": rows}


def test_golden_outputs(llm_f32kv):
    """The shipped file's greedy outputs must not change without a deliberate
    update of tests/data/default_model_golden.json (`--update`): the same on
    1 and 2 threads, and equal to the golden tokens up to the first near-tie
    (beyond it another ISA may round a decision the other way)."""
    golden = json.loads(GOLDEN.read_text())
    assert golden["model_sha256"] == _sha256(MODEL), "the model changed: rerun with --update (deliberately)"
    assert golden["default_threshold"] == llm_f32kv.model.meta["diffusion"]["threshold"]
    two = bitdlm.LLM(bitdlm.load(MODEL, threads=2, kv_dtype="f32"))
    stable = 0
    for row in golden["outputs"]:
        params = bitdlm.SamplingParams(max_tokens=golden["max_tokens"], temperature=0.0, threshold=row["threshold"])
        a = llm_f32kv.generate(row["prompt"], params)[0].token_ids
        b = two.generate(row["prompt"], params)[0].token_ids
        assert a == b, (row["prompt"], a, b)  # the thread count changes nothing
        k = row["stable"]
        assert a[:k] == row["token_ids"][:k], (row["prompt"], row["threshold"], k, a, row["token_ids"])
        stable += k
    # not vacuous: at least an eighth of the golden tokens are compared (75 of
    # 320 when written; this weak model has many near-ties, at 0.5 also
    # confidences close to the threshold)
    assert stable >= len(golden["outputs"]) * golden["max_tokens"] // 8, stable


def test_set_diffusion_defaults_script(tmp_path):
    """scripts/set_diffusion_defaults.py (how the shipped file got its default
    threshold without its checkpoint): only meta.diffusion changes."""
    from bitdlm.format import ModelFile

    out = tmp_path / "m.bin"
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "scripts" /
                                             "set_diffusion_defaults.py"), MODEL, "--out", str(out),
                        "--threshold", "0.55"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with ModelFile.open(MODEL) as a, ModelFile.open(out, verify=True) as b:
        assert b.meta["diffusion"] == {**a.meta["diffusion"], "threshold": 0.55}
        strip = lambda m: {k: v for k, v in m.items() if k not in ("diffusion", "source")}  # noqa: E731
        assert strip(a.meta) == strip(b.meta)
        for name, t in a.tensors.items():
            assert b.tensors[name].scale == t.scale
            assert np.array_equal(a.array(name), b.array(name)), name
    bad = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "scripts" /
                                              "set_diffusion_defaults.py"), str(out), "--threshold", "2"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "threshold" in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]  # no temp file left


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit(f"usage: PYTHONPATH=python python3 {sys.argv[0]} --update  (rewrites {GOLDEN})")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    g = make_golden()
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(g, indent=1) + "\n")
    for r in g["outputs"]:
        print(f"{r['prompt']!r} @ {r['threshold']}: {len(r['token_ids'])} tokens, stable {r['stable']}: {r['text']!r}")
