"""Import the users' old sgl-kernel model files (SGLBITNT v1) into a bitdlm `.bin`.

Layout (their scripts/convert_dlm_to_sglkernel.py and convert_to_sglkernel.py):
    8s magic b"SGLBITNT", u32 version 1, u32 length + config.json bytes, u32 tensor count;
    per tensor: u32 length + name, u32 dtype (0 u8, 1 f32, 2 f16, 3 bf16), u32 ndim + u32
    dims, u32 has_scale, [f32 scale], u64 nbytes, data.
Two dialects: the f32 scale is always written (convert_dlm_to_sglkernel.py), or only when
has_scale is 1 (convert_to_sglkernel.py and the C++ loader on their main); both are tried.
Ternary weights are u8 [M, pad128(K)/4] with has_scale: in each 128-weight block byte j
holds k = j in bits 6-7, j+32 in 4-5, j+64 in 2-3, j+96 in 0-1, code = t + 1, and the
scale is mean|W| used as a multiplier (y = (codes . x) * scale: transformers'
autobitlinear convention). Other tensors keep their Hugging Face names (f16, or f32 in the
second dialect). The file holds no tokenizer and no mask id: the tokenizer folder is
`--tokenizer DIR`, else the folder beside the file named by its stem (where their server
looked), and the mask token comes from there or `--mask-token-id`.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from ..format import short_repr
from .checkpoint import TensorSource, hf_name
from .common import ConversionError
from .hf import build, check_options
from .tensors import scale_name

MAGIC = b"SGLBITNT"
_DTYPES = {0: ("U8", np.dtype(np.uint8)), 1: ("F32", np.dtype("<f4")), 2: ("F16", np.dtype("<f2")),
           3: ("BF16", np.dtype("<u2"))}
_MAX_TENSORS = 1 << 20
_MAX_NAME = 4096
_MAX_CONFIG = 64 << 20
DIALECTS = {"scale-always": "the f32 scale written for every tensor (convert_dlm_to_sglkernel.py)",
            "scale-if-present": "the f32 scale written only with has_scale = 1 (convert_to_sglkernel.py)"}


def is_sglbitnt(path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == MAGIC
    except OSError:
        return False


class _Reader:
    """Bounds-checked little-endian reads of a file's bytes."""

    def __init__(self, data: memoryview, pos: int = 0):
        self.data, self.pos = data, pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"{what} runs past the end of the file (truncated?)")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]


def _parse(mm: memoryview, always_scale: bool):
    """(config bytes, {name: (dtype id, shape, has_scale, scale, offset, nbytes)}) of one dialect."""
    r = _Reader(mm, 8)
    if r.u32("version") != 1:
        raise ValueError("unsupported SGLBITNT version (only version 1 exists)")
    n = r.u32("config length")
    if n > _MAX_CONFIG:
        raise ValueError(f"config length {n} is absurd")
    config = bytes(r.take(n, "config"))
    count = r.u32("tensor count")
    if count > _MAX_TENSORS:
        raise ValueError(f"tensor count {count} is absurd")
    table = {}
    for _ in range(count):
        ln = r.u32("name length")
        if not 0 < ln <= _MAX_NAME:
            raise ValueError(f"tensor name length {ln} is absurd")
        try:
            name = bytes(r.take(ln, "tensor name")).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("a tensor name is not UTF-8") from None
        dt = r.u32("dtype")
        if dt not in _DTYPES:
            raise ValueError(f"tensor {short_repr(name)} has unknown dtype {dt}")
        nd = r.u32("ndim")
        if not 1 <= nd <= 4:
            raise ValueError(f"tensor {short_repr(name)} has {nd} dimensions")
        shape = tuple(r.u32("shape") for _ in range(nd))
        has_scale = r.u32("has_scale")
        if has_scale not in (0, 1):
            raise ValueError(f"tensor {short_repr(name)} has has_scale = {has_scale}")
        scale = struct.unpack("<f", r.take(4, "scale"))[0] if has_scale or always_scale else None
        nbytes = struct.unpack("<Q", r.take(8, "data size"))[0]
        if nbytes != math.prod(shape) * _DTYPES[dt][1].itemsize:
            raise ValueError(f"tensor {short_repr(name)}: {nbytes} bytes do not match its shape {list(shape)}")
        if name in table:
            raise ValueError(f"tensor {short_repr(name)} listed twice")
        table[name] = (dt, shape, bool(has_scale), scale, r.pos, nbytes)
        r.take(nbytes, f"tensor {short_repr(name)}")
    if r.pos != len(mm):
        raise ValueError(f"{len(mm) - r.pos} bytes after the last tensor")
    return config, table


def unpack_sgl(packed: np.ndarray, k: int) -> np.ndarray:
    """Their 2-bit layout -> int8 codes [M, k]: uint8 [M, Kp/4], in each 32-byte block
    byte j holds k = j (bits 6-7), j+32 (4-5), j+64 (2-3), j+96 (0-1); code = t + 1.
    The padding past k must hold t = 0."""
    m, kb = packed.shape
    p = packed.reshape(m, kb // 32, 1, 32)
    shifts = np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 1, 4, 1)
    u = ((p >> shifts) & 3).reshape(m, kb * 4)
    if u.max(initial=0) > 2:
        raise ConversionError("packed weight holds the invalid 2-bit code 3")
    if (u[:, k:] != 1).any():
        raise ConversionError("packed weight has nonzero values in its K padding")
    return u[:, :k].astype(np.int8) - 1


