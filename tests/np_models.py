"""BitNet Hugging Face checkpoints written with numpy + safetensors (no torch):
for tests that need a checkpoint of a given size fast (fuzzing, killing a
conversion mid-way), not transformers' numerics (hf_models.py is for those)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hf_models import TINY_CONFIG, write_tokenizer_files


def numpy_checkpoint(hf, *, hidden: int = 64, inter: int = 160, layers: int = 2, heads: int = 4,
                     kv_heads: int = 2, vocab: int = TINY_CONFIG["vocab_size"], dtype=np.float32,
                     seed: int = 0) -> Path:
    """A random BitNetForCausalLM checkpoint (tied embedding) + the tiny tokenizer files
    (vocab must be >= 320, the tokenizer's size)."""
    from safetensors.numpy import save_file

    hf = Path(hf)
    hf.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    hd = hidden // heads
    q, kv = heads * hd, kv_heads * hd

    def w(*shape):
        return (0.02 * rng.standard_normal(shape, np.float32)).astype(dtype)

    sd = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": np.ones(hidden, dtype)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n, shp in (("self_attn.q_proj", (q, hidden)), ("self_attn.k_proj", (kv, hidden)),
                       ("self_attn.v_proj", (kv, hidden)), ("self_attn.o_proj", (hidden, q)),
                       ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                       ("mlp.down_proj", (hidden, inter))):
            sd[p + n + ".weight"] = w(*shp)
        for n, d in (("input_layernorm", hidden), ("post_attention_layernorm", hidden),
                     ("self_attn.attn_sub_norm", q), ("mlp.ffn_sub_norm", inter)):
            sd[p + n + ".weight"] = (1 + rng.standard_normal(d, np.float32) * 0.1).astype(dtype)
    save_file(sd, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 512,
        "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "relu2",
        "eos_token_id": 0, "pad_token_id": 0}, indent=2))
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 3], "pad_token_id": 0}))
    # the tiny 320-token tokenizer (a model's vocab may be larger than its tokenizer)
    write_tokenizer_files(hf, TINY_CONFIG["vocab_size"])
    return hf
