"""Convert a Hugging Face BitNet checkpoint folder into one bitdlm `.bin`.

Reads config.json, model.safetensors (or shards + model.safetensors.index.json),
tokenizer.json, tokenizer_config.json (+ chat_template.jinja),
generation_config.json. Ternary weights come either as master weights
(bf16/fp16/fp32, quantized here with the BitNet absmean rule) or packed
(uint8 + weight_scale, `quantization_config.linear_class` autobitlinear or
bitlinear). Tensors are streamed one at a time (pread) from the safetensors files;
no torch needed.

Every input is type- and range-checked (the format's LIMITS) and every needed
tensor located before the output exists; errors are ConversionError, which the
CLI prints as one line with exit status 2. `convert_report` returns the summary
the CLI prints (tokens chosen and why, chat template, guesses, drops, measured
precision loss). The output is written through format.ModelWriter's temporary
file, which SIGTERM / SIGHUP / Ctrl-C do not leave behind (docs/format.md).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from ..format import ModelFormatError, ModelWriter, expected_tensors, is_int, validate_meta
from .checkpoint import Checkpoint
from .common import ConversionError, check_output, read_json, signals_unwind, token_report
from .config import (archs_of, chat_template, diffusion_settings, hyperparameters, linear_class_of,
                     load_tokenizer, special_tokens)
from .tensors import precheck, scale_name, write_tensors

_FROM_CONFIG = object()


def convert(hf_dir, out_path, **kwargs) -> Path:
    """Convert a Hugging Face BitNet checkpoint directory into `out_path`; returns
    the path. Keyword arguments as convert_report(), whose summary this drops."""
    return Path(convert_report(hf_dir, out_path, **kwargs)["output"])


def convert_report(hf_dir, out_path, *, lm_head="f16", embedding="f16", force=False, **settings) -> dict:
    """Convert a Hugging Face BitNet checkpoint directory into `out_path`.

    Returns the summary `bitdlm convert` prints: the tokens chosen and where from,
    the chat template, the diffusion settings, what was guessed or dropped, and
    the precision the f16 / i8 storage lost (measured). `lm_head` / `embedding`:
    "f16" or "i8", the storage of each (format/spec.py vocab_tensors). Raises ConversionError
    (a ValueError) with a user-facing message; on any failure (SIGTERM / SIGINT
    included) no output file and no temporary file is left behind.
    settings: mask_token, block_size, small_block_size, threshold, shift, progress."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if not hf_dir.exists():
        raise ConversionError(f"{hf_dir}: no such directory")
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir} is not a directory (expected a Hugging Face checkpoint folder)")
    check_options(out_path, force, lm_head, hf_dir, embedding)
    cfg = read_json(hf_dir / "config.json", True)
    # a non-UTF-8 directory name decodes with surrogate escapes: not storable as UTF-8
    origin = {"converter": "bitdlm convert", "hf_dir": os.fsencode(hf_dir.resolve()).decode("utf-8", "replace")}
    return build(cfg, hf_dir, lambda: Checkpoint(hf_dir), out_path, origin=origin, lm_head=lm_head,
                 embedding=embedding, force=force, **settings)


def check_options(out_path: Path, force: bool, lm_head: str, source: Path | None = None,
                  embedding: str = "f16") -> None:
    """What every converter checks before reading its input (`source`: never overwritten)."""
    check_output(out_path, force, source)
    if lm_head not in ("f16", "i8"):
        raise ConversionError(f"--lm-head must be f16 or i8, got {lm_head!r}")
    if embedding not in ("f16", "i8"):
        raise ConversionError(f"--embedding must be f16 or i8, got {embedding!r}")


