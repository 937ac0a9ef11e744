"""OpenAI-compatible HTTP server (`bitdlm serve`), one module per job:

- schemas.py      request bodies, validation, request -> SamplingParams
- app.py          create_app(): the FastAPI routes and SSE responses
- jobs.py         one HTTP request's engine sub-requests and events
- engine_loop.py  the engine thread (the only one touching the Engine)
- metrics.py      Prometheus metrics
- middleware.py   auth, shutdown refusal, status counting
- errors.py       APIError (OpenAI's error JSON)
- cli.py          flags, loading, uvicorn and the graceful shutdown

This package is imported by the CLI for every command: FastAPI, pydantic,
uvicorn and the model are imported only when a server is actually built.
See docs/server.md.
"""
from __future__ import annotations

from .cli import LAUNCH_HOOKS, add_serve_args, build_from_args, main, register_cli
from .errors import APIError


def __getattr__(name):  # lazy: app.py imports asyncio/concurrent at module level
    if name in ("create_app", "ServerConfig", "render_chat", "MAX_BODY_BYTES"):
        from . import app

        return getattr(app, name)
    if name == "EngineLoop":
        from .engine_loop import EngineLoop

        return EngineLoop
    raise AttributeError(f"module 'bitdlm.server' has no attribute {name!r}")


__all__ = ["create_app", "ServerConfig", "main", "register_cli", "add_serve_args",
           "build_from_args", "APIError", "EngineLoop", "render_chat", "LAUNCH_HOOKS"]
