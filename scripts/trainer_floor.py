#!/usr/bin/env python3
"""The trainer's floor on this GPU (issue 26: is 1M tokens/s reachable for the shipped
shape?): one training step's matrix products and attention alone, timed at the step's
real shapes, nothing else (no quantizers, norms, RoPE, loss, optimizer, launches between).
A step of batch B sees B x (copies + 1) x L positions ([noisy | complementary | clean]):
per layer the four linears (q/k/v fused, o, gate/up fused, down), each forward + the two
backward products (dX, dW), in bf16; the lm_head over B x (L - 1) targets (3 products);
FlexAttention forward + backward with the block-diffusion BlockMask (compiled, as the
trainer runs it). Also the copy bandwidth, for the elementwise share. Prints each part's
milliseconds and the tokens/s the floor allows (B x L / the sum): a trainer cannot beat it.

    python3 scripts/trainer_floor.py --vocab 8192 --batch 64 --hidden 512 --layers 8 --heads 8 \
        --kv-heads 4 --ffn 1024 --seq-len 512 --block-size 32 --complementary   # bench_trainer_gpu.sh part F
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_tiny_dlm as base  # noqa: E402


def timed(fn, reps: int = 10) -> float:
    """Median milliseconds of fn() over `reps` runs after 3 untimed (CUDA events; on a CPU
    device, the wall clock: a smoke test of the script only)."""
    import statistics
    import time

    import torch

    cuda = torch.cuda.is_available()
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main(argv=None):
    p = base.build_parser(__doc__)  # the trainer's shape flags, so the floor is its step's
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    args.copies = 2 if args.complementary else 1

    import torch
    import torch._dynamo

    import fast_bitnet as fb

    torch._dynamo.config.disable = False  # (train_tiny_dlm's TORCH_COMPILE_DISABLE=1 is for transformers)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    B, L, H, F = args.batch, args.seq_len, args.hidden, args.ffn  # (--vocab: the tokenizer's size)
    hd = H // args.heads
    T = (args.copies + 1) * L
    M = B * T
    bf = torch.bfloat16

    def linear_ms(k, n, rows):
        """forward + dX + dW of a (rows x k) @ (k x n) linear."""
        x = torch.randn(rows, k, device=dev, dtype=bf)
        w = torch.randn(n, k, device=dev, dtype=bf)
        g = torch.randn(rows, n, device=dev, dtype=bf)
        return (timed(lambda: x @ w.t()) + timed(lambda: g @ w) + timed(lambda: g.t() @ x))

    qd, kvd = args.heads * hd, args.kv_heads * hd
    parts = {
        "qkv": linear_ms(H, qd + 2 * kvd, M),
        "o": linear_ms(qd, H, M),
        "gate_up": linear_ms(H, 2 * F, M),
        "down": linear_ms(F, H, M),
    }
    per_layer = sum(parts.values())
    out = {f"{k}_ms_per_layer": round(v, 3) for k, v in parts.items()}
    out["linears_ms"] = per_layer * args.layers
    out["lm_head_ms"] = linear_ms(H, args.vocab, B * (L - 1))

    from torch.nn.attention.flex_attention import flex_attention

    bm = fb.make_block_mask(L, args.block_size, args.copies, dev)
    flex = torch.compile(flex_attention, dynamic=False) if dev.type == "cuda" else flex_attention
    grad = dev.type == "cuda"
    q = torch.randn(B, args.heads, T, hd, device=dev, dtype=bf, requires_grad=grad)
    k = torch.randn(B, args.kv_heads, T, hd, device=dev, dtype=bf, requires_grad=grad)
    v = torch.randn(B, args.kv_heads, T, hd, device=dev, dtype=bf, requires_grad=grad)
    go = torch.randn(B, args.heads, T, hd, device=dev, dtype=bf)

    def attn_fwd_bwd():
        o = flex(q, k, v, block_mask=bm, enable_gqa=True)
        if dev.type == "cuda":  # (FlexAttention has no backward on a CPU)
            o.backward(go)

    out["attention_ms_per_layer"] = round(timed(attn_fwd_bwd), 3)
    out["attention_fwd_ms_per_layer"] = round(timed(lambda: flex(q.detach(), k.detach(), v.detach(),
                                                                 block_mask=bm, enable_gqa=True)), 3)
    out["attention_ms"] = out["attention_ms_per_layer"] * args.layers
    out["tile_density"] = round(1 - float(bm.sparsity()) / 100, 4)  # share of 128 x 128 tiles computed

    big = torch.empty((256 if dev.type == "cuda" else 16) * 2**20, device=dev, dtype=torch.uint8)
    dst = torch.empty_like(big)
    ms = timed(lambda: dst.copy_(big))
    out["copy_GBps"] = round(2 * big.numel() / ms / 1e6, 1)  # read + write

    floor = out["linears_ms"] + out["lm_head_ms"] + out["attention_ms"]
    out["floor_ms"] = round(floor, 3)
    out["floor_tokens_per_s"] = round(B * L / floor * 1e3)
    flops = 2 * 3 * M * args.layers * (H * (qd + 2 * kvd) + qd * H + H * 2 * F + F * H) \
        + 2 * 3 * B * (L - 1) * H * args.vocab
    out["linear_TFLOPs"] = round(flops / (out["linears_ms"] + out["lm_head_ms"]) / 1e9, 1)
    out.update(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", batch=B, positions_per_step=M, tokens_per_step=B * L)
    for key, val in out.items():
        print(f"{key:28s} {val}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
