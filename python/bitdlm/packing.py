"""Reference (numpy) BitNet quantization and the packed ternary layout.

This module is the single definition of the ``i2_b128`` layout that the C++
kernels read (see csrc/kernels/gemm.h and docs/format.md) and of the BitNet
b1.58 quantizers, written to match ``transformers`` code for code.
"""
from __future__ import annotations

import numpy as np

K_BLOCK = 128  # weights per packed block (32 bytes)


def pad_k(k: int) -> int:
    return (k + K_BLOCK - 1) // K_BLOCK * K_BLOCK


def weight_quant(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """BitNet absmean weight quantization, per tensor, in fp32.

    scale = 1 / clamp(mean|W|, 1e-5); codes = clamp(round_half_even(W*scale), -1, 1).
    Returns (int8 codes, scale) with the effective weight codes / scale.
    """
    w = np.asarray(w, dtype=np.float32)
    mean = np.float32(np.abs(w).mean(dtype=np.float32))
    scale = np.float32(1.0) / np.maximum(mean, np.float32(1e-5))
    codes = np.clip(np.rint(w * scale), -1, 1).astype(np.int8)
    return codes, np.float32(scale)


def act_quant(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token absmax int8 quantization (transformers' ActQuant), in fp32."""
    x = np.asarray(x, dtype=np.float32)
    amax = np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(1e-5))
    s = ((np.float32(1.0) / amax) * np.float32(127.0)).astype(np.float32)  # torch: amax.reciprocal() * 127
    q = np.clip(np.rint(x * s), -128, 127).astype(np.int8)
    return q, s[..., 0]


def pack_i2(codes: np.ndarray) -> np.ndarray:
    """Pack ternary codes int8 [M, K] in {-1,0,1} into uint8 [M, pad_k(K)//4]."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"pack_i2 expects a 2-D matrix, got shape {codes.shape}")
    if codes.size and (codes.min() < -1 or codes.max() > 1):
        raise ValueError("pack_i2 expects ternary codes in {-1, 0, 1}")
    m, k = codes.shape
    kp = pad_k(k)
    u = np.ones((m, kp), dtype=np.uint8)  # padding is t = 0 -> code 1
    u[:, :k] = (codes + 1).astype(np.uint8)
    u = u.reshape(m, kp // K_BLOCK, 4, 32)  # [row, block, group i, byte j]: k = 128b + 32i + j
    packed = u[:, :, 0] | (u[:, :, 1] << 2) | (u[:, :, 2] << 4) | (u[:, :, 3] << 6)
    return np.ascontiguousarray(packed.reshape(m, kp // 4))


def unpack_i2(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of pack_i2: uint8 [M, Kp/4] -> int8 codes [M, k]."""
    packed = np.asarray(packed, dtype=np.uint8)
    m, kb = packed.shape
    p = packed.reshape(m, kb // 32, 1, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    u = (p >> shifts) & 3
    return (u.reshape(m, kb * 4)[:, :k].astype(np.int8) - 1)
