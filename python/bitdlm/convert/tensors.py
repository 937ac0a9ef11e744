"""Tensor transforms of the converter: ternary weights (master, offline or
packed) to codes + scale, row-blocked f16 / int8 copies of the embedding and
lm_head with the precision they lose, and the header-only check that every
tensor the output needs is usable before the output exists."""
from __future__ import annotations

import numpy as np

from .. import packing
from ..format import short_repr
from .checkpoint import Checkpoint, to_f32
from .common import ConversionError

def unpack_hf_packed(packed: np.ndarray, out_features: int) -> np.ndarray:
    """transformers' packed BitNet layout -> int8 ternary codes [out, in].

    uint8 [R, in] with R = ceil(out/4): row i*R + r of W sits in bits 2i..2i+1
    of byte row r (transformers.integrations.bitnet.unpack_weights)."""
    packed = np.asarray(packed, dtype=np.uint8)
    r = packed.shape[0]
    u = np.stack([(packed >> (2 * i)) & 3 for i in range(4)])  # [4, R, in]
    codes = u.reshape(4 * r, packed.shape[1])[:out_features]
    if codes.max(initial=0) > 2:
        raise ConversionError("packed weight holds the invalid 2-bit code 3")
    return codes.astype(np.int8) - 1


def weight_scale(ckpt: Checkpoint, name: str) -> float:
    dtype, shape = ckpt.info(name)
    a = to_f32(ckpt.raw(name), dtype).reshape(-1)
    if a.size != 1:
        raise ConversionError(f"{name} has {a.size} values, expected one per-tensor scale")
    v = np.float32(a[0])
    if not np.isfinite(v) or v <= 0:
        raise ConversionError(f"{name} = {v} is not a positive finite scale")
    return v


def scale_name(name: str) -> str:
    """The `weight_scale` tensor that goes with ternary weight `name`."""
    return name[: -len("weight")] + "weight_scale"


