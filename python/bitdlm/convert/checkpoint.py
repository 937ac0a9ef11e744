"""Read a (possibly sharded) safetensors checkpoint tensor by tensor, without
torch: bf16 is widened by hand, every header entry is checked before use."""
from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

import numpy as np

from ..format import is_int, short_repr
from .common import ConversionError, read_json

_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "U8": "u1", "I8": "i1",
              "I16": "<i2", "I32": "<i4", "I64": "<i8", "BOOL": "?"}


class SafetensorsFile:
    """Minimal safetensors reader (bf16 without torch)."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "rb")
        size = os.fstat(self._f.fileno()).st_size
        try:
            if size < 8:
                raise ConversionError(f"{path}: not a safetensors file (truncated)")
            (n,) = struct.unpack("<Q", self._f.read(8))
            if n > size - 8 or n > 100 << 20:
                raise ConversionError(f"{path}: not a safetensors file or truncated (header length {n})")
            try:
                header = json.loads(self._f.read(n))
            except (ValueError, RecursionError) as e:  # bad UTF-8 / JSON, huge ints, deep nesting
                raise ConversionError(f"{path}: corrupted safetensors header: {short_repr(str(e), 200)}") from None
            base = 8 + n
            self.entries = {}
            if not isinstance(header, dict):
                raise ConversionError(f"{path}: corrupted safetensors header")
            for name, e in header.items():
                if name == "__metadata__":
                    continue
                try:
                    s, t = e["data_offsets"]
                    shape = list(e["shape"])
                    dtype = e["dtype"]
                except (KeyError, TypeError, ValueError):
                    raise ConversionError(f"{path}: corrupted safetensors entry for {short_repr(name)}") from None
                if not (is_int(s) and is_int(t) and all(is_int(x) and 0 <= x < 1 << 40 for x in shape)
                        and len(shape) <= 8):
                    raise ConversionError(f"{path}: corrupted safetensors entry for {short_repr(name)}")
                if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
                    raise ConversionError(f"{path}: tensor {short_repr(name)} has unsupported dtype {short_repr(dtype)}")
                if not 0 <= s <= t or base + t > size:
                    raise ConversionError(f"{path}: tensor {short_repr(name)} lies outside the file (truncated?)")
                count = math.prod(shape)
                if count * np.dtype(_ST_DTYPES[dtype]).itemsize != t - s:
                    raise ConversionError(f"{path}: tensor {short_repr(name)} size does not match its shape")
                self.entries[name] = (dtype, tuple(shape), base + s, count)
            # tensors sharing bytes: a corrupted or hand-made file (safetensors forbids it)
            spans = sorted((off, off + c * np.dtype(_ST_DTYPES[d]).itemsize, k)
                           for k, (d, _shape, off, c) in self.entries.items())
            for (_a0, a1, an), (b0, _b1, bn) in zip(spans, spans[1:]):
                if b0 < a1:
                    raise ConversionError(f"{path}: tensors {short_repr(an)} and {short_repr(bn)} "
                                          "overlap (corrupted safetensors file)")
        except BaseException:
            self._f.close()
            raise

    def raw(self, name: str, rows: tuple | None = None) -> np.ndarray:
        """Read a tensor (or rows [start, stop) of it) from disk.

        pread, not mmap: the pages of a multi-GB input do not pile up in this
        process's resident set; only the tensor being converted is in memory."""
        dtype, shape, off, count = self.entries[name]
        dt = np.dtype(_ST_DTYPES[dtype])
        if rows is not None:
            row = int(np.prod(shape[1:], dtype=np.int64))
            start, stop = max(0, rows[0]), min(shape[0], rows[1])
            off += start * row * dt.itemsize
            count = max(0, stop - start) * row
            shape = (max(0, stop - start),) + tuple(shape[1:])
        out = np.empty(count, dtype=dt)
        buf = memoryview(out).cast("B")
        done = 0
        while done < len(buf):
            n = os.preadv(self._f.fileno(), [buf[done:]], off + done)
            if n <= 0:
                raise ConversionError(f"{self.path}: unexpected end of file reading {name}")
            done += n
        return out.reshape(shape)

    def close(self):
        self._f.close()


def to_f32(a: np.ndarray, st_dtype: str) -> np.ndarray:
    if st_dtype == "BF16":  # bf16 is the top half of an fp32
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


