#!/usr/bin/env python3
"""Convert a Hugging Face BitNet (block-diffusion) checkpoint to a bitdlm .bin.

Same flags as `bitdlm convert`:
    scripts/convert_dlm_to_sglkernel.py HF_DIR OUT.bin [--mask-token TOKEN_OR_ID]
        [--block-size N] [--small-block-size N] [--threshold X] [--shift/--no-shift]
        [--lm-head f16|i8] [--force] [--quiet]
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
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
