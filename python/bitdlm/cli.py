"""`bitdlm` command line. Each command is defined next to the code it runs
(`register_cli(subparsers)` in its module); this file only wires them."""
from __future__ import annotations

import argparse
import importlib
import sys

# (command, module defining register_cli)
_COMMANDS = [
    ("convert", "bitdlm.convert"),
    ("info", "bitdlm.format"),
    ("generate", "bitdlm.generate"),
    ("serve", "bitdlm.server"),
    ("bench", "bitdlm.bench"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitdlm", description="CPU inference for ternary (BitNet b1.58) block-diffusion language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for _name, module in _COMMANDS:
        importlib.import_module(module).register_cli(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
