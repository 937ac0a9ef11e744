"""`bitdlm serve` and scripts/serve_dlm_native.py: the command that composes the
single-process server (bitdlm.server) with its Ray Serve launcher (bitdlm.ray).
Neither of the two knows this composition: the server does not import Ray, and
bitdlm.ray builds the server's app in each replica."""
from __future__ import annotations

import argparse
import logging
import sys

from . import ray as ray_launcher  # imports Ray itself only for --replicas
from .server import cli as server_cli

DESCRIPTION = ("Serve a bitdlm model over the OpenAI HTTP API (/v1/completions, "
               "/v1/chat/completions, /v1/models, /health, /metrics). See docs/server.md.")


# scripts/serve_dlm_native.py keeps the users' old serve command line working as typed:
# their servers' flag spellings, port 30000, /generate's 128-token default for every route,
# /health's "healthy", and their model ids ("dlm-bitnet-native": the Python server, "dlm": the
# Rust one) accepted besides ours. The host stays 127.0.0.1 (theirs bound 0.0.0.0).
OLD_MODEL_IDS = ("dlm-bitnet-native", "dlm")
OLD_DEFAULTS = dict(port=30000, default_max_tokens=128, health_status="healthy", model_aliases=OLD_MODEL_IDS)


def add_args(p: argparse.ArgumentParser, old_spellings: bool = False) -> None:
    """Every flag of `bitdlm serve`: the server's, then the Ray launcher's."""
    server_cli.add_serve_args(p, old_spellings)
    ray_launcher.add_ray_args(p)


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server", description=DESCRIPTION)
    add_args(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        rc = ray_launcher.serve_with_ray(args)  # None: no Ray flag given
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        print(e.code, file=sys.stderr)  # a one-line setup error: status 2, as docs/server.md says
        return 2
    if rc is not None:
        return int(rc)
    return server_cli.serve(args)


def old_parser() -> argparse.ArgumentParser:
    """The parser of scripts/serve_dlm_native.py (see OLD_DEFAULTS)."""
    p = argparse.ArgumentParser(prog="serve_dlm_native.py", description=DESCRIPTION, add_help=False)
    p.add_argument("--help", action="help", help="show this help and exit")
    add_args(p, old_spellings=True)
    p.set_defaults(**OLD_DEFAULTS)
    return p


def main(argv=None) -> int:
    """Entry point of scripts/serve_dlm_native.py: the flags of `bitdlm serve` plus the
    old servers' spellings, with the old defaults (OLD_DEFAULTS); -h is the host, --help
    the help."""
    args = old_parser().parse_args(argv)
    try:
        return int(cmd_serve(args) or 0)
    except KeyboardInterrupt:
        return 130
