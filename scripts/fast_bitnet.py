"""A compile-friendly BitNet b1.58 for training (scripts/train_dlm_gpu.py).

The same function as transformers' BitNetForCausalLM with online
`AutoBitLinear` layers (ternary absmean weights, per-token absmax int8
activations, straight-through gradients), written so that `torch.compile`
can trace one graph per training step:
- the quantizers are plain tensor expressions with the straight-through
  estimator written as `q.detach() + (x - x.detach())` (value exactly q,
  gradient exactly the identity); under `torch.compile` inductor fuses each
  one with its neighbours (RMSNorm -> absmax -> round/clamp -> bf16 cast in one
  kernel, the absmean of a weight in one reduction);
- q/k/v share one activation quantization and one matmul (their weights are
  quantized separately, each with its own scale, then concatenated), and so
  do gate/up -- the same arithmetic as three / two separate AutoBitLinear calls;
- attention takes either a dense boolean mask through SDPA (CPU, tests,
  evaluation) or a FlexAttention BlockMask (GPU training: the block-diffusion
  mask is ~75% empty at 128x128 tiles and flex skips those tiles);
- parameter names are transformers' (`model.layers.0.self_attn.q_proj.weight`
  ...), so checkpoints load into BitNetForCausalLM and `bitdlm convert` takes them.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F


def weight_quant(w: torch.Tensor) -> torch.Tensor:
    """Ternary absmean quantization (one scale per tensor), straight-through."""
    wf = w.float()
    scale = 1.0 / wf.abs().mean().clamp(min=1e-5)
    q = ((wf * scale).round().clamp(-1, 1) / scale).to(w.dtype)
    return q.detach() + (w - w.detach())


def act_quant(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax int8 quantization, straight-through."""
    xf = x.float()
    scale = 127 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    q = ((xf * scale).round().clamp(-128, 127) / scale).to(x.dtype)
    return q.detach() + (x - x.detach())


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dt)


def _linear(n_in, n_out):
    return nn.Linear(n_in, n_out, bias=False)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = _linear(h, self.n_heads * self.hd)
        self.k_proj = _linear(h, self.n_kv * self.hd)
        self.v_proj = _linear(h, self.n_kv * self.hd)
        self.o_proj = _linear(self.n_heads * self.hd, h)
        self.attn_sub_norm = RMSNorm(self.n_heads * self.hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attn_mask, block_mask):
        B, T, _ = x.shape
        w = torch.cat([weight_quant(self.q_proj.weight), weight_quant(self.k_proj.weight),
                       weight_quant(self.v_proj.weight)])
        qkv = F.linear(act_quant(x), w)
        nq, nk = self.n_heads * self.hd, self.n_kv * self.hd
        # RoPE on q and k together, in the [B, T, heads, hd] layout the projection wrote, before
        # the head transpose, and back in the projection's dtype (fp32 math, as before: cos / sin
        # are fp32): on the transposed views the fused kernel took 1.04 ms a layer on an H100
        # for ~0.3 GB (session-10 profile) and wrote fp32 q / k that flex then cast to bf16.
        qk = _rope(qkv[..., :nq + nk].view(B, T, self.n_heads + self.n_kv, self.hd), cos, sin).to(qkv.dtype)
        q = qk[:, :, :self.n_heads].transpose(1, 2)
        k = qk[:, :, self.n_heads:].transpose(1, 2)
        v = qkv[..., nq + nk:].view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if block_mask is not None:
            from torch.nn.attention.flex_attention import flex_attention

            dt = v.dtype  # bf16 under autocast; flex does not autocast by itself
            o = flex_attention(q.to(dt), k.to(dt), v, block_mask=block_mask, enable_gqa=True,
                               scale=1.0 / math.sqrt(self.hd))
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True,
                                               scale=1.0 / math.sqrt(self.hd))
        o = o.transpose(1, 2).reshape(B, T, nq)
        return F.linear(act_quant(self.attn_sub_norm(o)), weight_quant(self.o_proj.weight))