def build(cfg: dict, files_dir: Path, open_tensors, out_path: Path, *, origin: dict, linear_class=_FROM_CONFIG,
          mask_token=None, block_size=None, small_block_size=None, threshold=None, shift=None,
          lm_head="f16", embedding="f16", force=False, progress=True) -> dict:
    """Write `out_path` from a model's config.json contents `cfg`, the tokenizer and
    settings files of folder `files_dir` (tokenizer.json, tokenizer_config.json,
    generation_config.json, dlm_config.json, chat template) and the TensorSource
    `open_tensors()` returns; the summary of convert_report. `linear_class`: the
    weight_scale convention of the source (default: config.json's)."""
    # 1. settings: everything but the tensors, checked as the file's metadata
    guessed, dropped = [], []
    hp = hyperparameters(cfg, guessed)
    tok_cfg = read_json(files_dir / "tokenizer_config.json", False)
    gen_cfg = read_json(files_dir / "generation_config.json", False)
    dlm = read_json(files_dir / "dlm_config.json", False)  # the users' training writes the DLM settings here
    tok_json, tokenizer = load_tokenizer(files_dir, hp["vocab_size"])
    config_class = linear_class_of(cfg)
    linear_class = config_class if linear_class is _FROM_CONFIG else linear_class
    diffusion, diff_src = diffusion_settings(cfg, block_size, small_block_size, threshold, shift, dlm)

    if embedding == "i8" and hp["tie_word_embeddings"] and lm_head != "i8":
        raise ConversionError("--embedding i8 of a tied model (tie_word_embeddings) reads the int8 lm_head's "
                              "table: add --lm-head i8 (with an f16 lm_head the one tied table is the f16 "
                              "embedding)")
    meta = dict(hp)
    meta["quant"] = {"weights": "i2_b128", "lm_head": lm_head, "embedding": embedding}
    ids, chosen = special_tokens(cfg, tok_cfg, gen_cfg, tokenizer, hp["vocab_size"], mask_token, dropped,
                                  dlm)
    meta.update(ids)
    meta["diffusion"] = diffusion
    meta["chat_template"], template_src = chat_template(files_dir, tok_cfg, dropped)
    meta["tokenizer_json"] = tok_json
    try:
        validate_meta(meta)
    except ModelFormatError as e:
        raise ConversionError(str(e)) from None

    # 2. tensors: all located and checked from the headers, then streamed out
    specs = expected_tensors(meta)
    src = open_tensors()
    try:
        src.bind(specs)
        for name in src.names():
            if name.endswith(".bias"):
                raise ConversionError(f"checkpoint has a bias {name}: not supported")
        if src.renamed:
            guessed.append(f"{src.renamed} tensor names of other training code (transformer.layers.N, "
                           f"subln, o_proj.0/.1) read as their Hugging Face BitNet names")
        kinds = precheck(src, specs, hp, linear_class)
        dropped.extend(_unused(src, specs, hp))
        meta["source"] = {**origin, "architectures": [a for a in archs_of(cfg) if len(a) <= 256],
                          "quantization_config": _plain(cfg), "weights": kinds}
        with signals_unwind(), ModelWriter(out_path, meta, specs, overwrite=force) as w:
            precision = write_tensors(w, src, specs, hp, linear_class, progress)
            w.commit()
    finally:
        src.close()

    # 3. the summary
    tokens = token_report(chosen, tokenizer, hp["vocab_size"], guessed)
    return {
        "output": str(out_path), "bytes": out_path.stat().st_size,
        "weights": kinds, "linear_class": linear_class if set(kinds) - {"master"} else None,
        "lm_head": lm_head, "embedding": embedding, "tied": hp["tie_word_embeddings"], "tokens": tokens,
        "chat_template": {"present": meta["chat_template"] is not None, "source": template_src,
                          "chars": len(meta["chat_template"] or "")},
        "diffusion": {k: {"value": diffusion[k], "source": diff_src[k]} for k in diffusion},
        "guessed": guessed, "dropped": dropped,
        "precision": {k: m.as_dict() for k, m in precision.items()},
    }


def _unused(ckpt, specs: dict, hp: dict) -> list:
    """The summary's `dropped` lines for checkpoint tensors the model does not read."""
    dropped = []
    # the embedding is always read: a tied i8 one is written as the lm_head's table (not in specs)
    used = set(specs) | {scale_name(n) for n in specs} | {"model.embed_tokens.weight"}
    if hp["tie_word_embeddings"] and "lm_head.weight" in ckpt:
        dropped.append("lm_head.weight (tie_word_embeddings is true: the embedding is the lm_head)")
        used.add("lm_head.weight")
    unused = sorted(set(ckpt.names()) - used)
    if unused:
        dropped.append(f"{len(unused)} checkpoint tensors not used by the model: {unused[:5]}"
                       f"{' ...' if len(unused) > 5 else ''}")
    return dropped


def _plain(cfg: dict):
    """quantization_config's plain values (no NaN, no nesting) for meta["source"], so
    the header stays strict JSON; None without one."""
    qc = cfg.get("quantization_config") or {}
    plain = {k: v for k, v in qc.items() if isinstance(k, str) and len(k) <= 64 and (
        v is None or isinstance(v, (str, bool)) and len(str(v)) <= 256
        or is_int(v) and abs(v) < 2**53 or isinstance(v, float) and math.isfinite(v))}
    return plain or None