# Tensor names other training code saves -> the Hugging Face BitNet names
# (the users' `BitNetLlama`: `transformer.layers.N`, `subln`; their SubLN insertion
# wraps o_proj / down_proj as nn.Sequential(sub-norm, linear): `.0` / `.1`).
_RENAMES = [
    (re.compile(r"^transformer\.layers\.(\d+)\."), r"model.layers.\1."),
    (re.compile(r"^transformer\.norm\."), "model.norm."),
    (re.compile(r"^embed_tokens\."), "model.embed_tokens."),
    (re.compile(r"\.self_attn\.(?:subln|o_proj\.0)\.weight$"), ".self_attn.attn_sub_norm.weight"),
    (re.compile(r"\.mlp\.(?:subln|down_proj\.0)\.weight$"), ".mlp.ffn_sub_norm.weight"),
    (re.compile(r"\.(o_proj|down_proj)\.1\.(weight|weight_scale)$"), r".\1.\2"),
]


def hf_name(name: str) -> str:
    """The Hugging Face BitNet name of a tensor saved under another training code's name."""
    for pat, rep in _RENAMES:
        name = pat.sub(rep, name)
    return name


class TensorSource:
    """Tensors by Hugging Face BitNet name, what the converter reads: subclasses
    give names(), info(name) -> (safetensors dtype name, shape), raw(name, rows)
    and close()."""

    renamed = 0  # tensors found under another training code's names

    def bind(self, specs: dict) -> None:
        """Learn the output's tensor list (name -> (dtype, logical shape)) before
        any read: a source whose stored shapes are padded needs it."""

    def names(self):
        raise NotImplementedError

    def info(self, name):
        raise NotImplementedError

    def raw(self, name, rows=None) -> np.ndarray:
        raise NotImplementedError

    def close(self):
        pass

    def __contains__(self, name):
        return name in self.names()

    def f32_check(self, name, shape=None):
        dtype, sh = self.info(name)
        if dtype not in ("F32", "F16", "BF16", "F64"):
            raise ConversionError(f"tensor {name!r} is {dtype}, expected a float tensor")
        if shape is not None and tuple(sh) != tuple(shape):
            raise ConversionError(f"tensor {name!r} has shape {list(sh)}, expected {list(shape)} "
                                  f"from config.json")
        return dtype

    def f32(self, name, shape=None, rows=None) -> np.ndarray:
        a = to_f32(self.raw(name, rows), self.f32_check(name, shape))
        if not np.isfinite(a).all():
            raise ConversionError(f"tensor {name!r} holds NaN or infinite values")
        return a


class Checkpoint(TensorSource):
    """All tensors of a (possibly sharded) safetensors checkpoint, by (Hugging Face) name."""

    def __init__(self, hf_dir: Path):
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index, True).get("weight_map")
            if (not isinstance(weight_map, dict)
                    or not all(isinstance(v, str) and v and "/" not in v and "\\" not in v
                               and v not in (".", "..") for v in weight_map.values())):
                raise ConversionError(f"{index}: not a valid safetensors index (weight_map must map "
                                      f"tensor names to shard file names in the same folder)")
            files = sorted(set(weight_map.values()))
        elif (hf_dir / "model.safetensors").is_file():
            weight_map, files = None, ["model.safetensors"]
        else:
            files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
            weight_map = None
            if not files:
                other = [p.name for p in hf_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
                hint = f" (found {other[:3]}: only safetensors checkpoints are supported)" if other else ""
                raise ConversionError(f"{hf_dir}: no model.safetensors or safetensors shards{hint}")
        self.files = {}
        self.where = {}  # HF name -> (file, name in the file)
        try:
            for fn in files:
                p = hf_dir / fn
                if not p.is_file():
                    raise ConversionError(f"{p}: shard listed in the index is missing")
                sf = SafetensorsFile(p)
                self.files[fn] = sf
                for name in sf.entries:
                    canon = hf_name(name)
                    if canon in self.where:
                        raise ConversionError(f"checkpoint holds {self.where[canon][1]!r} and {name!r}: "
                                              f"both are {canon!r}")
                    self.where[canon] = (sf, name)
                    self.renamed += canon != name
        except BaseException:
            self.close()
            raise
        if weight_map is not None:
            present = {orig for _, orig in self.where.values()}
            missing = [n for n, fn in weight_map.items() if n not in present]
            if missing:
                raise ConversionError(f"tensors listed in the index but absent from their shard: {missing[:5]}")

    def names(self):
        return self.where.keys()

    def info(self, name):
        if name not in self.where:
            raise ConversionError(f"checkpoint has no tensor {name!r}")
        sf, orig = self.where[name]
        dtype, shape, _, _ = sf.entries[orig]
        return dtype, shape

    def raw(self, name, rows=None):
        if name not in self.where:
            raise ConversionError(f"checkpoint has no tensor {name!r}")
        sf, orig = self.where[name]
        return sf.raw(orig, rows)

    def close(self):
        for sf in self.files.values():
            sf.close()
        self.files = {}
