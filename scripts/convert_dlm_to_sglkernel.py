#!/usr/bin/env python3
"""Convert a Hugging Face BitNet (block-diffusion) checkpoint, or an old SGLBITNT /
GGUF file, to a bitdlm .bin.

Same flags as `bitdlm convert`:
    scripts/convert_dlm_to_sglkernel.py SOURCE OUT.bin [--mask-token TOKEN_OR_ID]
        [--tokenizer DIR] [--block-size N] [--small-block-size N] [--threshold X]
        [--shift/--no-shift] [--lm-head f16|i8] [--quiet]
Like the old script of this name, an existing OUT is replaced (always, as if
`--force` were given); the replacement is atomic: the new file is written beside
OUT and renamed over it only when complete, so OUT is never half-written.
"""
import argparse
import sys
from pathlib import Path

try:
    import bitdlm  # noqa: F401
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from bitdlm.convert import add_arguments, run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.force = True  # the old script overwrote OUT (atomically here: see above)
    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
