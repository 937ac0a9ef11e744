"""Builds of bitdlm._core loaded side by side in one process, for the A/B scripts
(bench/attn_ab.py, gemm_ab.py, forward_ab.py).

Each extension file is loaded from a private copy (modules ab0._core, ab1._core, ...):
one file loaded twice, say the same build named twice or the build the tree's bitdlm
package already imported, would register its pybind11 types twice and fail.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile


def load_builds(paths, threads: int | None = None, isa: str = "") -> list:
    """The _core modules of `paths`, in order; each with `threads` OpenMP threads and the
    kernel table `isa` when given."""
    tmp = tempfile.mkdtemp(prefix="bitdlm_ab_")
    mods = []
    try:
        for i, so in enumerate(paths):
            copy = os.path.join(tmp, f"core{i}.so")
            shutil.copy(so, copy)
            spec = importlib.util.spec_from_file_location(f"ab{i}._core", copy)
            m = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(m)
            if threads is not None:
                m.set_num_threads(threads)
            if isa:
                m.set_isa(isa)
            mods.append(m)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # (loaded extensions stay mapped: unlinking is safe on Linux)
    return mods
