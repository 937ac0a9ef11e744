"""The `bitdlm convert` command: its flags, the one-line errors and the summary
it prints."""
from __future__ import annotations

import sys

from ..format import ModelFormatError
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
        if what == "embedding" and r["lm_head"] == "f16" and "lm_head.weight" not in r["precision"]:
            lines.append("                 the tied lm_head reads these rows: every logit h.w moves by up to "
                         "sum|h| x that against the source model")
        elif what == "lm_head":
            lines.append("                 every logit h.w moves by up to sum|h| x that against the source model")
    for g in r["guessed"]:
        lines.append(f"  guessed:       {g}")
    for d in r["dropped"]:
        lines.append(f"  dropped:       {d}")
    return "\n".join(lines)


def run_cli(args) -> int:
    try:
        report = convert_report(args.hf_dir, args.out, mask_token=args.mask_token, block_size=args.block_size,
                                small_block_size=args.small_block_size, threshold=args.threshold,
                                shift=args.shift, lm_head=args.lm_head, force=args.force,
                                progress=not args.quiet)
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
    p.add_argument("hf_dir", help="Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("out", help="output .bin file")
    p.add_argument("--mask-token", default=None, metavar="TOKEN_OR_ID",
                   help="diffusion mask token (string or id); default: config mask_token_id, "
                        "tokenizer_config mask_token, or a known mask token in the tokenizer")
    p.add_argument("--block-size", type=int, default=None, help=f"diffusion block size (default: config or {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--small-block-size", type=int, default=None,
                   help=f"diffusion sub-block size (default: config or {DEFAULT_SMALL_BLOCK_SIZE})")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"confidence threshold for parallel unmasking (default: config or {DEFAULT_THRESHOLD})")
    p.add_argument("--shift", dest="shift", action="store_true", default=None,
                   help="logits at i-1 predict token i (default: config or on)")
    p.add_argument("--no-shift", dest="shift", action="store_false", help="logits at i predict token i")
    p.add_argument("--lm-head", choices=("f16", "i8"), default="f16", help="lm_head storage (default f16)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a Hugging Face BitNet checkpoint to a .bin")
    add_arguments(p)
    p.set_defaults(func=run_cli)
