#!/usr/bin/env python3
"""Serve a bitdlm model over the OpenAI HTTP API: a thin wrapper of
`bitdlm serve` with the same flags (see docs/server.md).

    python scripts/serve_dlm_native.py --model model.bin --port 8000
    python scripts/serve_dlm_native.py --model models/dlm-bitnet-2b.bin \
        --tokenizer models/dlm-bitnet-2b --block-size 32 --threshold 0.95
"""
import os
import sys

try:
    import bitdlm  # noqa: F401  (installed)
except ImportError:  # run from a source checkout
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from bitdlm.serve_cli import main

if __name__ == "__main__":
    sys.exit(main())
