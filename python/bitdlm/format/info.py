"""`bitdlm info`: print a `.bin` model's metadata and tensor sizes."""
from __future__ import annotations

import json
import sys

import numpy as np

from .reader import ModelFile
from .spec import ModelFormatError, embedding_dtype, embedding_table


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def describe(mf: ModelFile, show_tensors: bool = True) -> str:
    """Human-readable summary: metadata (without the tokenizer) and tensor sizes."""
    meta = dict(mf.meta)
    tok = meta.pop("tokenizer_json", "")
    tmpl = meta.pop("chat_template", None)
    lines = [f"{mf.path}: bitdlm format v{mf.header['version']}, {_fmt_bytes(mf.file_size)}"]
    for k, v in meta.items():
        lines.append(f"  {k}: {json.dumps(v)}")
    weight, scale = embedding_table(mf.meta)
    lines.append(f"  embedding: {embedding_dtype(mf.meta)}, rows of {weight}"
                 + (f" x {scale} (int8 x per-row f32 scale)" if scale else ""))
    lines.append(f"  tokenizer_json: <{len(tok)} chars>")
    if tmpl is None:
        lines.append("  chat_template: null")
    else:
        first = tmpl.strip().splitlines()[0] if tmpl.strip() else ""
        lines.append(f"  chat_template: <{len(tmpl)} chars> {first[:60]!r}")
    by_dtype: dict[str, list] = {}
    for t in mf.tensors.values():
        by_dtype.setdefault(t.dtype, []).append(t)
    lines.append(f"tensors: {len(mf.tensors)}")
    for dt, ts in sorted(by_dtype.items()):
        n = sum(int(np.prod(t.shape)) for t in ts)
        lines.append(f"  {dt:8s} {len(ts):5d} tensors {n:>14,d} values {_fmt_bytes(sum(t.nbytes for t in ts)):>10s}")
    if show_tensors:
        for t in mf.tensors.values():
            sc = f"  scale={t.scale:.6g}" if t.scale is not None else ""
            lines.append(f"  {t.name:52s} {t.dtype:8s} {str(list(t.shape)):16s} "
                         f"{_fmt_bytes(t.nbytes):>10s} @{t.offset}{sc}")
    return "\n".join(lines)


def _cmd_info(args) -> int:
    if args.model is None:  # as generate and serve: $BITDLM_MODEL, else the packaged model
        from ..data import chosen_model_path as default_model_path

        args.model = default_model_path()
        if args.model is None:
            print("bitdlm info: error: no model given and no packaged default model found",
                  file=sys.stderr)
            return 2
    try:
        with ModelFile.open(args.model, verify=args.verify) as mf:
            print(describe(mf, show_tensors=not args.summary))
            if args.verify:
                print("checksums: OK")
    except ModelFormatError as e:
        print(f"bitdlm info: error: {e}", file=sys.stderr)
        return 2
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("info", help="print a .bin model's metadata and tensor sizes")
    p.add_argument("model", nargs="?", default=None,
                   help="path to a bitdlm .bin file (default: $BITDLM_MODEL, else the packaged "
                        "default model)")
    p.add_argument("--verify", action="store_true", help="also check every tensor's crc32 and that float tensors are finite")
    p.add_argument("--summary", action="store_true", help="totals per dtype only, no tensor list")
    p.set_defaults(func=_cmd_info)
