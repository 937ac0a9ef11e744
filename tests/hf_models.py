"""Tiny random BitNet Hugging Face checkpoints for tests (shared helper).

    from hf_models import convert_tiny, make_hf_model, load_reference_model
    path = convert_tiny(tmp_path)                  # tmp_path/hf (checkpoint) -> tmp_path/model.bin
    path = convert_tiny(tmp_path, hidden_size=256, lm_head="i8", tie_word_embeddings=False)
    hf = make_hf_model(tmp_path / "hf", dtype="bfloat16", shards=True)
    hf = make_hf_model(tmp_path / "hf", packed="bitlinear")
    ref = load_reference_model(hf)                 # transformers' quantized model, fp32, eval

Every checkpoint has a byte-level BPE tokenizer.json whose size equals the
config's vocab_size, with special tokens (ids 0..3) "<|endoftext|>" (eos),
"<|mask|>" (the diffusion mask), "<|im_start|>", "<|im_end|>" (end of turn, also
an eos), a ChatML chat template in tokenizer_config.json, and a
generation_config.json. Norm weights are randomised (random init leaves them at 1).
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import json
from pathlib import Path


SPECIAL_TOKENS = ["<|endoftext|>", "<|mask|>", "<|im_start|>", "<|im_end|>"]
EOS_ID, MASK_ID, IM_START_ID, IM_END_ID = 0, 1, 2, 3
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Small but not trivial: K = 160 for down_proj is not a multiple of 128 (padding),
# 4 query heads sharing 2 KV heads (GQA).
TINY_CONFIG = dict(
    vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=10000.0,
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Block diffusion language models decode several tokens per step.",
    "1 + 1 = 2, 2 * 3 = 6, 10 / 5 = 2.",
    "Ternary weights take the values minus one, zero and plus one.",
    "Hello world! How are you today? I am fine, thank you.",
]


def make_tokenizer(vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` with exactly `vocab_size` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    n_base = len(SPECIAL_TOKENS) + 256
    if vocab_size < n_base:
        raise ValueError(f"vocab_size must be >= {n_base} for a byte-level tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    n = tok.get_vocab_size(with_added_tokens=True)
    if n < vocab_size:  # small corpus: fill up with reserved special tokens
        from tokenizers import AddedToken

        tok.add_special_tokens([AddedToken(f"<|reserved_{i}|>", special=True)
                                for i in range(vocab_size - n)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    return tok


def write_tokenizer_files(out_dir, vocab_size: int, chat_template: bool = True,
                          mask_in_tokenizer_config: bool = False) -> None:
    out_dir = Path(out_dir)
    make_tokenizer(vocab_size).save(str(out_dir / "tokenizer.json"))
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
          "pad_token": "<|endoftext|>", "bos_token": None, "model_max_length": 512}
    if chat_template:
        tc["chat_template"] = CHAT_TEMPLATE
    if mask_in_tokenizer_config:
        tc["mask_token"] = "<|mask|>"
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))


def _randomise_norms(model, gen):
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))


def make_hf_model(out_dir, *, seed: int = 0, dtype: str = "float32", shards: bool = False,
                  packed: str | None = None, weight_scale_dtype: str | None = None,
                  pack_uint8: bool = True,
                  extra_config: dict | None = None, tokenizer: bool = True, **cfg) -> Path:
    """Save a random BitNetForCausalLM checkpoint (+ tokenizer files) to out_dir.

    dtype: "float32" | "bfloat16" | "float16" master weights.
    shards: save as several safetensors shards with model.safetensors.index.json.
    packed: None (master weights) or "autobitlinear" / "bitlinear": ternary
      weights stored packed (uint8, transformers' pack_weights) with a
      `weight_scale` in that class's convention (autobitlinear: mean|W|,
      bitlinear: 1/mean|W|), stored in `weight_scale_dtype` (default: dtype).
      pack_uint8=False keeps the ternary values unpacked, as floats (an offline
      autobitlinear flavour transformers also loads).
    extra_config: keys merged into config.json (e.g. DLM keys like mask_token_id).
    cfg: BitNetConfig overrides of TINY_CONFIG.
    """
    import torch
    from transformers import BitNetConfig, BitNetForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    c = dict(TINY_CONFIG)
    c.update(cfg)
    theta = c.pop("rope_theta")
    config = BitNetConfig(**c, rope_parameters={"rope_type": "default", "rope_theta": theta},
                          bos_token_id=None, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = BitNetForCausalLM(config).eval()
    _randomise_norms(model, gen)
    tdtype = getattr(torch, dtype)
    model = model.to(tdtype)
    if packed is None:
        model.save_pretrained(out_dir, max_shard_size="40KB" if shards else "10GB")
    else:
        _save_packed(model, out_dir, packed, getattr(torch, weight_scale_dtype or dtype), shards,
                     pack_uint8)
    conf = json.loads((out_dir / "config.json").read_text())
    if extra_config:
        conf.update(extra_config)
    (out_dir / "config.json").write_text(json.dumps(conf, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [EOS_ID, IM_END_ID], "pad_token_id": EOS_ID}))
    if tokenizer:
        write_tokenizer_files(out_dir, c["vocab_size"])
    return out_dir


def ternary_names(n_layers: int):
    for i in range(n_layers):
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            yield f"model.layers.{i}.{m}.weight"


def reference_quant(w):
    """transformers' WeightQuant arithmetic in torch: (codes int8, scale fp32 tensor)."""
    import torch

    w = w.float()
    scale = 1.0 / w.abs().mean().clamp_(min=1e-5)
    return (w * scale).round().clamp(-1, 1).to(torch.int8), scale


