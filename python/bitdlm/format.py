"""The bitdlm `.bin` model file: writer, memory-mapped reader and validation.

Layout (docs/format.md is the specification):

    0   8s   magic  b"BITDLM\\r\\n"
    8   u32  version
    12  u32  crc32 of the header bytes
    16  u64  header length H
    24  H    UTF-8 JSON header (right-padded with spaces)
    ... tensor data, every tensor at a 64-byte aligned absolute offset

The header holds `meta` (hyperparameters, special tokens, diffusion defaults,
chat template, the whole tokenizer JSON) and `tensors` (name, dtype, logical
shape, offset, nbytes, per-tensor scale for ternary tensors, crc32 of the data).

This module must stay importable without torch (runtime path).
"""
from __future__ import annotations

import atexit
import json
import math
import mmap
import os
import re
import stat
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .packing import pad_k

MAGIC = b"BITDLM\r\n"  # \r\n catches text-mode mangling, like PNG's magic
VERSION = 1
ALIGN = 64
_PREAMBLE = struct.Struct("<8sIIQ")  # magic, version, header crc32, header length
PREAMBLE_SIZE = _PREAMBLE.size  # 24
# The header holds the whole tokenizer JSON (a few MB for 150k vocabularies).
MAX_HEADER_BYTES = 64 << 20

# Bounds on every header value, checked before anything is sized from it (and
# before the C++ side, which takes these as int32, ever sees them). Generous:
# 10x today's largest open models; docs/format.md lists them.
LIMITS = {
    "hidden_size": 1 << 16,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 1024,
    "intermediate_size": 1 << 18,
    "vocab_size": 1 << 22,
    "max_position_embeddings": 1 << 24,
}
MAX_PROJ_DIM = 1 << 17            # num_attention_heads * head_dim
MAX_EOS_TOKENS = 256
MAX_BLOCK_SIZE = 4096             # diffusion.block_size
MAX_TOKENIZER_CHARS = 60 << 20    # tokenizer_json
MAX_CHAT_TEMPLATE_CHARS = 1 << 20
MAX_JSON_DEPTH = 32               # nesting of the header JSON (ours is 4 deep)
MAX_NAME_CHARS = 256              # tensor names

# dtype name -> numpy storage dtype
DTYPES = {
    "i2_b128": np.dtype(np.uint8),
    "f16": np.dtype("<f2"),
    "f32": np.dtype("<f4"),
    "i8": np.dtype(np.int8),
}

TERNARY_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

_INT_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings")


