"""Data shipped inside the bitdlm package: the default model.

`tiny-bitdlm.bin` is a ~4M-parameter ternary block-diffusion LM trained by
scripts/train_tiny_dlm.py on CPython's bundled documentation (docs/tiny_model.md).
It lets `bitdlm generate` / `bitdlm serve` work offline without --model.
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_NAME = "tiny-bitdlm.bin"


def default_model_path() -> Path:
    """Path of the default model shipped with the package.

    Raises FileNotFoundError (with a hint) when the file is missing, e.g. in a
    source checkout where it was never built or a wheel built without it."""
    path = Path(__file__).resolve().parent / DEFAULT_MODEL_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"the default model {path} is missing; pass --model PATH or rebuild it with "
            "scripts/train_tiny_dlm.py --bin python/bitdlm/data/tiny-bitdlm.bin"
        )
    return path
