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


def add_args(p: argparse.ArgumentParser) -> None:
    """Every flag of `bitdlm serve`: the server's, then the Ray launcher's."""
    server_cli.add_serve_args(p)
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


def main(argv=None) -> int:
    """Entry point of scripts/serve_dlm_native.py (the same flags as `bitdlm serve`)."""
    p = argparse.ArgumentParser(prog="serve_dlm_native.py", description=DESCRIPTION)
    add_args(p)
    args = p.parse_args(argv)
    try:
        return int(cmd_serve(args) or 0)
    except KeyboardInterrupt:
        return 130
