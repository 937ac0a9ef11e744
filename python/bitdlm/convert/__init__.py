"""`bitdlm convert`: a checkpoint -> one bitdlm `.bin` (docs/format.md).

One module per job:
    common      the error type, JSON config reading, output checks, signal unwinding
    checkpoint  safetensors reading (sharded, bf16 without torch)
    config      hyperparameters, special tokens, chat template, diffusion defaults
    tensors     ternary codes + scales, f16 / int8 embedding and lm_head, prechecks
    hf          the Hugging Face checkpoint converter (`convert`, `convert_report`)
    cli         the command's flags, errors and summary
"""
from .checkpoint import Checkpoint
from .cli import add_arguments, format_summary, register_cli, run_cli
from .common import ConversionError, Terminated
from .config import (DEFAULT_BLOCK_SIZE, DEFAULT_SMALL_BLOCK_SIZE, DEFAULT_THRESHOLD, KNOWN_MASK_TOKENS,
                     archs_of, hyperparameters)
from .hf import convert, convert_report
from .tensors import quantize_lm_head_i8, ternary_tensor, unpack_hf_packed

__all__ = [
    "Checkpoint", "add_arguments", "format_summary", "register_cli", "run_cli", "ConversionError",
    "Terminated", "DEFAULT_BLOCK_SIZE", "DEFAULT_SMALL_BLOCK_SIZE", "DEFAULT_THRESHOLD", "KNOWN_MASK_TOKENS",
    "archs_of", "hyperparameters", "convert", "convert_report", "quantize_lm_head_i8", "ternary_tensor",
    "unpack_hf_packed",
]
