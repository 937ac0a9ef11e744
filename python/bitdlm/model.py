"""`bitdlm.load(path)` -> Model: the mmapped .bin plus the C++ forward (no torch here).

The weights stay in the page cache through the mmap (loading reads only the
header); `_core.Model` keeps a view of the buffer, so the mapping lives as long
as the model does. See docs/architecture.md for the forward contract.
"""
from __future__ import annotations

import os
import numpy as np

from . import _core
from ._cpu import check_threads, default_threads  # default_threads re-exported: bitdlm.model
from .format import ModelFile, embedding_dtype

# A parallel region's wall time in four parts (kernels/team_clock.h, _core.team_profile): the
# columns `bitdlm generate --profile`, serve's /metrics and bench/forward.py show.
REGION_PARTS = ("wall", "fork", "work", "imbalance", "join")

# KV caches hold f16 by default: they halve the bytes attention reads per token
# (bench/forward.py measures both); "f32" is exact against an fp32 reference.
DEFAULT_KV_DTYPE = "f16"


def default_kv_budget_bytes() -> int:
    """A quarter of the physical memory."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return int(total // 4)


def default_model_path():
    """$BITDLM_MODEL, else the model shipped in the package (bitdlm/data), else None."""
    from .data import chosen_model_path

    return chosen_model_path()


class Model:
    """A loaded model: `.meta`, `.tokenizer`, `.forward`, `.alloc_seq/.free_seq`, `.logits`."""

    def __init__(self, file: ModelFile, threads: int | None = None, kv_budget_bytes: int | None = None,
                 kv_dtype: str | None = None):
        self.file = file
        self.meta = file.meta
        self.path = str(file.path)
        self.threads = check_threads(threads) if threads is not None else default_threads()
        budget = default_kv_budget_bytes() if kv_budget_bytes is None else int(kv_budget_bytes)
        tensors = {t.name: (t.offset, t.dtype, list(t.shape), t.scale) for t in file.tensors.values()}
        self._core = _core.Model(file.buffer, self.meta, tensors, budget, kv_dtype or DEFAULT_KV_DTYPE)
        # applied by the binding on whichever thread calls forward (OpenMP's
        # thread count is per thread: an engine thread would not see a setting
        # made here)
        self._core.threads = self.threads
        self.vocab_size = int(self.meta["vocab_size"])
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The tokenizer stored in the file (built on first use), or None."""
        from .tokenizer import model_tokenizer

        return model_tokenizer(self)

    @property
    def kv_dtype(self) -> str:
        return self._core.kv_dtype

    def forward(self, items, block_size: int, mode: str = "logits", temperature=None, top_p=None,
                uniforms=None, banned=None):
        """One forward for all items; see docs/architecture.md (`_core.Model.forward`)."""
        return self._core.forward(items, block_size, mode, temperature, top_p, uniforms, banned)

    def alloc_seq(self, capacity: int) -> int:
        return self._core.alloc_seq(capacity)

    def free_seq(self, seq_id: int) -> None:
        self._core.free_seq(seq_id)

    def set_profile(self, on: bool = True) -> None:
        """Time every forward phase (also on with BITDLM_PROFILE=1 at load)."""
        self._core.set_profile(on)

    @property
    def profiling(self) -> bool:
        return bool(self._core.profiling)

    def profile(self, reset: bool = False) -> dict:
        """Seconds spent per forward phase since the last reset (norm, quant,
        gemm_qkv, attention, gemm_gate_up, lm_head, ...), plus 'calls'; as of
        the last finished forward (never waits for a running one)."""
        phases, calls = self._core.profile()
        if reset:
            self._core.reset_profile()
        return {**phases, "calls": calls}

    @property
    def forward_threads(self) -> int:
        """OpenMP threads the last forward ran with, as seen on its calling thread (0: none yet)."""
        return int(self._core.forward_threads)

    def kv_bytes_used(self) -> int:
        return self._core.kv_bytes_used()

    def kv_bytes_per_token(self) -> int:
        return self._core.kv_bytes_per_token()

    def logits(self, token_ids) -> np.ndarray:
        """Causal forward of one fresh sequence -> float32 [len, vocab]."""
        toks = np.asarray(token_ids)
        if toks.ndim != 1 or toks.size == 0:
            raise ValueError("token_ids must be a non-empty 1-D sequence of token ids")
        n = int(toks.size)
        sid = self.alloc_seq(n)
        try:
            return self._core.forward([(sid, toks, 0, 0, True, np.arange(n, dtype=np.int32))], 1, "logits")
        finally:
            self.free_seq(sid)

    def close(self) -> None:
        self._core = None
        self.file.close()

    def __repr__(self):
        m = self.meta
        return (f"Model({self.path!r}, layers={m['num_hidden_layers']}, hidden={m['hidden_size']}, "
                f"vocab={m['vocab_size']}, lm_head={m['quant']['lm_head']}, "
                f"embedding={embedding_dtype(m)}, threads={self.threads})")


def load(path, threads: int | None = None, kv_budget_gb: float | None = None, kv_dtype: str | None = None,
         verify: bool = False) -> Model:
    """Open a .bin model (mmap, header only) -> Model.

    threads: OpenMP threads of every forward, on whichever thread runs it (default:
    OMP_NUM_THREADS, else the physical cores available); kv_budget_gb: KV cache memory budget (default: a quarter of the RAM),
    past which alloc_seq raises MemoryError; kv_dtype: "f16" (default) or "f32";
    verify: check every tensor's crc32 and that float tensors are finite (reads
    the whole file: ~1 s per GB here; `LLM()` and `serve` do it by default)."""
    if kv_budget_gb is not None and not kv_budget_gb >= 0:
        raise ValueError(f"kv_budget_gb must be >= 0, got {kv_budget_gb}")
    f = ModelFile.open(path, verify=verify)
    try:
        budget = None if kv_budget_gb is None else int(kv_budget_gb * (1 << 30))
        return Model(f, threads=threads, kv_budget_bytes=budget, kv_dtype=kv_dtype)
    except BaseException:
        f.close()
        raise