def _rope(x, cos, sin):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.f = f
        self.gate_proj = _linear(h, f)
        self.up_proj = _linear(h, f)
        self.down_proj = _linear(f, h)
        self.ffn_sub_norm = RMSNorm(f, cfg.rms_norm_eps)

    def forward(self, x):
        w = torch.cat([weight_quant(self.gate_proj.weight), weight_quant(self.up_proj.weight)])
        gu = F.linear(act_quant(x), w)
        g, u = gu[..., :self.f], gu[..., self.f:]
        hidden = self.ffn_sub_norm(F.relu(g).square() * u)  # relu2
        return F.linear(act_quant(hidden), weight_quant(self.down_proj.weight))


class Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attn_mask, block_mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, block_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        theta = cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) \
            else cfg.rope_theta
        inv = 1.0 / (theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, input_ids, position_ids, attention_mask=None, block_mask=None):
        x = self.embed_tokens(input_ids)
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype)[:, :, None], emb.sin().to(x.dtype)[:, :, None]  # [B, T, 1, hd]
        for layer in self.layers:
            x = layer(x, cos, sin, attention_mask, block_mask)
        return SimpleNamespace(last_hidden_state=self.norm(x))


class FastBitNet(nn.Module):
    """`.model(input_ids=, attention_mask=, position_ids=)` and `.lm_head(h)`
    like BitNetForCausalLM (so train_tiny_dlm.diffusion_loss / evaluate run on
    it unchanged); the output head is the tied embedding."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.apply(self._init)

    def _init(self, m):
        std = self.config.initializer_range
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)

    def lm_head(self, h):
        return F.linear(h, self.model.embed_tokens.weight)


def block_diffusion_mask_mod(seq_len: int, block: int, copies: int):
    """FlexAttention mask_mod of the layout [noisy_1 | ... | noisy_copies | clean]
    (each seq_len long): the same rule as train_tiny_dlm.block_diffusion_mask."""

    def mask_mod(b, h, q_idx, kv_idx):
        qc, kc = q_idx // seq_len, kv_idx // seq_len
        qb, kb = (q_idx % seq_len) // block, (kv_idx % seq_len) // block
        k_clean = kc == copies
        clean_q = k_clean & (kb <= qb)
        noisy_q = ((kc == qc) & (kb == qb)) | (k_clean & (kb < qb))
        return torch.where(qc == copies, clean_q, noisy_q)

    return mask_mod


def make_block_mask(seq_len: int, block: int, copies: int, device, tile: int = 128):
    from torch.nn.attention.flex_attention import create_block_mask

    n = (copies + 1) * seq_len
    return create_block_mask(block_diffusion_mask_mod(seq_len, block, copies), None, None, n, n,
                             device=device, BLOCK_SIZE=tile)


def fixed_shape_loss(model, x, masks, block: int, shift: bool, mask_id: int,
                     attention_mask=None, block_mask=None):
    """The objective of train_tiny_dlm.diffusion_loss with static shapes (no
    boolean gathers, so one compiled graph serves every step): every target
    token i has exactly one feature -- the noisy copy that masks it (at i-1
    under shift), or under shift the clean stream at i-1 for a block-start
    token -- and a 0/1 weight; loss = weighted mean cross-entropy. With
    complementary masks every weight is 1. Returns (loss, n_targets)."""
    copies, B, L = masks.shape
    mask_tok = torch.full_like(x, mask_id)
    inp = torch.cat([torch.where(masks[c], mask_tok, x) for c in range(copies)] + [x], dim=1)
    pos = torch.arange(L, device=x.device).repeat(copies + 1)[None].expand(B, -1)
    h = model.model(input_ids=inp, position_ids=pos, attention_mask=attention_mask,
                    block_mask=block_mask).last_hidden_state
    off = 1 if shift else 0
    feat = h[:, copies * L: (copies + 1) * L - off]           # clean stream (block starts)
    picked = torch.zeros(B, L - off, dtype=torch.bool, device=x.device)
    for c in range(copies):
        m = masks[c][:, off:]
        feat = torch.where(m[..., None], h[:, c * L: (c + 1) * L - off], feat)
        picked = picked | m
    if shift:
        starts = (torch.arange(1, L, device=x.device) % block) == 0
        picked = picked | starts[None]
    tgt = x[:, off:]
    logits = model.lm_head(feat).float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
    w = picked.reshape(-1).float()
    n = w.sum()
    return (ce * w).sum() / n, n