class ModelFormatError(ValueError):
    """The file is not a valid bitdlm model (missing, truncated, corrupted, foreign)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str            # one of DTYPES
    shape: tuple          # logical shape ([M, K] for i2_b128)
    offset: int           # absolute, 64-byte aligned
    nbytes: int
    scale: float | None   # s_w = 1/mean|W| for i2_b128, else None
    crc32: int | None = None

    @property
    def storage_shape(self) -> tuple:
        return storage_shape(self.dtype, self.shape)


def storage_shape(dtype: str, shape) -> tuple:
    """Shape of the stored array: i2_b128 [M, K] is uint8 [M, pad_k(K)/4]."""
    shape = tuple(int(s) for s in shape)
    if dtype == "i2_b128":
        m, k = shape
        return (m, pad_k(k) // 4)
    return shape


def storage_nbytes(dtype: str, shape) -> int:
    # math.prod on Python ints: no int64 wrap-around for a hostile shape
    return math.prod(storage_shape(dtype, shape)) * DTYPES[dtype].itemsize


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


# --------------------------------------------------------------------------- contract

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v):
    """v as a finite float, or None (not a number, bool, inf/NaN, or an int past the float range)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def validate_meta(meta) -> None:
    """Check the metadata keys of docs/architecture.md and the LIMITS; raise ModelFormatError."""
    if not isinstance(meta, dict):
        raise ModelFormatError("metadata is not a JSON object")

    def need(key, types, what):
        if key not in meta:
            raise ModelFormatError(f"metadata key {key!r} is missing")
        v = meta[key]
        if not isinstance(v, types) or (isinstance(v, bool) and types is not bool):
            raise ModelFormatError(f"metadata key {key!r} must be {what}, got {_short(v)}")
        return v

    if need("architecture", str, "a string") != "bitnet":
        raise ModelFormatError(f"unsupported architecture {_short(meta['architecture'])} (expected 'bitnet')")
    for k in _INT_KEYS:
        v = need(k, int, "a positive integer")
        if not 0 < v <= LIMITS[k]:
            raise ModelFormatError(f"metadata key {k!r} must be an integer in [1, {LIMITS[k]}], got {_short(v)}")
    if meta["num_attention_heads"] % meta["num_key_value_heads"]:
        raise ModelFormatError("num_attention_heads must be a multiple of num_key_value_heads")
    if meta["head_dim"] % 2:
        raise ModelFormatError(f"head_dim must be even (RoPE rotates pairs), got {meta['head_dim']}")
    if meta["num_attention_heads"] * meta["head_dim"] > MAX_PROJ_DIM:
        raise ModelFormatError(f"num_attention_heads * head_dim must be <= {MAX_PROJ_DIM}")
    # float32 on the C++ side: the values must survive the conversion
    for k, lo, hi in (("rope_theta", 1e-6, 1e15), ("rms_norm_eps", 1e-30, 1.0)):
        need(k, (int, float), "a number")
        v = _num(meta[k])
        if v is None or not lo <= v <= hi:
            raise ModelFormatError(f"metadata key {k!r} must be a number in [{lo:g}, {hi:g}], "
                                   f"got {_short(meta[k])}")
    need("tie_word_embeddings", bool, "a boolean")
    if need("hidden_act", str, "a string") != "relu2":
        raise ModelFormatError(f"unsupported hidden_act {_short(meta['hidden_act'])} (expected 'relu2')")
    quant = need("quant", dict, "an object")
    if quant.get("weights") != "i2_b128":
        raise ModelFormatError(f"unsupported weight quantization {_short(quant.get('weights'))}")
    if quant.get("lm_head") not in ("f16", "i8"):
        raise ModelFormatError(f"unsupported lm_head dtype {_short(quant.get('lm_head'))}")
    vocab = meta["vocab_size"]

    def token_id(key, v):
        if not _is_int(v) or not 0 <= v < vocab:
            raise ModelFormatError(f"{key} {_short(v)} is not a token id in [0, {vocab})")

    for k in ("bos_token_id", "mask_token_id", "pad_token_id"):
        if k not in meta:
            raise ModelFormatError(f"metadata key {k!r} is missing")
        if meta[k] is not None:
            token_id(k, meta[k])
    eos = need("eos_token_ids", list, "a list of token ids")
    if len(eos) > MAX_EOS_TOKENS:
        raise ModelFormatError(f"eos_token_ids has {len(eos)} entries (at most {MAX_EOS_TOKENS})")
    for v in eos:
        token_id("eos_token_ids entry", v)
    diff = need("diffusion", dict, "an object")
    for k in ("block_size", "small_block_size"):
        v = diff.get(k)
        if not _is_int(v) or not 0 < v <= MAX_BLOCK_SIZE:
            raise ModelFormatError(f"diffusion.{k} must be an integer in [1, {MAX_BLOCK_SIZE}], got {_short(v)}")
    if diff["block_size"] % diff["small_block_size"]:
        raise ModelFormatError("diffusion.block_size must be a multiple of diffusion.small_block_size")
    th = diff.get("threshold")
    if _num(th) is None or not 0.0 <= th <= 1.0:
        raise ModelFormatError(f"diffusion.threshold must be in [0, 1], got {_short(th)}")
    if not isinstance(diff.get("shift_logits"), bool):
        raise ModelFormatError(f"diffusion.shift_logits must be a boolean, got {_short(diff.get('shift_logits'))}")
    if "chat_template" not in meta or not isinstance(meta["chat_template"], (str, type(None))):
        raise ModelFormatError("metadata key 'chat_template' must be a string or null")
    if meta["chat_template"] is not None and len(meta["chat_template"]) > MAX_CHAT_TEMPLATE_CHARS:
        raise ModelFormatError(f"chat_template has {len(meta['chat_template'])} characters "
                               f"(at most {MAX_CHAT_TEMPLATE_CHARS})")
    if not _json_depth_ok(meta, MAX_JSON_DEPTH - 1):  # meta sits one level inside the header
        raise ModelFormatError(f"metadata nests deeper than {MAX_JSON_DEPTH - 1} levels")
    tok = need("tokenizer_json", str, "a string (the whole tokenizer.json)")
    if len(tok) > MAX_TOKENIZER_CHARS:
        raise ModelFormatError(f"tokenizer_json has {len(tok)} characters (at most {MAX_TOKENIZER_CHARS})")


