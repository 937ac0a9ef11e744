"""Tiny random BitNet models for the forward tests (shared by test_forward.py and
test_isa_forward.py): transformers' BitNetForCausalLM (`make_hf`, imports torch
when called), the same weights as a _core.Model built straight from them
(`to_core`, independent of the .bin writer), and `core_logits`."""
from __future__ import annotations

import numpy as np

from bitdlm import _core
from bitdlm.packing import pack_i2, weight_quant

TERNARY = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

# name: (hidden, heads, kv_heads, head_dim, inter, vocab, layers, tied)
SHAPES = {
    "gqa1_hd32_oddvocab": (128, 4, 4, 32, 256, 257, 2, True),
    "gqa2_hd64_untied": (256, 4, 2, 64, 320, 300, 2, False),  # intermediate not a multiple of 128
    "gqa4_hd32": (256, 8, 2, 32, 384, 512, 2, True),
    # attention tile tails: head_dim not a multiple of 8, 3 query rows per KV head
    "gqa3_hd12": (72, 6, 2, 12, 160, 211, 2, True),
}


def make_hf(shape, seed=0, rope_theta=10000.0):
    """A random BitNetForCausalLM with online ternary quantization, fp32."""
    import torch
    from transformers import BitNetConfig, BitNetForCausalLM
    from transformers.integrations.bitnet import replace_with_bitnet_linear
    from transformers.utils.quantization_config import BitNetQuantConfig

    H, nh, nkv, hd, inter, V, L, tied = shape
    torch.manual_seed(seed)
    cfg = BitNetConfig(vocab_size=V, hidden_size=H, intermediate_size=inter, num_hidden_layers=L,
                       num_attention_heads=nh, num_key_value_heads=nkv, head_dim=hd,
                       max_position_embeddings=512, rope_theta=rope_theta, rms_norm_eps=1e-5,
                       tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1, pad_token_id=None,
                       attn_implementation="eager")
    model = BitNetForCausalLM(cfg).float().eval()
    sd = model.state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    for name, t in sd.items():
        if name.endswith("norm.weight"):
            t.copy_(0.5 + torch.rand(t.shape, generator=g))
    # fp16-representable embedding / lm_head with O(1) entries: logits of O(10)
    sd["model.embed_tokens.weight"].copy_(torch.randn(V, H, generator=g).half().float())
    if not tied:
        sd["lm_head.weight"].copy_((0.5 * torch.randn(V, H, generator=g)).half().float())
    replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"], quantization_config=BitNetQuantConfig(
        linear_class="autobitlinear", quantization_mode="online"))
    model.load_state_dict(sd, assign=True)
    model.tie_weights()
    return model.eval()


def i8_rows(a):
    """Per-row absmax int8 of a [V, H] table: (q, scale) with a ~= q * scale[row] (a zero row: scale 1)."""
    amax = np.abs(a).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)  # (the padding row is zero)
    return np.clip(np.rint(a / scale[:, None]), -127, 127).astype(np.int8), scale


def pow2_embedding(model, seed=0):
    """Set the embedding rows to q * 2^-e with int8 codes q (each row reaching |q| = 127) and a
    power-of-two scale that differs between rows (e in 5..9): exact in fp16, and per-row int8
    quantization (i8_rows, convert's quantize_lm_head_i8) gives back exactly (q, 2^-e)."""
    import torch

    w = model.model.embed_tokens.weight
    V, H = w.shape
    rng = np.random.default_rng(seed)
    q = rng.integers(-126, 127, size=(V, H))
    q[np.arange(V), rng.integers(0, H, V)] = rng.choice([-127, 127], V)
    e = rng.integers(5, 10, V)
    with torch.no_grad():
        w.copy_(torch.from_numpy((q * np.exp2(-e.astype(np.float64))[:, None]).astype(np.float32)))
    return q.astype(np.int8), np.exp2(-e).astype(np.float32)


def to_core(model, kv_budget=1 << 30, lm_head="f16", kv_dtype="f32", embedding="f16"):
    """Build a _core.Model straight from the HF weights (independent of the .bin writer).
    embedding "i8": per-row int8 rows (i8_rows); tied, they are the int8 lm_head's table
    (lm_head must be "i8"), untied, model.embed_tokens.weight i8 + .scale."""
    buf, meta, tensors = core_parts(model, lm_head, embedding)
    return _core.Model(buf, meta, tensors, kv_budget, kv_dtype)


def core_parts(model, lm_head="f16", embedding="f16"):
    """(buffer, meta, tensor table) that to_core hands to _core.Model."""
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    buf = bytearray()
    tensors = {}

    def add(name, arr, dtype, shape, scale=None):
        buf.extend(b"\0" * (-len(buf) % 64))
        tensors[name] = (len(buf), dtype, list(shape), scale)
        buf.extend(np.ascontiguousarray(arr).tobytes())

    for name, w in sd.items():
        if name.endswith("norm.weight"):
            add(name, w.astype(np.float32), "f32", w.shape)
        elif any(name.endswith(t + ".weight") for t in TERNARY):
            codes, s = weight_quant(w)
            add(name, pack_i2(codes), "i2_b128", w.shape, float(s))
    emb = sd["model.embed_tokens.weight"]
    if embedding == "f16":
        add("model.embed_tokens.weight", emb.astype(np.float16), "f16", emb.shape)
    elif not cfg.tie_word_embeddings:
        q, scale = i8_rows(emb)
        add("model.embed_tokens.weight", q, "i8", emb.shape)
        add("model.embed_tokens.scale", scale, "f32", scale.shape)
    head = sd.get("lm_head.weight", emb)
    if lm_head == "i8":
        q, scale = i8_rows(head)
        add("lm_head.weight", q, "i8", head.shape)
        add("lm_head.scale", scale, "f32", scale.shape)
    elif not cfg.tie_word_embeddings:
        add("lm_head.weight", head.astype(np.float16), "f16", head.shape)
    meta = dict(architecture="bitnet", hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                max_position_embeddings=cfg.max_position_embeddings,
                rope_theta=float(cfg.rope_parameters["rope_theta"]), rms_norm_eps=cfg.rms_norm_eps,
                tie_word_embeddings=bool(cfg.tie_word_embeddings), hidden_act="relu2",
                quant={"weights": "i2_b128", "lm_head": lm_head, "embedding": embedding})
    return bytes(buf), meta, tensors


def core_logits(core, tokens, B=1, cap=None, start=0, ctx_len=0, write=True, seq=None, out=None):
    own = seq is None
    if own:
        seq = core.alloc_seq(cap or start + len(tokens))
    out = np.arange(len(tokens), dtype=np.int32) if out is None else out
    try:
        return core.forward([(seq, np.asarray(tokens, np.int32), start, ctx_len, write, out)], B, "logits")
    finally:
        if own:
            core.free_seq(seq)
