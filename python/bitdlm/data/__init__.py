"""Data shipped inside the bitdlm package: the default model.

`tiny-bitdlm.bin` is a small ternary block-diffusion code model trained by
scripts/train_gpu.sh (scripts/train_dlm_gpu.py on one H100) on CPython's
standard library and the permissively licensed packages the project installs
(docs/tiny_model.md).
It lets `bitdlm generate` / `bitdlm serve` work offline without --model.
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "tiny-bitdlm.bin"


def default_model_path() -> str | None:
    """Path (str) of the default model shipped in the package, or None when it
    is missing (a source checkout where it was never built, or a wheel built
    without it). Rebuild it with scripts/train_gpu.sh (docs/tiny_model.md)."""
    path = Path(__file__).resolve().parent / DEFAULT_MODEL_NAME
    return str(path) if path.is_file() else None


def chosen_model_path() -> str | None:
    """$BITDLM_MODEL, else the model shipped in the package, else None: the model a
    command uses when given none (a leaf module, so format/ and model.py both use it)."""
    return os.environ.get("BITDLM_MODEL") or default_model_path()