def _short(v, n: int = 80) -> str:
    """repr of a header value for an error message, cut to n characters (never huge)."""
    if isinstance(v, (dict, list)):
        return f"<{type(v).__name__} of {len(v)}>"
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 200:
        return f"<{v.bit_length()}-bit integer>"  # repr of a huge int is slow (and may be refused)
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def required_bytes(meta) -> int:
    """Bytes the tensors of a file with (validated) `meta` take, computed without listing them."""
    h, i, v, hd = meta["hidden_size"], meta["intermediate_size"], meta["vocab_size"], meta["head_dim"]
    q, kv = meta["num_attention_heads"] * hd, meta["num_key_value_heads"] * hd

    def i2(m, k):
        return m * pad_k(k) // 4

    per_layer = (3 * h + i) * 4 + i2(q, h) + 2 * i2(kv, h) + i2(h, q) + 2 * i2(i, h) + i2(h, i)
    total = meta["num_hidden_layers"] * per_layer + v * h * 2 + h * 4
    lm = meta["quant"]["lm_head"]
    if lm == "i8":
        total += v * h + v * 4
    elif not meta["tie_word_embeddings"]:
        total += v * h * 2
    return total


def expected_tensors(meta) -> dict:
    """name -> (dtype, logical shape) of every tensor a file with `meta` must hold."""
    h, i, v = meta["hidden_size"], meta["intermediate_size"], meta["vocab_size"]
    hd = meta["head_dim"]
    q, kv = meta["num_attention_heads"] * hd, meta["num_key_value_heads"] * hd
    out = {"model.embed_tokens.weight": ("f16", (v, h)), "model.norm.weight": ("f32", (h,))}
    ternary = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
               "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
               "mlp.down_proj": (h, i)}
    norms = {"input_layernorm": h, "post_attention_layernorm": h,
             "self_attn.attn_sub_norm": h, "mlp.ffn_sub_norm": i}
    for layer in range(meta["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for name, dim in norms.items():
            out[p + name + ".weight"] = ("f32", (dim,))
        for name in TERNARY_NAMES:
            out[p + name + ".weight"] = ("i2_b128", ternary[name])
    lm = meta["quant"]["lm_head"]
    if lm == "i8":
        out["lm_head.weight"] = ("i8", (v, h))
        out["lm_head.scale"] = ("f32", (v,))
    elif not meta["tie_word_embeddings"]:
        out["lm_head.weight"] = ("f16", (v, h))
    return out


def check_tokenizer(meta):
    """The `tokenizers.Tokenizer` of meta["tokenizer_json"], checked to fit the model
    (at most vocab_size tokens); ModelFormatError otherwise. Not run by a plain
    open (it costs ~0.1 s per MB of tokenizer), only by verify()."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(meta["tokenizer_json"])
    except Exception as e:  # tokenizers raises a bare Exception
        raise ModelFormatError(f"tokenizer_json cannot be loaded by `tokenizers`: {_short(str(e), 200)}") from None
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > meta["vocab_size"]:
        raise ModelFormatError(f"the tokenizer has {n} tokens but vocab_size is {meta['vocab_size']}")
    return tok


# --------------------------------------------------------------------------- reader

class ModelFile:
    """A memory-mapped, validated `.bin` model. Arrays are views of the mmap."""

    def __init__(self, path, fileobj, buffer, meta, tensors, header):
        self.path = path
        self._file = fileobj
        self.buffer = buffer
        self.meta = meta
        self.tensors = tensors
        self.header = header  # the whole parsed header (format fields included)

    @classmethod
    def open(cls, path, verify: bool = False) -> "ModelFile":
        """Open and validate `path`. With verify=True also check every tensor's crc32."""
        path = Path(path)
        if path.is_dir():
            raise ModelFormatError(f"{path} is a directory, not a bitdlm .bin file "
                                   "(a Hugging Face checkpoint needs `bitdlm convert` first)")
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise ModelFormatError(f"{path}: no such model file") from None
        except OSError as e:
            raise ModelFormatError(f"{path}: cannot open: {e.strerror or e}") from None
        mm = None
        try:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ModelFormatError(f"{path}: not a regular file")
            size = st.st_size
            head = f.read(16)
            if head[:len(MAGIC)] != MAGIC[:len(head)]:
                raise ModelFormatError(f"{path}: not a bitdlm model file "
                                       f"(bad magic {head[:8]!r}){_foreign_hint(head)}")
            if size < PREAMBLE_SIZE:
                raise ModelFormatError(f"{path}: file is truncated ({size} bytes)")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            header = _parse_header(mm, size, path)
            meta = header["meta"]
            tensors = _parse_tensors(header, size, path)
            self = cls(path, f, mm, meta, tensors, header)
            if verify:
                self.verify()
            return self
        except BaseException:
            if mm is not None:
                mm.close()
            f.close()
            raise

    def array(self, name: str) -> np.ndarray:
        """Read-only numpy view of a tensor's stored data (no copy).

        i2_b128 tensors are uint8 [M, pad_k(K)/4] (see packing.pack_i2)."""
        try:
            t = self.tensors[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None
        shape = t.storage_shape
        dt = DTYPES[t.dtype]
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self.buffer, dtype=dt, count=count, offset=t.offset).reshape(shape)

    def core_tensors(self) -> dict:
        """name -> (offset, dtype, shape, scale), the table `_core.Model` takes."""
        return {t.name: (t.offset, t.dtype, tuple(t.shape), t.scale) for t in self.tensors.values()}

    def verify(self) -> None:
        """Check the crc32 of every tensor's data (reads the whole file) and that
        the embedded tokenizer loads and fits the vocabulary."""
        for t in self.tensors.values():
            crc = zlib.crc32(memoryview(self.buffer)[t.offset:t.offset + t.nbytes])
            if t.crc32 is not None and crc != t.crc32:
                raise ModelFormatError(f"{self.path}: tensor {t.name!r} is corrupted (crc32 mismatch)")
        try:
            check_tokenizer(self.meta)
        except ModelFormatError as e:
            raise ModelFormatError(f"{self.path}: {e}") from None

    @property
    def file_size(self) -> int:
        return len(self.buffer)

    def close(self) -> None:
        if self.buffer is not None:
            try:
                self.buffer.close()
            except BufferError:
                pass  # numpy views still alive: the mapping goes away with the last one
            self.buffer = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"ModelFile({str(self.path)!r}, {len(self.tensors)} tensors)"


def _foreign_hint(head: bytes) -> str:
    if head[:4] == b"GGUF":
        return " (this is a GGUF file)"
    if head[8:9] == b"{":
        return " (this looks like a safetensors file: use `bitdlm convert` on its directory)"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return " (this looks like a PyTorch checkpoint)"
    return ""


def _json_depth_ok(obj, limit: int) -> bool:
    """True when `obj` nests at most `limit` containers deep (iterative: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            if d > limit:
                return False
            stack.extend((c, d + 1) for c in (o.values() if isinstance(o, dict) else o))
    return True


def _parse_header(mm, size: int, path) -> dict:
    magic, version, crc, hlen = _PREAMBLE.unpack_from(mm, 0)
    if version != VERSION:
        raise ModelFormatError(f"{path}: unsupported format version {version} "
                               f"(this bitdlm reads version {VERSION}; re-convert the model)")
    if hlen == 0 or hlen > MAX_HEADER_BYTES:
        raise ModelFormatError(f"{path}: absurd header length {hlen} (corrupted file)")
    if PREAMBLE_SIZE + hlen > size:
        raise ModelFormatError(f"{path}: file is truncated (header of {hlen} bytes, file has {size})")
    raw = mm[PREAMBLE_SIZE:PREAMBLE_SIZE + hlen]
    if zlib.crc32(raw) != crc:
        raise ModelFormatError(f"{path}: header is corrupted (crc32 mismatch)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 / JSON, integers past 4300 digits, deep nesting
        raise ModelFormatError(f"{path}: header is not valid UTF-8 JSON: {_short(str(e), 200)}") from None
    if not isinstance(header, dict) or header.get("format") != "bitdlm":
        raise ModelFormatError(f"{path}: header is not a bitdlm header")
    if header.get("version") != VERSION or not _is_int(header.get("version")):
        raise ModelFormatError(f"{path}: header version {_short(header.get('version'))} does not match "
                               f"the file's format version {VERSION}")
    if not _json_depth_ok(header, MAX_JSON_DEPTH):
        raise ModelFormatError(f"{path}: header JSON nests deeper than {MAX_JSON_DEPTH} levels")
    fsize = header.get("file_size")
    if fsize != size or not _is_int(fsize):
        if _is_int(fsize) and fsize > size:
            raise ModelFormatError(f"{path}: file is truncated ({size} of {fsize} bytes)")
        raise ModelFormatError(f"{path}: file size {size} does not match the header "
                               f"({_short(fsize)}): trailing garbage or corruption")
    try:
        validate_meta(header.get("meta"))
    except ModelFormatError as e:
        raise ModelFormatError(f"{path}: {e}") from None
    return header


def _parse_tensors(header: dict, size: int, path) -> dict:
    table = header.get("tensors")
    if not isinstance(table, list):
        raise ModelFormatError(f"{path}: header has no tensor table")
    data_offset = header.get("data_offset")
    if not _is_int(data_offset) or not PREAMBLE_SIZE <= data_offset <= size or data_offset % ALIGN:
        raise ModelFormatError(f"{path}: bad data_offset {_short(data_offset)}")
    meta = header["meta"]
    # The hyperparameters fix the tensor count and the bytes they take: both are
    # checked against the file before any per-tensor work is sized from them.
    need = required_bytes(meta)
    if need > size - data_offset:
        raise ModelFormatError(f"{path}: the hyperparameters call for {need} bytes of tensors but the "
                               f"file has {size - data_offset} after the header (truncated or corrupted)")
    n_expected = meta["num_hidden_layers"] * 11 + 2 + {"i8": 2, "f16": 0 if meta["tie_word_embeddings"] else 1}[
        meta["quant"]["lm_head"]]
    if len(table) > n_expected:
        raise ModelFormatError(f"{path}: unexpected tensors: the table has {len(table)} entries, the "
                               f"hyperparameters call for {n_expected}")
    tensors: dict[str, TensorInfo] = {}
    for e in table:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or len(e["name"]) > MAX_NAME_CHARS:
            raise ModelFormatError(f"{path}: malformed tensor table entry {_short(e)}")
        name = e["name"]
        if name in tensors:
            raise ModelFormatError(f"{path}: tensor {name!r} listed twice")
        dtype, shape, off, nb = e.get("dtype"), e.get("shape"), e.get("offset"), e.get("nbytes")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ModelFormatError(f"{path}: tensor {name!r} has unknown dtype {_short(dtype)}")
        if (not isinstance(shape, list) or not 1 <= len(shape) <= 2
                or not all(_is_int(s) and 0 < s <= 1 << 32 for s in shape)
                or (dtype == "i2_b128" and len(shape) != 2)):
            raise ModelFormatError(f"{path}: tensor {name!r} has a bad shape {_short(shape)}")
        if not _is_int(off) or not _is_int(nb):
            raise ModelFormatError(f"{path}: tensor {name!r} has a bad offset/nbytes")
        if off % ALIGN or off < data_offset:
            raise ModelFormatError(f"{path}: tensor {name!r} offset {_short(off)} is not a 64-byte aligned "
                                   f"offset in the data section")
        if nb != storage_nbytes(dtype, shape):
            raise ModelFormatError(f"{path}: tensor {name!r} nbytes {_short(nb)} does not match "
                                   f"{dtype} {shape}")
        if off + nb > size:
            raise ModelFormatError(f"{path}: tensor {name!r} [{off}, {off + nb}) lies beyond "
                                   f"the end of the file ({size} bytes): truncated")
        scale = e.get("scale")
        if dtype == "i2_b128":
            v = _num(scale)
            if v is None or not 1e-30 <= v <= 1e30:  # finite and positive in float32
                raise ModelFormatError(f"{path}: ternary tensor {name!r} has a bad scale {_short(scale)}")
            scale = float(np.float32(v))
        else:
            scale = None
        crc = e.get("crc32")
        if crc is not None and (not _is_int(crc) or not 0 <= crc < 1 << 32):
            raise ModelFormatError(f"{path}: tensor {name!r} has a bad crc32")
        tensors[name] = TensorInfo(name, dtype, tuple(shape), off, nb, scale, crc)
    # no two tensors overlap
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (a0, a1, an), (b0, _b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise ModelFormatError(f"{path}: tensors {an!r} and {bn!r} overlap")
    # exactly the tensors the hyperparameters call for
    expected = expected_tensors(meta)
    for name, (dtype, shape) in expected.items():
        t = tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{path}: tensor {name!r} is missing")
        if t.dtype != dtype or t.shape != tuple(shape):
            raise ModelFormatError(f"{path}: tensor {name!r} is {t.dtype} {list(t.shape)}, "
                                   f"expected {dtype} {list(shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ModelFormatError(f"{path}: unexpected tensors {extra[:5]}")
    return tensors


# --------------------------------------------------------------------------- writer

# Temporary files are named `.OUT.bitdlm-tmp-<pid>[-n]` next to OUT: recognisably
# ours, and the pid tells a later run whether the writer that made one is dead.
TMP_TAG = ".bitdlm-tmp-"
_TMP_RE = re.compile(r"\..+" + re.escape(TMP_TAG) + r"(\d+)(?:-\d+)?")


# Temporary files of writers not finished: removed at interpreter exit too, for
# an interrupt that lands between their creation and the writer's `with` block.
_LIVE_TEMPS: set = set()


@atexit.register
def _remove_live_temps() -> None:
    for p in list(_LIVE_TEMPS):
        try:
            p.unlink()
        except OSError:
            pass


def temp_path(path, n: int = 0) -> Path:
    path = Path(path)
    return path.parent / f".{path.name}{TMP_TAG}{os.getpid()}{f'-{n}' if n else ''}"


def _create_temp(path: Path):
    for n in range(1000):  # a second writer to the same OUT in this process takes the next name
        tmp = temp_path(path, n)
        try:  # 0o666 minus the umask: the usual permissions of a new file
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: too many temporary files of this process")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's live process (or a pid we cannot ask about): keep its file
    return True


def remove_stale_temp_files(directory) -> list:
    """Delete our temporary files in `directory` whose writer process is gone
    (killed with SIGKILL, or the machine went down); returns their paths."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _TMP_RE.fullmatch(name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        p = Path(directory) / name
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


class ModelWriter:
    """Stream tensors into a new `.bin`, atomically.

    The tensor list (names, dtypes, logical shapes) is fixed up front so every
    offset is known; data may be written in any order, each tensor in one or
    more chunks. `commit()` writes the header, fsyncs and renames the temporary
    file (`.OUT.bitdlm-tmp-<pid>`, in OUT's directory) onto `path`; leaving the
    `with` block with an exception (KeyboardInterrupt and SystemExit included) or
    calling `abort()` deletes it, so a failed write leaves no output. Temporary
    files of dead writers found in the directory are deleted on start.

        with ModelWriter(out, meta, expected_tensors(meta)) as w:
            w.write(name, array, scale=...)
            ...
            w.commit()
    """

    def __init__(self, path, meta: dict, specs: dict, overwrite: bool = False):
        self.path = Path(path)
        validate_meta(meta)
        if self.path.is_dir():
            raise FileExistsError(f"{self.path} is a directory")
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} already exists")
        try:
            self.meta = json.loads(json.dumps(meta))  # a frozen copy: the header size is reserved now
        except (ValueError, TypeError) as e:
            raise ModelFormatError(f"metadata is not JSON: {_short(str(e), 200)}") from None
        self._entries = {}
        for name, (dtype, shape) in specs.items():
            if dtype not in DTYPES:
                raise ValueError(f"unknown dtype {dtype!r} for {name}")
            self._entries[name] = {"name": name, "dtype": dtype, "shape": [int(s) for s in shape],
                                   "offset": 0, "nbytes": storage_nbytes(dtype, shape),
                                   **({"scale": 0.0} if dtype == "i2_b128" else {}), "crc32": 0}
        # Reserve room for the final header: digits of offsets, scales and crcs
        # are unknown yet; the JSON is right-padded with spaces to this length.
        try:
            draft = self._header_json(0, 0)
        except (ValueError, TypeError) as e:  # NaN, a lone surrogate, a non-JSON object
            raise ModelFormatError(f"metadata is not strict JSON in UTF-8: {_short(str(e), 200)}") from None
        self._hlen = len(draft) + 64 * len(self._entries) + 256
        if self._hlen > MAX_HEADER_BYTES:  # readers would refuse the file
            raise ModelFormatError(f"the header would take {self._hlen} bytes (at most {MAX_HEADER_BYTES}): "
                                   f"tokenizer or chat template too large")
        data_offset = _align(PREAMBLE_SIZE + self._hlen)
        off = data_offset
        for e in self._entries.values():
            e["offset"] = off
            off = _align(off + e["nbytes"])
        self._data_offset = data_offset
        # the file ends right after the last tensor (no trailing padding)
        last = max(self._entries.values(), key=lambda e: e["offset"], default=None)
        self._file_size = last["offset"] + last["nbytes"] if last else data_offset
        self._written = set()
        remove_stale_temp_files(self.path.parent)
        self._done = True  # until the temporary file exists: abort() has nothing to do
        self._f = None
        fd, self._tmp = _create_temp(self.path)
        _LIVE_TEMPS.add(self._tmp)
        self._done = False
        try:
            self._f = os.fdopen(fd, "w+b")
            self._f.truncate(self._file_size)
        except BaseException:  # KeyboardInterrupt included: the `with` block is not entered yet
            if self._f is None:
                os.close(fd)
            self.abort()
            raise

    def _header_json(self, data_offset: int, file_size: int) -> bytes:
        header = {"format": "bitdlm", "version": VERSION, "data_offset": data_offset,
                  "file_size": file_size, "tensors": list(self._entries.values()), "meta": self.meta}
        return json.dumps(header, ensure_ascii=False, allow_nan=False).encode("utf-8")

    def write(self, name: str, data, scale: float | None = None) -> None:
        """Write tensor `name`: a numpy array or an iterable of chunks (row blocks)."""
        e = self._entries.get(name)
        if e is None:
            raise KeyError(f"tensor {name!r} is not in the file's tensor list")
        if name in self._written:
            raise ValueError(f"tensor {name!r} written twice")
        want = DTYPES[e["dtype"]]
        chunks = [data] if isinstance(data, np.ndarray) else data
        self._f.seek(e["offset"])
        crc, n = 0, 0
        for c in chunks:
            c = np.asarray(c)
            if c.dtype != want:
                raise TypeError(f"tensor {name!r}: got {c.dtype}, expected {want} for {e['dtype']}")
            b = np.ascontiguousarray(c).view(np.uint8).reshape(-1)
            n += b.size
            if n > e["nbytes"]:
                break
            crc = zlib.crc32(b, crc)
            self._f.write(b)
        if n != e["nbytes"]:
            raise ValueError(f"tensor {name!r}: wrote {n} bytes, expected {e['nbytes']} "
                             f"({e['dtype']} {e['shape']})")
        if e["dtype"] == "i2_b128":
            if scale is None or not math.isfinite(scale) or scale <= 0:
                raise ValueError(f"ternary tensor {name!r} needs a finite positive scale, got {scale}")
            e["scale"] = float(np.float32(scale))
        elif scale is not None:
            raise ValueError(f"tensor {name!r} ({e['dtype']}) takes no scale")
        e["crc32"] = crc
        self._written.add(name)

    def commit(self) -> Path:
        missing = [n for n in self._entries if n not in self._written]
        if missing:
            raise ValueError(f"tensors not written: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        hdr = self._header_json(self._data_offset, self._file_size)
        if len(hdr) > self._hlen:  # cannot happen with the reservation above
            raise AssertionError("header reservation too small")
        hdr = hdr + b" " * (self._hlen - len(hdr))
        self._f.seek(0)
        self._f.write(_PREAMBLE.pack(MAGIC, VERSION, zlib.crc32(hdr), self._hlen))
        self._f.write(hdr)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        _LIVE_TEMPS.discard(self._tmp)
        try:  # make the rename itself durable
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
        self._done = True
        return self.path

    def abort(self) -> None:
        if not self._done:
            self._done = True
            try:
                if self._f is not None:
                    self._f.close()
            finally:
                self._tmp.unlink(missing_ok=True)
                _LIVE_TEMPS.discard(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None or not self._done:
            self.abort()


# --------------------------------------------------------------------------- CLI

def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def describe(mf: ModelFile, show_tensors: bool = True) -> str:
    """Human-readable summary: metadata (without the tokenizer) and tensor sizes."""
    meta = dict(mf.meta)
    tok = meta.pop("tokenizer_json", "")
    tmpl = meta.pop("chat_template", None)
    lines = [f"{mf.path}: bitdlm format v{mf.header['version']}, {_fmt_bytes(mf.file_size)}"]
    for k, v in meta.items():
        lines.append(f"  {k}: {json.dumps(v)}")
    lines.append(f"  tokenizer_json: <{len(tok)} chars>")
    if tmpl is None:
        lines.append("  chat_template: null")
    else:
        first = tmpl.strip().splitlines()[0] if tmpl.strip() else ""
        lines.append(f"  chat_template: <{len(tmpl)} chars> {first[:60]!r}")
    by_dtype: dict[str, list] = {}
    for t in mf.tensors.values():
        by_dtype.setdefault(t.dtype, []).append(t)
    lines.append(f"tensors: {len(mf.tensors)}")
    for dt, ts in sorted(by_dtype.items()):
        n = sum(int(np.prod(t.shape)) for t in ts)
        lines.append(f"  {dt:8s} {len(ts):5d} tensors {n:>14,d} values {_fmt_bytes(sum(t.nbytes for t in ts)):>10s}")
    if show_tensors:
        for t in mf.tensors.values():
            sc = f"  scale={t.scale:.6g}" if t.scale is not None else ""
            lines.append(f"  {t.name:52s} {t.dtype:8s} {str(list(t.shape)):16s} "
                         f"{_fmt_bytes(t.nbytes):>10s} @{t.offset}{sc}")
    return "\n".join(lines)


def _cmd_info(args) -> int:
    try:
        with ModelFile.open(args.model, verify=args.verify) as mf:
            print(describe(mf, show_tensors=not args.summary))
            if args.verify:
                print("checksums: OK")
    except ModelFormatError as e:
        print(f"bitdlm info: error: {e}", file=sys.stderr)
        return 2
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("info", help="print a .bin model's metadata and tensor sizes")
    p.add_argument("model", help="path to a bitdlm .bin file")
    p.add_argument("--verify", action="store_true", help="also check every tensor's crc32")
    p.add_argument("--summary", action="store_true", help="totals per dtype only, no tensor list")
    p.set_defaults(func=_cmd_info)
