"""Write a `.bin` model atomically: `ModelWriter` streams tensors into a
temporary file beside the output and renames it into place on commit; the
temporary files of dead writers are swept."""
from __future__ import annotations

import atexit
import json
import math
import os
import re
import zlib
from pathlib import Path

import numpy as np

from .spec import (DTYPES, MAGIC, MAX_HEADER_BYTES, PREAMBLE, PREAMBLE_SIZE, VERSION, ModelFormatError,
                   align_up, short_repr, storage_nbytes, validate_meta)


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
        self._overwrite = overwrite
        try:
            self.meta = json.loads(json.dumps(meta))  # a frozen copy: the header size is reserved now
        except (ValueError, TypeError) as e:
            raise ModelFormatError(f"metadata is not JSON: {short_repr(str(e), 200)}") from None
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
            raise ModelFormatError(f"metadata is not strict JSON in UTF-8: {short_repr(str(e), 200)}") from None
        self._hlen = len(draft) + 64 * len(self._entries) + 256
        if self._hlen > MAX_HEADER_BYTES:  # readers would refuse the file
            raise ModelFormatError(f"the header would take {self._hlen} bytes (at most {MAX_HEADER_BYTES}): "
                                   f"tokenizer or chat template too large")
        data_offset = align_up(PREAMBLE_SIZE + self._hlen)
        off = data_offset
        for e in self._entries.values():
            e["offset"] = off
            off = align_up(off + e["nbytes"])
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
        self._f.write(PREAMBLE.pack(MAGIC, VERSION, zlib.crc32(hdr), self._hlen))
        self._f.write(hdr)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._publish()
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

    def _publish(self) -> None:
        """Rename the temporary file onto `path`. Without `overwrite`, never over
        a file that appeared meanwhile (two converts to one new output both
        exited 0 and the later silently won): link(2) fails if `path` exists."""
        if self._overwrite:
            if self.path.exists() and not self.path.is_file():
                raise FileExistsError(f"{self.path} is not a regular file: not replaced")
            os.replace(self._tmp, self.path)
            return
        try:
            os.link(self._tmp, self.path)
        except FileExistsError:
            raise FileExistsError(f"{self.path} was created by someone else while this file was "
                                  "written (another convert to the same output?); not overwritten "
                                  "(use --force to overwrite)") from None
        except OSError:  # a file system without hard links: best effort
            if self.path.exists():
                raise FileExistsError(f"{self.path} already exists") from None
            os.replace(self._tmp, self.path)
            return
        self._tmp.unlink()

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
