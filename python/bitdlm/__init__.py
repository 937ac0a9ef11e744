"""bitdlm: CPU inference for ternary (BitNet b1.58) block-diffusion LMs."""
from __future__ import annotations

from ._cpu import bound_openmp_spin

__version__ = "0.1.0"

bound_openmp_spin()  # before anything loads the OpenMP runtime (bitdlm._core)

__all__ = ["load", "LLM", "SamplingParams", "__version__"]


def __getattr__(name):  # lazy: `import bitdlm` stays cheap (the CLI starts fast)
    if name == "load":
        from .model import load

        return load
    if name == "LLM":
        from .llm import LLM

        return LLM
    if name == "SamplingParams":
        from .sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'bitdlm' has no attribute {name!r}")
