"""Write a BitNet-b1.58-2B-4T-shaped bitdlm `.bin` with random ternary weights.

For benchmarks only: the weights are random (uniform ternary codes, a per-tensor
scale that keeps activations at unit variance), so the text is garbage but every
kernel does exactly the work of the real model. `--embedding i8` (with `--lm-head
i8`: the model is tied) drops the f16 embedding: its rows come from the int8
lm_head table (docs/format.md). Seeded and vectorised: the full
2B shape takes a few seconds plus the disk write. Never commit the output.

    python bench/make_synthetic_model.py OUT.bin [--lm-head f16|i8] [--embedding f16|i8] [--layers N] [--seed S]
        [--hidden H --ffn F --heads A --kv-heads K --vocab V]   (defaults: the 2B-4T shape)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

# the repo checkout, unless PYTHONPATH / an install provides bitdlm first
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from bitdlm.format import embedding_dtype  # noqa: E402
from bitdlm.packing import K_BLOCK, pack_i2  # noqa: E402

# microsoft/bitnet-b1.58-2B-4T (see /work/shared/reference.md)
SHAPE_2B = dict(hidden=2560, layers=30, heads=20, kv_heads=5, ffn=6912, vocab=128256)
# for tests of the benchmark tooling (K multiples of 256 so TQ2_0/TQ1_0 apply)
SHAPE_TINY = dict(hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, vocab=1000)

# The 81 bytes whose four 2-bit fields are all in {0,1,2} (= t+1 for t in {-1,0,1}).
# Any such byte is 4 valid ternary codes in the i2_b128 layout, so drawing packed
# bytes uniformly from this table is drawing codes uniformly from {-1,0,1}, at 1/4
# of the random numbers and with no packing pass.
_VALID_BYTES = np.array(
    [a | (b << 2) | (c << 4) | (d << 6) for a in range(3) for b in range(3) for c in range(3) for d in range(3)],
    dtype=np.uint8,
)


def random_ternary_packed(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    """Uniform random ternary [m, k] already packed as i2_b128 (uint8 [m, pad_k(k)/4])."""
    if k % K_BLOCK == 0:
        return _VALID_BYTES[rng.integers(0, 81, size=(m, k // 4), dtype=np.uint8)]
    # ragged K: the padding must hold t = 0, so go through the reference packer
    return pack_i2(rng.integers(-1, 2, size=(m, k), dtype=np.int8))


def random_embedding(rng: np.random.Generator, v: int, h: int) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """Embedding f16 [v, h] = q * 2^-7 with q uniform int8 in [-127, 127] (std ~0.57).

    Integer draws are ~20x faster than normals, and they make the per-row int8
    lm_head exact: q itself with scale 2^-7 whenever a row's max |q| is 127
    (rows where it is not are rescaled). Returns (f16 embedding, int8 q, scales)."""
    q = rng.integers(-127, 128, size=(v, h), dtype=np.int8)
    step = np.float16(2.0 ** -7)
    # table lookup: numpy's float16 arithmetic is emulated and slow
    lut = (np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float32) * np.float32(step)).astype(np.float16)
    emb = lut[q.view(np.uint8)]
    amax = np.abs(q).max(axis=1)
    scale = np.full(v, np.float32(step), dtype=np.float32)
    short = np.nonzero(amax < 127)[0]
    if short.size:  # tiny rows only: rescale so each row uses the full int8 range
        qs = q[short].astype(np.float32) * (127.0 / np.maximum(amax[short], 1))[:, None]
        q[short] = np.rint(qs).astype(np.int8)
        scale[short] = np.float32(step) * np.maximum(amax[short], 1) / np.float32(127.0)
    return emb, q, scale


def _tiny_tokenizer_json(vocab: int) -> str:
    """A valid tokenizer.json (word level, tokens "t0".."t{V-1}") so bitdlm.load works."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok.to_str()


def make_meta(hidden, layers, heads, kv_heads, ffn, vocab, lm_head, seed, max_pos=4096, embedding="f16") -> dict:
    if hidden % heads or heads % kv_heads:
        raise ValueError("hidden must divide by heads and heads by kv_heads")
    if vocab < 16:
        raise ValueError("vocab must be >= 16")
    return {
        "architecture": "bitnet",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "intermediate_size": ffn,
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "hidden_act": "relu2",
        "quant": {"weights": "i2_b128", "lm_head": lm_head, "embedding": embedding},
        "bos_token_id": vocab - 4,
        "eos_token_ids": [vocab - 3],
        "mask_token_id": vocab - 2,
        "pad_token_id": vocab - 1,
        "diffusion": {"block_size": 32, "small_block_size": 8, "threshold": 0.9, "shift_logits": True},
        "chat_template": None,
        "tokenizer_json": _tiny_tokenizer_json(vocab),
        "source": f"synthetic random ternary weights (bench/make_synthetic_model.py, seed={seed})",
    }


