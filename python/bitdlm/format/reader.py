"""Open a `.bin` model: memory-map it and validate preamble, header, metadata
and tensor table against the spec before any array is handed out."""
from __future__ import annotations

import json
import mmap
import os
import stat
import zlib
from pathlib import Path

import numpy as np

from .spec import (ALIGN, DTYPES, MAGIC, MAX_HEADER_BYTES, MAX_JSON_DEPTH, MAX_NAME_CHARS, PREAMBLE,
                   PREAMBLE_SIZE, VERSION, ModelFormatError, TensorInfo, check_tokenizer, expected_tensors,
                   finite_float, is_int, json_depth_ok, required_bytes, short_repr, storage_nbytes,
                   validate_meta, vocab_tensors)


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
            # O_NONBLOCK: open(2) of a FIFO waits for a writer (`info`, `load` and
            # `serve` hung forever on one); the type is checked right after
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise ModelFormatError(f"{path}: no such model file") from None
        except OSError as e:
            raise ModelFormatError(f"{path}: cannot open: {e.strerror or e}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                    or stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "special")
            raise ModelFormatError(f"{path}: not a regular file ({kind}): a model must be a .bin file")
        f = os.fdopen(fd, "rb")
        mm = None
        try:
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
        """Check the crc32 of every tensor's data (reads the whole file), that no
        float tensor holds NaN / Inf, and that the embedded tokenizer loads and
        fits the vocabulary."""
        for t in self.tensors.values():
            crc = zlib.crc32(memoryview(self.buffer)[t.offset:t.offset + t.nbytes])
            if t.crc32 is not None and crc != t.crc32:
                raise ModelFormatError(f"{self.path}: tensor {t.name!r} is corrupted (crc32 mismatch)")
            if t.dtype in ("f16", "f32") and not _all_finite(self.array(t.name)):
                # a NaN norm or an Inf embedding row gave empty answers that "stop"
                raise ModelFormatError(f"{self.path}: tensor {t.name!r} holds NaN or Inf values")
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


def _all_finite(a: np.ndarray) -> bool:
    """No NaN / Inf in a float array: its exponent bits are not all ones (an
    integer test, 2-3x faster than np.isfinite on f16); row blocks bound the
    temporary memory."""
    bits, mask = (a.view(np.uint16), 0x7C00) if a.dtype.itemsize == 2 else (a.view(np.uint32), 0x7F800000)
    flat = bits.reshape(-1)
    step = 1 << 22
    return all(not ((flat[i:i + step] & mask) == mask).any() for i in range(0, flat.size, step))


def _foreign_hint(head: bytes) -> str:
    if head[:4] == b"GGUF":
        return " (this is a GGUF file: convert it with `bitdlm convert FILE.gguf OUT.bin`)"
    if head[:8] == b"SGLBITNT":
        return (" (this is an SGLBITNT file of the old sgl-kernel engine: convert it with "
                "`bitdlm convert OLD.bin NEW.bin [--tokenizer DIR]`)")
    if head[8:9] == b"{":
        return " (this looks like a safetensors file: use `bitdlm convert` on its directory)"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return " (this looks like a PyTorch checkpoint)"
    return ""



def _parse_header(mm, size: int, path) -> dict:
    magic, version, crc, hlen = PREAMBLE.unpack_from(mm, 0)
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
        raise ModelFormatError(f"{path}: header is not valid UTF-8 JSON: {short_repr(str(e), 200)}") from None
    if not isinstance(header, dict) or header.get("format") != "bitdlm":
        raise ModelFormatError(f"{path}: header is not a bitdlm header")
    if header.get("version") != VERSION or not is_int(header.get("version")):
        raise ModelFormatError(f"{path}: header version {short_repr(header.get('version'))} does not match "
                               f"the file's format version {VERSION}")
    if not json_depth_ok(header, MAX_JSON_DEPTH):
        raise ModelFormatError(f"{path}: header JSON nests deeper than {MAX_JSON_DEPTH} levels")
    fsize = header.get("file_size")
    if fsize != size or not is_int(fsize):
        if is_int(fsize) and fsize > size:
            raise ModelFormatError(f"{path}: file is truncated ({size} of {fsize} bytes)")
        raise ModelFormatError(f"{path}: file size {size} does not match the header "
                               f"({short_repr(fsize)}): trailing garbage or corruption")
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
    if not is_int(data_offset) or not PREAMBLE_SIZE <= data_offset <= size or data_offset % ALIGN:
        raise ModelFormatError(f"{path}: bad data_offset {short_repr(data_offset)}")
    meta = header["meta"]
    # The hyperparameters fix the tensor count and the bytes they take: both are
    # checked against the file before any per-tensor work is sized from them.
    need = required_bytes(meta)
    if need > size - data_offset:
        raise ModelFormatError(f"{path}: the hyperparameters call for {need} bytes of tensors but the "
                               f"file has {size - data_offset} after the header (truncated or corrupted)")
    n_expected = meta["num_hidden_layers"] * 11 + 1 + len(vocab_tensors(meta))
    if len(table) > n_expected:
        raise ModelFormatError(f"{path}: unexpected tensors: the table has {len(table)} entries, the "
                               f"hyperparameters call for {n_expected}")
    tensors: dict[str, TensorInfo] = {}
    for e in table:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or len(e["name"]) > MAX_NAME_CHARS:
            raise ModelFormatError(f"{path}: malformed tensor table entry {short_repr(e)}")
        name = e["name"]
        if name in tensors:
            raise ModelFormatError(f"{path}: tensor {name!r} listed twice")
        dtype, shape, off, nb = e.get("dtype"), e.get("shape"), e.get("offset"), e.get("nbytes")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ModelFormatError(f"{path}: tensor {name!r} has unknown dtype {short_repr(dtype)}")
        if (not isinstance(shape, list) or not 1 <= len(shape) <= 2
                or not all(is_int(s) and 0 < s <= 1 << 32 for s in shape)
                or (dtype == "i2_b128" and len(shape) != 2)):
            raise ModelFormatError(f"{path}: tensor {name!r} has a bad shape {short_repr(shape)}")
        if not is_int(off) or not is_int(nb):
            raise ModelFormatError(f"{path}: tensor {name!r} has a bad offset/nbytes")
        if off % ALIGN or off < data_offset:
            raise ModelFormatError(f"{path}: tensor {name!r} offset {short_repr(off)} is not a 64-byte aligned "
                                   f"offset in the data section")
        if nb != storage_nbytes(dtype, shape):
            raise ModelFormatError(f"{path}: tensor {name!r} nbytes {short_repr(nb)} does not match "
                                   f"{dtype} {shape}")
        if off + nb > size:
            raise ModelFormatError(f"{path}: tensor {name!r} [{off}, {off + nb}) lies beyond "
                                   f"the end of the file ({size} bytes): truncated")
        scale = e.get("scale")
        if dtype == "i2_b128":
            v = finite_float(scale)
            if v is None or not 1e-30 <= v <= 1e30:  # finite and positive in float32
                raise ModelFormatError(f"{path}: ternary tensor {name!r} has a bad scale {short_repr(scale)}")
            scale = float(np.float32(v))
        else:
            scale = None
        crc = e.get("crc32")
        if crc is not None and (not is_int(crc) or not 0 <= crc < 1 << 32):
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