class SglbitntFile(TensorSource):
    """An SGLBITNT v1 file as a TensorSource: ternary weights read as their values
    (-1/0/+1, f32) with a `weight_scale` (mean|W|, the autobitlinear convention)."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "rb")
        try:
            size = os.fstat(self._f.fileno()).st_size
            mm = memoryview(self._mmap(size))
            errors = {}
            for dialect in DIALECTS:
                try:
                    config, table = _parse(mm, dialect == "scale-always")
                    break
                except ValueError as e:
                    errors[dialect] = str(e)
            else:
                raise ConversionError(f"{path}: not a valid SGLBITNT v1 file: " + "; ".join(
                    f"as {d}: {e}" for d, e in errors.items()))
            self.dialect = dialect
            try:
                self.config = json.loads(config.decode("utf-8"))
            except (ValueError, RecursionError) as e:
                raise ConversionError(f"{path}: the embedded config.json is not JSON: {short_repr(str(e), 200)}") \
                    from None
            if not isinstance(self.config, dict):
                raise ConversionError(f"{path}: the embedded config.json is not a JSON object")
            self.table = {}
            for name, e in table.items():
                canon = hf_name(name)
                self.renamed += canon != name
                self.table[canon] = e
            self.ternary = {n: e for n, e in self.table.items() if e[0] == 0 and e[2]}
            self._k = {}  # ternary name -> logical K, from bind()
        except BaseException:
            self._f.close()
            raise

    def _mmap(self, size):
        import mmap

        if size == 0:
            raise ConversionError(f"{self.path}: empty file")
        self._map = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def bind(self, specs):
        for name, (dtype, shape) in specs.items():
            if dtype != "i2_b128" or name not in self.ternary:
                continue
            m, k = shape
            stored = self.ternary[name][1]
            if stored != (m, (k + 127) // 128 * 128 // 4):
                raise ConversionError(f"packed {name} has shape {list(stored)}, expected "
                                      f"{[m, (k + 127) // 128 * 128 // 4]} for a [{m}, {k}] weight")
            self._k[name] = k

    def names(self):
        return list(self.table) + [scale_name(n) for n in self._k]

    def info(self, name):
        if name in self._k:
            return "F32", (self.ternary[name][1][0], self._k[name])
        if name[:-len("_scale")] in self._k:
            return "F32", (1,)
        if name not in self.table:
            raise ConversionError(f"the SGLBITNT file has no tensor {name!r}")
        dt, shape = self.table[name][:2]
        return _DTYPES[dt][0], shape

    def raw(self, name, rows=None):
        if name in self._k:  # ternary values as f32
            codes = unpack_sgl(self._array(self.ternary[name]), self._k[name]).astype(np.float32)
            return codes if rows is None else codes[rows[0]:rows[1]]
        if name[:-len("_scale")] in self._k:
            return np.array([self.ternary[name[:-len("_scale")]][3]], dtype=np.float32)
        if name not in self.table:
            raise ConversionError(f"the SGLBITNT file has no tensor {name!r}")
        a = self._array(self.table[name])
        return a if rows is None else a[max(0, rows[0]):rows[1]]

    def _array(self, e) -> np.ndarray:
        dt, shape, _, _, off, nbytes = e
        return np.frombuffer(self._map, dtype=_DTYPES[dt][1], count=nbytes // _DTYPES[dt][1].itemsize,
                             offset=off).reshape(shape).copy()

    def close(self):
        if getattr(self, "_map", None) is not None:
            self._map.close()
            self._map = None
        self._f.close()


def tokenizer_dir(path: Path, tokenizer) -> Path:
    """The folder with tokenizer.json: `tokenizer`, else the folder beside `path`
    named by its stem (where their serve_dlm_native.py looked)."""
    if tokenizer is not None:
        d = Path(tokenizer)
        if not (d / "tokenizer.json").is_file():
            raise ConversionError(f"--tokenizer {d}: no tokenizer.json there")
        return d
    d = path.parent / path.stem
    if not (d / "tokenizer.json").is_file():
        raise ConversionError(f"{path}: an SGLBITNT file holds no tokenizer and {d}/tokenizer.json does "
                              f"not exist: pass --tokenizer DIR (the Hugging Face folder it was converted from)")
    return d


def convert_report(path, out_path, *, tokenizer=None, lm_head="f16", embedding="f16", force=False,
                   **settings) -> dict:
    """Convert the SGLBITNT v1 file `path` into the bitdlm `.bin` `out_path`; the
    summary of hf.convert_report (settings: the same keyword arguments)."""
    path, out_path = Path(path), Path(out_path)
    check_options(out_path, force, lm_head, path, embedding)
    tok_dir = tokenizer_dir(path, tokenizer)
    src = SglbitntFile(path)
    origin = {"converter": f"bitdlm convert (SGLBITNT v1, {src.dialect})",
              "hf_dir": os.fsencode(path.resolve()).decode("utf-8", "replace")}
    try:
        return build(src.config, tok_dir, lambda: src, out_path, origin=origin, linear_class="autobitlinear",
                     lm_head=lm_head, embedding=embedding, force=force, **settings)
    finally:
        src.close()
