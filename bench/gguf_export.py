"""Export a bitdlm `.bin` to a llama.cpp GGUF (architecture "bitnet") with the SAME weights.

Ternary tensors become TQ2_0 (or TQ1_0), the tied embedding / output layer F16 or Q8_0.

Why this is cheap and exact: llama.cpp's TQ2_0 block is 256 weights = 64 bytes of
2-bit codes (t+1, byte m of each 128-weight group holding weights m, m+32, m+64,
m+96 at bits 0,2,4,6) followed by one fp16 scale d. That is exactly our i2_b128
byte layout (docs/format.md, packing.pack_i2), so the export regroups our packed
bytes into 256-weight blocks and appends d = 1/s_w (the per-tensor scale folded
into every block, as llama.cpp's own BitNet converter does; the only rounding is
d in fp16). TQ1_0 packs 5 trits per byte; it is produced with gguf's reference
quantizer from the unpacked codes (slow but exact up to the fp16 d).

An int8 lm_head (per-row scale) becomes Q8_0 blocks that all carry the row's
scale, so llama.cpp reads the same int8 values. llama.cpp's BitNet graph uses
`token_embd.weight` as the output layer (no separate `output.weight`), so its type
is the output-layer precision.

Caveat for correctness (not speed): the llama.cpp BitNet graph vendored by
llama-cpp-python applies SiLU in the FFN where BitNet-2B-4T uses relu^2, so its
logits are not comparable to ours; the work per token is the same.

bitnet.cpp's own types (I2_S, TL2; its llama.cpp fork, bench/bitnet_trim.py) are written
from the same codes, in the byte layouts its converter and kernels use:
  I2_S  our i2_b128 bytes with the four 2-bit fields of each byte in reverse order
        (weight m of a 128-block at bits 6-7, m+96 at bits 0-1), then 32 bytes holding
        the fp32 per-tensor scale 1/s_w (bitnet.cpp reads it behind the codes);
  TL2   per row tile of BM rows (BM, BK from the kernel_config.ini the TL2 kernels were
        generated with): 4-bit |9a+3b+c| of weight triples, then their sign bits,
        then 4-bit 3a+b+4 of the pairs of the K % BK tail, padded to bitnet.cpp's size
        formula and followed by the fp32 scale (see tl2_from_codes).

Usage: python bench/gguf_export.py MODEL.bin OUT.gguf [--weights tq2_0|tq1_0|i2_s|tl2]
           [--output f16|q8_0] [--tl2-config kernel_config.ini|bitnet-cpu.tar.gz]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import numpy as np

# the repo checkout, unless PYTHONPATH / an install provides bitdlm first
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from bitdlm.packing import unpack_i2  # noqa: E402

QK_K = 256  # weights per TQ2_0 / TQ1_0 block
QK8_0 = 32  # weights per Q8_0 block
# ggml types and file types of bitnet.cpp's llama.cpp fork (unknown to gguf-py; upstream
# ggml reuses 39 for MXFP4)
GGML_TYPE_I2_S, GGML_TYPE_TL2 = 36, 39
FTYPE_I2_S, FTYPE_TL2 = 40, 39
WEIGHT_TYPES = ("tq2_0", "tq1_0", "i2_s", "tl2")

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.attn_sub_norm.weight": "attn_sub_norm.weight",
    "mlp.ffn_sub_norm.weight": "ffn_sub_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TERNARY_SUFFIXES = tuple(k for k in _LAYER_NAMES if "_proj" in k)


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    parts = hf_name.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"blk.{parts[2]}.{_LAYER_NAMES[parts[3]]}"
    raise KeyError(f"no GGUF name for tensor {hf_name!r}")


def tq2_0_from_packed(packed: np.ndarray, k: int, scale: float) -> np.ndarray:
    """Our i2_b128 bytes uint8 [M, K/4] + per-tensor s_w -> TQ2_0 bytes uint8 [M, K/256*66]."""
    if k % QK_K:
        raise ValueError(f"TQ2_0 needs K % {QK_K} == 0, got K={k}")
    m = packed.shape[0]
    qs = np.ascontiguousarray(packed[:, : k // 4]).reshape(m, k // QK_K, QK_K // 4)
    d = np.full((m, k // QK_K, 1), 1.0 / scale, dtype=np.float16).view(np.uint8)
    return np.concatenate([qs, d], axis=2).reshape(m, -1)


# byte -> byte with its four 2-bit fields reversed (our i2_b128 byte -> an I2_S byte)
_REV2 = np.array([((b & 3) << 6) | (((b >> 2) & 3) << 4) | (((b >> 4) & 3) << 2) | (b >> 6) for b in range(256)],
                 dtype=np.uint8)


def i2_s_from_packed(packed: np.ndarray, k: int, scale: float) -> np.ndarray:
    """Our i2_b128 bytes uint8 [M, K/4] + s_w -> bitnet.cpp I2_S bytes [M*K/4 + 32]."""
    if k % 128:
        raise ValueError(f"I2_S needs K % 128 == 0, got K={k}")
    tail = np.zeros(32, np.uint8)
    tail[:4] = np.array([1.0 / scale], np.float32).view(np.uint8)
    return np.concatenate([_REV2[np.ascontiguousarray(packed[:, : k // 4])].ravel(), tail])


def tl2_nbytes(m: int, k: int) -> int:
    """ggml_nbytes of a TL2 tensor in bitnet.cpp: its size formula (it assumes a 256-wide
    two-weight tail whatever the real one), rounded to 32, + 32 bytes for the scale."""
    n = (k - 256) * m // 3 * 5 // 8 + 256 * m // 2 * 4 // 8
    return -(-n // 32) * 32 + 32


# output order of the 32 rows of a 32-row group inside a TL2 kernel's byte vector
_TL2_ROWS = np.r_[0:8, 16:24, 8:16, 24:32]


def tl2_from_codes(t: np.ndarray, scale: float, bm: int, bk: int) -> np.ndarray:
    """Ternary codes int8 [M, K] + s_w -> bitnet.cpp TL2 bytes [tl2_nbytes(M, K)].

    K splits into K3 = K // bk * bk columns taken as triples and a tail of pairs. Rows
    go in tiles of bm (each tile's bytes contiguous, one tile per kernel call), within
    a tile by K block, then by 32-row group. Triples: one byte holds |9a+3b+c| (4 bits)
    of two consecutive triples of a row (first in the high nibble), 32 rows per 32
    bytes; the sign of each triple is one bit of 16-bit words (word c, bit 15-i: row
    16*(i%2)+c, triple i//2 of 8 consecutive triples). Pairs (blocks of 32 columns):
    3a+b+4 in a nibble, two pairs per byte, 32 rows per 32 bytes."""
    m, k = t.shape
    k3 = k // bk * bk
    k2 = k - k3
    if m % bm or bm % 32 or bk % 24 or k2 % 32:
        raise ValueError(f"TL2 layout needs M % BM == 0, BM % 32 == 0, BK % 24 == 0, (K % BK) % 32 == 0; "
                         f"got M={m} K={k} BM={bm} BK={bk}")
    tiles, groups = m // bm, bm // 32
    tri = t[:, :k3].astype(np.int8).reshape(m, k3 // 3, 3) @ np.array([9, 3, 1], np.int8)  # [M, K3/3] in -13..13
    # [tile, group, row, kblock, pair of triples, 2] -> [tile, kblock, group, pair, row, 2]
    mag = np.abs(tri).astype(np.uint8).reshape(tiles, groups, 32, k3 // bk, bk // 6, 2).transpose(0, 3, 1, 4, 2, 5)
    three = ((mag[..., 0] << 4) | mag[..., 1])[..., _TL2_ROWS]
    # [tile, group, row(h, c), kblock, 8-triple set, q] -> [tile, kblock, group, set, q, h, c]
    neg = (tri < 0).astype(np.uint16).reshape(tiles, groups, 2, 16, k3 // bk, bk // 24, 8)
    neg = neg.transpose(0, 4, 1, 5, 6, 2, 3)
    bit = (np.uint16(1) << (15 - np.arange(16, dtype=np.uint16))).reshape(8, 2, 1)
    sign = (neg * bit).sum(axis=(-3, -2), dtype=np.uint16).astype("<u2").view(np.uint8)
    parts = [three.ravel(), sign.ravel()]
    if k2:
        pr = t[:, k3:].astype(np.int8).reshape(m, k2 // 2, 2) @ np.array([3, 1], np.int8) + 4  # 0..8
        pr = pr.astype(np.uint8).reshape(tiles, groups, 32, k2 // 32, 8, 2).transpose(0, 3, 1, 4, 2, 5)
        parts.append(((pr[..., 0] << 4) | pr[..., 1])[..., _TL2_ROWS].ravel())
    out = np.zeros(tl2_nbytes(m, k), np.uint8)
    body = np.concatenate(parts)
    out[: body.size] = body
    out[-32:-28] = np.array([1.0 / scale], np.float32).view(np.uint8)
    return out


def q8_0_from_rows(q: np.ndarray, row_scale: np.ndarray) -> np.ndarray:
    """int8 [V, H] with per-row scale (w = q * scale[v]) -> Q8_0 bytes uint8 [V, H/32*34]."""
    v, h = q.shape
    if h % QK8_0:
        raise ValueError(f"Q8_0 needs H % {QK8_0} == 0, got H={h}")
    qs = q.view(np.uint8).reshape(v, h // QK8_0, QK8_0)
    d = np.broadcast_to(row_scale.astype(np.float16).reshape(v, 1, 1), (v, h // QK8_0, 1))
    return np.concatenate([np.ascontiguousarray(d).view(np.uint8), qs], axis=2).reshape(v, -1)


def _q8_rows_from_f16(w: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Per-row absmax int8 quantization (what our i8 lm_head stores), chunked to bound memory."""
    q = np.empty(w.shape, dtype=np.int8)
    s = np.empty(w.shape[0], dtype=np.float32)
    for i in range(0, w.shape[0], chunk):
        x = w[i:i + chunk].astype(np.float32)
        amax = np.maximum(np.abs(x).max(axis=1), np.float32(1e-8))
        s[i:i + chunk] = amax / 127.0
        q[i:i + chunk] = np.clip(np.rint(x * (127.0 / amax)[:, None]), -127, 127)
    return q, s


def export_gguf(meta: dict, get: Callable[[str], np.ndarray], get_scale: Callable[[str], float],
                names: list[str], out_path: str, weights: str = "tq2_0", output: str = "f16",
                progress: bool = True, tl2_blocks: dict | None = None) -> str:
    """Stream a GGUF to out_path. `get(name)` returns the tensor as stored in the .bin
    (packed uint8 for ternary weights), `get_scale(name)` its per-tensor s_w.
    tl2_blocks {(M, K): (BM, BK)}: the TL2 kernels' blocking (weights="tl2" only)."""
    import gguf
    from gguf.quants import quantize

    if weights not in WEIGHT_TYPES:
        raise ValueError(f"weights must be one of {WEIGHT_TYPES}, got {weights!r}")
    if weights == "tl2" and not tl2_blocks:
        raise ValueError("weights='tl2' needs tl2_blocks (the kernel_config.ini of the TL2 kernels)")
    if output not in ("f16", "q8_0"):
        raise ValueError(f"output must be f16 or q8_0, got {output!r}")
    qt = gguf.GGMLQuantizationType
    H = int(meta["hidden_size"])
    ffn = int(meta["intermediate_size"])
    V = int(meta["vocab_size"])

    def k_of(name: str) -> int:
        return ffn if name.endswith("down_proj.weight") else H

    def produce(name: str):
        """-> (gguf name, array, raw_dtype or None)"""
        if name.endswith(TERNARY_SUFFIXES):
            k = k_of(name)
            if weights == "tq2_0":
                return gguf_name(name), tq2_0_from_packed(get(name), k, get_scale(name)), qt.TQ2_0
            if weights == "i2_s":
                return gguf_name(name), i2_s_from_packed(get(name), k, get_scale(name)), GGML_TYPE_I2_S
            if weights == "tl2":
                codes = unpack_i2(get(name), k)
                bm, bk = tl2_block(tl2_blocks, *codes.shape)
                return gguf_name(name), tl2_from_codes(codes, get_scale(name), bm, bk), GGML_TYPE_TL2
            w = unpack_i2(get(name), k).astype(np.float32) * np.float32(1.0 / get_scale(name))
            return gguf_name(name), quantize(w, qt.TQ1_0), qt.TQ1_0
        if name == "model.embed_tokens.weight":
            emb = get(name)
            if output == "f16":
                return "token_embd.weight", np.asarray(emb, dtype=np.float16), None
            if "lm_head.weight" in names and np.dtype(get("lm_head.weight").dtype) == np.int8:
                q, s = np.asarray(get("lm_head.weight")), np.asarray(get("lm_head.scale"), np.float32)
            else:
                q, s = _q8_rows_from_f16(emb)
            return "token_embd.weight", q8_0_from_rows(q, s), qt.Q8_0
        return gguf_name(name), np.asarray(get(name), dtype=np.float32), None

    order = [n for n in names if n not in ("lm_head.weight", "lm_head.scale")]
    arch = "bitnet"
    w = gguf.GGUFWriter(out_path, arch)
    w.add_name("bitdlm synthetic export")
    w.add_block_count(int(meta["num_hidden_layers"]))
    w.add_context_length(int(meta["max_position_embeddings"]))
    w.add_embedding_length(H)
    w.add_feed_forward_length(ffn)
    w.add_head_count(int(meta["num_attention_heads"]))
    w.add_head_count_kv(int(meta["num_key_value_heads"]))
    w.add_rope_dimension_count(int(meta["head_dim"]))
    w.add_rope_freq_base(float(meta["rope_theta"]))
    w.add_layer_norm_rms_eps(float(meta["rms_norm_eps"]))
    w.add_vocab_size(V)
    # No tokenizer: the benchmark feeds token ids; llama.cpp then creates V dummy tokens
    # ("no_vocab": upstream also reads "none", bitnet.cpp's 2024 fork only this one).
    w.add_tokenizer_model("no_vocab")
    w.add_file_type({"tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
                     "i2_s": FTYPE_I2_S, "tl2": FTYPE_TL2}[weights])

    # Pass 1: tensor infos (shapes/sizes without materialising data), so the
    # data can then be streamed one tensor at a time (the model never sits in RAM).
    infos = {}
    for name in order:
        gname, (shape, dtype, nbytes), raw = produce_info(name, meta, weights, output, qt, tl2_blocks)
        infos[name] = (shape, nbytes)
        w.add_tensor_info(gname, shape, dtype, nbytes, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    it = order
    if progress:
        from tqdm import tqdm

        it = tqdm(order, desc=f"gguf {weights}/{output}", unit="tensor")
    for name in it:
        gname, arr, _raw = produce(name)
        if (arr.ndim > 1 and tuple(arr.shape) != tuple(infos[name][0])) or arr.nbytes != infos[name][1]:
            raise ValueError(f"{name}: got {arr.shape} ({arr.nbytes} B), header says {infos[name]}")
        w.write_tensor_data(np.ascontiguousarray(arr))
    w.close()
    return out_path


def produce_info(name: str, meta: dict, weights: str, output: str, qt, tl2_blocks: dict | None = None):
    """Shape/dtype/nbytes of a tensor as produce() will emit it (for the header pass)."""
    H = int(meta["hidden_size"])
    ffn = int(meta["intermediate_size"])
    V = int(meta["vocab_size"])
    heads, kv, hd = int(meta["num_attention_heads"]), int(meta["num_key_value_heads"]), int(meta["head_dim"])
    if name.endswith(TERNARY_SUFFIXES):
        suffix = name.split(".", 3)[3]
        m, k = {
            "self_attn.q_proj.weight": (heads * hd, H),
            "self_attn.k_proj.weight": (kv * hd, H),
            "self_attn.v_proj.weight": (kv * hd, H),
            "self_attn.o_proj.weight": (H, heads * hd),
            "mlp.gate_proj.weight": (ffn, H),
            "mlp.up_proj.weight": (ffn, H),
            "mlp.down_proj.weight": (H, ffn),
        }[suffix]
        if weights == "i2_s":  # shape in weights (ggml: 1 byte a weight), data M*K/4 + 32 bytes
            return gguf_name(name), ((m, k), np.dtype(np.int8), m * k // 4 + 32), GGML_TYPE_I2_S
        if weights == "tl2":
            tl2_block(tl2_blocks, m, k)
            return gguf_name(name), ((m, k), np.dtype(np.int8), tl2_nbytes(m, k)), GGML_TYPE_TL2
        raw = qt.TQ2_0 if weights == "tq2_0" else qt.TQ1_0
        bs, ts = gguf_block(raw)
        nbytes_row = k // bs * ts
        return gguf_name(name), ((m, nbytes_row), np.dtype(np.uint8), m * nbytes_row), raw
    if name == "model.embed_tokens.weight":
        if output == "f16":
            return "token_embd.weight", ((V, H), np.dtype(np.float16), V * H * 2), None
        bs, ts = gguf_block(qt.Q8_0)
        return "token_embd.weight", ((V, H // bs * ts), np.dtype(np.uint8), V * (H // bs * ts)), qt.Q8_0
    dim = ffn if name.endswith("ffn_sub_norm.weight") else H
    return gguf_name(name), ((dim,), np.dtype(np.float32), dim * 4), None


def tl2_block(tl2_blocks: dict, m: int, k: int) -> tuple[int, int]:
    if (m, k) not in tl2_blocks:
        raise ValueError(f"no TL2 kernel for M={m} K={k} (generated: {sorted(tl2_blocks)}); "
                         "add the shape in bench/bitnet_trim.py and remake the archive")
    return tl2_blocks[(m, k)]


def read_tl2_config(path: str) -> dict:
    """{(M, K): (BM, BK)} from a kernel_config.ini or the bitnet-cpu.tar.gz holding it."""
    import configparser
    import tarfile

    if path.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path) as t:
            text = t.extractfile("bitnet/include/kernel_config.ini").read().decode()
    else:
        with open(path) as f:
            text = f.read()
    c = configparser.ConfigParser()
    c.read_string(text)
    return {(int(c[s]["m"]), int(c[s]["k"])): (int(c[s]["bm"]), int(c[s]["bk"])) for s in c.sections()}


def gguf_block(raw) -> tuple[int, int]:
    import gguf

    return gguf.GGML_QUANT_SIZES[raw]


def export_bin(model_path: str, out_path: str, weights: str = "tq2_0", output: str = "f16",
               progress: bool = True, tl2_blocks: dict | None = None) -> str:
    """Export a bitdlm .bin file (read with bitdlm.format) to GGUF."""
    from bitdlm.format import ModelFile

    with ModelFile.open(model_path) as f:
        return export_gguf(f.meta, f.array, lambda n: f.tensors[n].scale, list(f.tensors), out_path,
                           weights, output, progress, tl2_blocks)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--weights", choices=WEIGHT_TYPES, default="tq2_0")
    ap.add_argument("--output", choices=["f16", "q8_0"], default="f16")
    ap.add_argument("--tl2-config", default=None,
                    help="kernel_config.ini of the TL2 kernels, or bench/bitnet_trim.py's archive (--weights tl2)")
    a = ap.parse_args(argv)
    if a.weights == "tl2" and not a.tl2_config:
        ap.error("--weights tl2 needs --tl2-config")
    export_bin(a.model, a.out, a.weights, a.output, tl2_blocks=read_tl2_config(a.tl2_config) if a.tl2_config else None)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
