"""The `bitdlm convert` command: its flags, the one-line errors and the summary
it prints."""
from __future__ import annotations

import os
import sys

from ..format import ModelFormatError
from . import gguf_file, sglbitnt
from .common import ConversionError, Terminated
from .config import DEFAULT_BLOCK_SIZE, DEFAULT_SMALL_BLOCK_SIZE, DEFAULT_THRESHOLD
from .hf import convert_report


def format_summary(r: dict) -> str:
    """The summary `bitdlm convert` prints (from convert_report's dict)."""
    def tok(e):
        if e["id"] is None:
            return e["source"]
        return f"{e['id']} {e['token']!r} ({e['source']})"

    t = r["tokens"]
    lines = [f"wrote {r['output']} ({r['bytes'] / 2**20:.1f} MiB)",
             f"  mask token:    {tok(t['mask'])}",
             f"  bos token:     {tok(t['bos'])}",
             f"  eos tokens:    {'; '.join(tok(e) for e in t['eos']) or 'none (generation never stops early)'}",
             f"  pad token:     {tok(t['pad'])}"]
    ct = r["chat_template"]
    lines.append(f"  chat template: {ct['chars']} characters ({ct['source']})" if ct["present"] else
                 "  chat template: none: `bitdlm generate --chat` and /v1/chat/completions will fail "
                 "with this model (add chat_template to tokenizer_config.json or a chat_template.jinja)")
    lines.append("  diffusion:     " + ", ".join(f"{k} {d['value']} ({d['source']})"
                                                for k, d in r["diffusion"].items()))
    w = ", ".join(r["weights"])
    lines.append(f"  ternary:       {w}" + (f" (linear_class {r['linear_class']})" if r["linear_class"] else "")
                 + (": quantized here with BitNet absmean, as transformers does" if "master" in r["weights"] else ""))
    for name, p in r["precision"].items():
        what = "embedding" if name == "model.embed_tokens.weight" else "lm_head"
        if p["exact"]:
            lines.append(f"  precision:     {what} {p['source_dtype']} -> {p['stored']}: exact")
            continue
        lines.append(f"  precision:     {what} {p['source_dtype']} -> {p['stored']}: max |delta| "
                     f"{p['max_abs_error']:.3g} (largest |w| {p['max_abs_value']:.3g})")
        if what == "embedding" and p["stored"] == "i8":
            lines.append("                 the forward reads row t as int8[t] x scale[t] (per-row absmax)"
                         + (": the one table of the tied int8 lm_head" if r.get("tied") and r["lm_head"] == "i8"
                            else ""))
        elif what == "embedding" and r["lm_head"] == "f16" and "lm_head.weight" not in r["precision"]:
            lines.append("                 the tied lm_head reads these rows: every logit h.w moves by up to "
                         "sum|h| x that against the source model")
        elif what == "lm_head":
            lines.append("                 every logit h.w moves by up to sum|h| x that against the source model")
    for g in r["guessed"]:
        lines.append(f"  guessed:       {g}")
    for d in r["dropped"]:
        lines.append(f"  dropped:       {d}")
    return "\n".join(lines)


def report_for(source, out, **kwargs) -> dict:
    """Convert `source` by its kind: a Hugging Face folder, an SGLBITNT v1 file of the
    old sgl-kernel engine, or a GGUF file. kwargs: convert_report's, plus
    `tokenizer` (a folder with tokenizer.json, for the files that hold none)."""
    tokenizer = kwargs.pop("tokenizer", None)
    head = b""
    if os.path.isfile(source):
        with open(source, "rb") as f:
            head = f.read(8)
    if head == sglbitnt.MAGIC:
        return sglbitnt.convert_report(source, out, tokenizer=tokenizer, **kwargs)
    if head[:4] == b"GGUF":
        return gguf_file.convert_report(source, out, tokenizer=tokenizer, **kwargs)
    if tokenizer is not None:
        raise ConversionError("--tokenizer is for SGLBITNT and GGUF files: a Hugging Face folder has its own")
    return convert_report(source, out, **kwargs)


def run_cli(args) -> int:
    try:
        report = report_for(args.hf_dir, args.out, mask_token=args.mask_token, block_size=args.block_size,
                            small_block_size=args.small_block_size, threshold=args.threshold,
                            shift=args.shift, lm_head=args.lm_head, embedding=args.embedding, force=args.force,
                            progress=not args.quiet, tokenizer=args.tokenizer)
    except (ConversionError, ModelFormatError, FileExistsError) as e:
        print(f"bitdlm convert: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, a file vanishing under us
        where = f"{e.filename}: " if e.filename else ""
        print(f"bitdlm convert: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitdlm convert: interrupted, no output written", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"bitdlm convert: terminated by signal {e.signum}, no output written", file=sys.stderr)
        return e.code
    print(format_summary(report))
    return 0


def add_arguments(p) -> None:
    p.add_argument("hf_dir", metavar="SOURCE",
                   help="Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json), "
                        "or an SGLBITNT .bin of the old sgl-kernel engine, or a GGUF file (TQ1_0 / TQ2_0)")
    p.add_argument("out", help="output .bin file")
    p.add_argument("--mask-token", "--mask-token-id", default=None, metavar="TOKEN_OR_ID",
                   help="diffusion mask token (string or id); default: dlm_config.json / config mask_token_id, "
                        "tokenizer_config mask_token, or a known mask token in the tokenizer")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="folder with tokenizer.json (+ tokenizer_config.json) for an SGLBITNT file; default: "
                        "the folder beside it named by its stem, as the old server looked (a GGUF file "
                        "carries its own)")
    p.add_argument("--block-size", type=int, default=None, help=f"diffusion block size (default: config or {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--small-block-size", type=int, default=None,
                   help=f"diffusion sub-block size (default: config or {DEFAULT_SMALL_BLOCK_SIZE})")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"confidence threshold for parallel unmasking (default: config or {DEFAULT_THRESHOLD})")
    p.add_argument("--shift", dest="shift", action="store_true", default=None,
                   help="logits at i-1 predict token i (default: config or on)")
    p.add_argument("--no-shift", dest="shift", action="store_false", help="logits at i predict token i")
    p.add_argument("--lm-head", choices=("f16", "i8"), default="f16", help="lm_head storage (default f16)")
    p.add_argument("--embedding", choices=("f16", "i8"), default="f16",
                   help="token embedding storage (default f16). i8: int8 rows with a per-row scale; a tied "
                        "model needs --lm-head i8 and then keeps one int8 table for both (docs/format.md)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a Hugging Face BitNet checkpoint (or an SGLBITNT / GGUF "
                                              "file) to a .bin")
    add_arguments(p)
    p.set_defaults(func=run_cli)