def _save_packed(model, out_dir: Path, linear_class: str, scale_dtype, shards: bool,
                 pack_uint8: bool = True):
    import torch
    from safetensors.torch import save_file
    from transformers.integrations.bitnet import pack_weights

    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    for name in ternary_names(model.config.num_hidden_layers):
        codes, scale = reference_quant(sd[name])
        if pack_uint8:
            sd[name] = pack_weights(codes.to(torch.int16).clone()).contiguous()
        else:
            sd[name] = codes.to(sd[name].dtype).contiguous()
        ws = (1.0 / scale) if linear_class == "autobitlinear" else scale
        sd[name[:-len("weight")] + "weight_scale"] = ws.reshape(1).to(scale_dtype)
    names = sorted(sd)
    groups = [names[i::3] for i in range(3)] if shards else [names]
    if len(groups) == 1:
        save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, g in enumerate(groups):
            fn = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file({k: sd[k] for k in g}, str(out_dir / fn), metadata={"format": "pt"})
            weight_map.update({k: fn for k in g})
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    model.config.quantization_config = {"quant_method": "bitnet", "linear_class": linear_class,
                                        "quantization_mode": "offline"}
    model.config.save_pretrained(out_dir)


def load_reference_model(hf_dir):
    """transformers' quantized BitNet (AutoBitLinear, online quantization), fp32, eval.

    The oracle for forward tests: loads the master weights of a checkpoint from
    make_hf_model (packed=None) with every linear but lm_head quantized the
    BitNet way, per /work/shared/reference.md section 2."""
    import torch
    from transformers import BitNetForCausalLM, BitNetQuantConfig
    from transformers.integrations.bitnet import replace_with_bitnet_linear

    model = BitNetForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    sd = model.state_dict()
    qc = BitNetQuantConfig(linear_class="autobitlinear", quantization_mode="online")
    replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"], quantization_config=qc)
    model.load_state_dict(sd, assign=True, strict=False)
    model.tie_weights()
    return model.eval()


def convert_tiny(tmpdir, *, seed: int = 0, lm_head: str = "f16", dtype: str = "float32",
                 convert_kwargs: dict | None = None, **cfg) -> Path:
    """Build a tiny random checkpoint in tmpdir/hf and convert it to tmpdir/model.bin.

    cfg: TINY_CONFIG overrides. Returns the .bin path (the HF checkpoint is
    `path.parent / "hf"`, usable with load_reference_model)."""
    from bitdlm.convert import convert

    tmpdir = Path(tmpdir)
    hf = make_hf_model(tmpdir / "hf", seed=seed, dtype=dtype, **cfg)
    out = tmpdir / "model.bin"
    return convert(hf, out, lm_head=lm_head, force=True, progress=False, **(convert_kwargs or {}))


def child_env(**extra) -> dict:
    """Environment for a child Python process that must import the SAME bitdlm
    as the tests (an installed wheel in CI, the work tree under PYTHONPATH)."""
    from bitdlm.bench import child_pythonpath

    return dict(os.environ, PYTHONPATH=child_pythonpath(), **{k: str(v) for k, v in extra.items()})
