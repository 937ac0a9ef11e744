"""The bitdlm `.bin` model file (docs/format.md is the specification).

One module per job:
    spec    constants, limits, the tensor table a model's hyperparameters call
            for, metadata checks, and the value helpers shared with the converter
    reader  `ModelFile`: memory-mapped, validated reader
    writer  `ModelWriter`: atomic streaming writer (temporary file + rename)
    info    the `bitdlm info` command

This package must stay importable without torch (runtime path).
"""
from .info import describe, register_cli
from .reader import ModelFile
from .spec import (ALIGN, DTYPES, LIMITS, MAGIC, MAX_BLOCK_SIZE, MAX_CHAT_TEMPLATE_CHARS, MAX_EOS_TOKENS,
                   MAX_HEADER_BYTES, MAX_JSON_DEPTH, MAX_NAME_CHARS, MAX_PROJ_DIM, MAX_TOKENIZER_CHARS,
                   PREAMBLE_SIZE, TERNARY_NAMES, VERSION, ModelFormatError, TensorInfo, check_tokenizer,
                   embedding_dtype, embedding_table, expected_tensors, finite_float, is_int, required_bytes,
                   short_repr, storage_nbytes, storage_shape, validate_meta, vocab_tensors)
from .writer import TMP_TAG, ModelWriter, remove_stale_temp_files, temp_path

__all__ = [
    "ALIGN", "DTYPES", "LIMITS", "MAGIC", "MAX_BLOCK_SIZE", "MAX_CHAT_TEMPLATE_CHARS", "MAX_EOS_TOKENS",
    "MAX_HEADER_BYTES", "MAX_JSON_DEPTH", "MAX_NAME_CHARS", "MAX_PROJ_DIM", "MAX_TOKENIZER_CHARS",
    "PREAMBLE_SIZE", "TERNARY_NAMES", "VERSION", "ModelFormatError", "TensorInfo", "check_tokenizer",
    "embedding_dtype", "embedding_table", "expected_tensors", "finite_float", "is_int", "required_bytes",
    "short_repr", "storage_nbytes", "storage_shape", "validate_meta", "vocab_tensors", "describe",
    "register_cli", "ModelFile", "TMP_TAG", "ModelWriter", "remove_stale_temp_files", "temp_path",
]