def ternary_kind(ckpt: Checkpoint, name: str, shape, linear_class) -> str:
    """How ternary weight `name` is stored, checked from the safetensors header
    alone: "master" (float weights, quantized here), "offline" (float ternary
    values + weight_scale) or "packed" (uint8 + weight_scale)."""
    m, k = shape
    sname = scale_name(name)
    st, sh = ckpt.info(name)
    if sname not in ckpt:
        if st == "U8":
            raise ConversionError(f"{name} is packed uint8 but {sname} is missing")
        ckpt.f32_check(name, shape)
        return "master"
    if linear_class not in ("autobitlinear", "bitlinear"):
        raise ConversionError(f"{sname} present but quantization_config.linear_class is "
                              f"{short_repr(linear_class)}: the scale convention is unknown "
                              f"(expected 'autobitlinear' or 'bitlinear')")
    if st == "U8":
        if tuple(sh) != ((m + 3) // 4, k):
            raise ConversionError(f"packed {name} has shape {list(sh)}, expected "
                                  f"{[(m + 3) // 4, k]} for a [{m}, {k}] weight")
        kind = "packed"
    else:
        ckpt.f32_check(name, shape)
        kind = "offline"
    ckpt.f32_check(sname)
    return kind


def ternary_tensor(ckpt: Checkpoint, name: str, shape, linear_class):
    """Codes int8 [M, K] and s_w (y = codes.x / (s_w * s_a)) of one ternary weight."""
    kind = ternary_kind(ckpt, name, shape, linear_class)
    if kind == "master":
        return packing.weight_quant(ckpt.f32(name, shape))
    if kind == "packed":
        codes = unpack_hf_packed(ckpt.raw(name), shape[0])
    else:  # offline weights stored unpacked: already ternary values
        w = ckpt.f32(name, shape)
        codes = np.rint(w).astype(np.int8)
        if not np.array_equal(codes, w) or np.abs(codes).max(initial=0) > 1:
            raise ConversionError(f"{name} has a weight_scale but its values are not ternary")
    ws = weight_scale(ckpt, scale_name(name))
    # autobitlinear: y = (x W) * weight_scale, weight_scale = mean|W|
    # bitlinear:     y = (x_q W) / (weight_scale * s_a), weight_scale = 1/mean|W|
    s = np.float32(1.0) / ws if linear_class == "autobitlinear" else ws
    return codes, np.float32(s)


def row_blocks(ckpt: Checkpoint, name: str, shape, rows: int = 8192):
    """fp32 row blocks of a [V, H] float tensor: the big embedding / lm_head are
    never materialised whole in fp32."""
    ckpt.f32_check(name, shape)
    for i in range(0, shape[0], rows):
        yield ckpt.f32(name, shape, (i, i + rows))


def quantize_lm_head_i8(w: np.ndarray):
    """Per-row absmax int8: w ~= q * scale[row], scale = max|row| / 127 (the int8
    lm_head and the int8 embedding alike)."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=1)
    scale = (np.maximum(amax, np.float32(1e-8)) / np.float32(127.0)).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


class ErrorMeter:
    """Max |stored - source| of a tensor written in row blocks (the precision the
    f16 / i8 storage loses), measured on the way."""

    def __init__(self, src_dtype: str, stored: str):
        self.src_dtype, self.stored = src_dtype, stored
        self.max_abs_error = 0.0
        self.max_abs_value = 0.0

    def add(self, src: np.ndarray, stored_f32: np.ndarray) -> None:
        if src.size:
            self.max_abs_error = max(self.max_abs_error, float(np.abs(stored_f32 - src).max()))
            self.max_abs_value = max(self.max_abs_value, float(np.abs(src).max()))

    def as_dict(self) -> dict:
        return {"source_dtype": self.src_dtype, "stored": self.stored,
                "max_abs_error": self.max_abs_error, "max_abs_value": self.max_abs_value,
                "exact": self.max_abs_error == 0.0}


def f16_blocks(blocks, meter):
    for b in blocks:
        out = b.astype(np.float16)
        if not np.isfinite(out).all():
            raise ConversionError("value out of the float16 range in an embedding / lm_head")
        meter.add(b, out.astype(np.float32))
        yield out


def precheck(ckpt: Checkpoint, specs: dict, hp: dict, linear_class) -> list:
    """Every tensor the output needs is in the checkpoint with a usable dtype and
    shape: checked from the safetensors headers before the output file exists.
    Returns the kinds of ternary weights found (see ternary_kind)."""
    kinds = set()
    for name, (dtype, shape) in specs.items():
        if dtype == "i2_b128":
            kinds.add(ternary_kind(ckpt, name, shape, linear_class))
        elif name in ("lm_head.scale", "model.embed_tokens.scale"):
            continue  # made with their int8 tables
        elif name == "lm_head.weight":
            src = "model.embed_tokens.weight" if hp["tie_word_embeddings"] else "lm_head.weight"
            if src not in ckpt:
                raise ConversionError("tie_word_embeddings is false but the checkpoint has no lm_head.weight")
            ckpt.f32_check(src, shape)
        else:
            ckpt.f32_check(name, shape)
    return sorted(kinds)


def write_tensors(w, ckpt: Checkpoint, specs: dict, hp: dict, linear_class, progress: bool) -> dict:
    """Write every tensor of `specs` from `ckpt` into ModelWriter `w`; returns the
    measured precision loss {name: ErrorMeter} of the f16 / i8 copies (embedding
    first; a tied i8 embedding is the lm_head's table and shares its meter)."""
    from tqdm import tqdm

    h, v = hp["hidden_size"], hp["vocab_size"]
    precision = {}
    bar = tqdm(total=len(specs), desc="convert", unit="tensor", disable=not progress)
    for name, (dtype, shape) in specs.items():
        bar.set_postfix_str(name[-40:], refresh=False)
        if dtype == "i2_b128":
            codes, s = ternary_tensor(ckpt, name, shape, linear_class)
            w.write(name, packing.pack_i2(codes), scale=float(s))
        elif name.endswith(".scale"):
            pass  # written with its int8 table
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            # a tied lm_head (and a tied i8 embedding, which is the lm_head's table) reads the embedding
            tied_head = name == "lm_head.weight" and hp["tie_word_embeddings"]
            src = "model.embed_tokens.weight" if tied_head else name
            meter = precision[name] = ErrorMeter(ckpt.info(src)[0], dtype)
            if dtype == "i8":
                write_i8_table(w, name, row_blocks(ckpt, src, (v, h)), meter)
            else:
                w.write(name, f16_blocks(row_blocks(ckpt, src, (v, h)), meter))
        else:  # norms
            w.write(name, ckpt.f32(name, shape))
        bar.update(1)
    bar.close()
    if "model.embed_tokens.weight" not in specs:  # tied i8 embedding: the rows of the int8 lm_head
        precision["model.embed_tokens.weight"] = precision["lm_head.weight"]
    return {k: precision[k] for k in sorted(precision, key=lambda k: k.startswith("lm_head."))}


def write_i8_table(w, name: str, blocks, meter) -> None:
    """An int8 table `name` with per-row scales (`name` .weight -> .scale), quantized
    block by block from the fp32 row blocks `blocks`; the meter sees the dequantized
    rows q * scale in fp32, exactly what the forward reads (also scripts/restore_vocab.py)."""
    scales = []

    def q_blocks():
        for b in blocks:
            q, sc = quantize_lm_head_i8(b)
            meter.add(b, q.astype(np.float32) * sc[:, None])
            scales.append(sc)
            yield q

    w.write(name, q_blocks())
    w.write(name[:-len("weight")] + "scale", np.concatenate(scales))