def iter_tensors(meta: dict, seed: int):
    """Yield (name, array, scale) for every tensor of the contract, streaming (only
    the embedding and one tensor are in memory at a time). Ternary tensors are
    packed i2_b128 uint8 with their s_w; others have scale None. The random stream
    does not depend on the lm_head type, so the f16 and i8 variants of a seed hold
    the same weights (and an i8 embedding reads the rows of that int8 lm_head)."""
    rng = np.random.default_rng(seed)
    H, F, V = meta["hidden_size"], meta["intermediate_size"], meta["vocab_size"]
    hd, nh, nkv = meta["head_dim"], meta["num_attention_heads"], meta["num_key_value_heads"]

    def norm(dim):
        # not all ones, so norm weights are exercised
        return (1.0 + 0.1 * rng.standard_normal(dim, dtype=np.float32)).astype(np.float32), None

    def ternary(m, k):
        # effective weight codes / s_w; s_w = sqrt(2K/3) keeps y at the variance of x
        return random_ternary_packed(rng, m, k), float(np.sqrt(2.0 * k / 3.0))

    emb, emb_q, emb_scale = random_embedding(rng, V, H)
    if embedding_dtype(meta) == "f16":
        yield "model.embed_tokens.weight", emb, None
    if meta["quant"]["lm_head"] == "i8":
        # tied model with an int8 copy of the embedding as the output layer
        yield "lm_head.weight", emb_q, None
        yield "lm_head.scale", emb_scale, None
    del emb, emb_q, emb_scale
    for i in range(meta["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield (p + "input_layernorm.weight", *norm(H))
        yield (p + "post_attention_layernorm.weight", *norm(H))
        yield (p + "self_attn.attn_sub_norm.weight", *norm(H))
        yield (p + "mlp.ffn_sub_norm.weight", *norm(F))
        yield (p + "self_attn.q_proj.weight", *ternary(nh * hd, H))
        yield (p + "self_attn.k_proj.weight", *ternary(nkv * hd, H))
        yield (p + "self_attn.v_proj.weight", *ternary(nkv * hd, H))
        yield (p + "self_attn.o_proj.weight", *ternary(H, nh * hd))
        yield (p + "mlp.gate_proj.weight", *ternary(F, H))
        yield (p + "mlp.up_proj.weight", *ternary(F, H))
        yield (p + "mlp.down_proj.weight", *ternary(H, F))
    yield ("model.norm.weight", *norm(H))


def write_model(path: str, meta: dict, seed: int, overwrite: bool = True) -> None:
    from bitdlm.format import ModelWriter, expected_tensors

    with ModelWriter(path, meta, expected_tensors(meta), overwrite=overwrite) as w:
        for name, arr, scale in iter_tensors(meta, seed):
            w.write(name, arr, scale=scale)
        w.commit()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output .bin path (never commit it)")
    ap.add_argument("--lm-head", choices=["f16", "i8"], default="f16")
    ap.add_argument("--embedding", choices=["f16", "i8"], default="f16",
                    help="i8: no f16 embedding, its rows are the int8 lm_head's (needs --lm-head i8: tied)")
    ap.add_argument("--shape", choices=["2b", "tiny"], default="2b",
                    help="base shape: the 2B-4T one or a tiny one for tests; the flags below override it")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--ffn", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    a = ap.parse_args(argv)
    shape = dict(SHAPE_2B if a.shape == "2b" else SHAPE_TINY)
    for k in shape:
        if getattr(a, k) is not None:
            shape[k] = getattr(a, k)
    if min(shape.values()) < 1:
        ap.error("shape values must be >= 1")
    if a.embedding == "i8" and a.lm_head != "i8":
        ap.error("--embedding i8 needs --lm-head i8 (the model is tied: one int8 table serves both)")
    t0 = time.perf_counter()
    meta = make_meta(**shape, lm_head=a.lm_head, seed=a.seed, embedding=a.embedding)
    write_model(a.out, meta, a.seed)
    size = os.path.getsize(a.out)
    print(json.dumps({"out": a.out, "bytes": size, "seconds": round(time.perf_counter() - t0, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
