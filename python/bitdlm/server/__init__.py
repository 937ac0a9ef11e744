"""OpenAI-compatible HTTP server (`bitdlm serve`), one module per job:

- config.py       ServerConfig (what one app serves, its limits)
- schemas.py      request bodies, validation, request -> SamplingParams
- app.py          create_app(): the FastAPI app, routes wired to serving.py, error mapping
- serving.py      OpenAIServing: what each route does (read, validate, submit, answer)
- responses.py    response builders: completion JSON, SSE chunks, streaming, error JSON
- jobs.py         one HTTP request's engine sub-requests and events
- engine_loop.py  the engine thread (the only one touching the Engine)
- metrics.py      Prometheus metrics
- middleware.py   auth, shutdown refusal, status counting
- errors.py       APIError (OpenAI's error JSON), the engine loop's errors and their mapping
- cli.py          flags, loading, uvicorn and the graceful shutdown

The `bitdlm serve` command itself (bitdlm/serve_cli.py) composes this package
with the Ray Serve launcher (bitdlm/ray.py); this package never imports Ray.
FastAPI, pydantic, uvicorn and the model are imported only when a server is
actually built.
See docs/server.md.
"""
from __future__ import annotations

from .cli import UsageError, add_serve_args, build_from_args, check_args, serve
from .errors import APIError


def __getattr__(name):  # lazy: the app imports the web stack (pydantic, starlette)
    if name in ("ServerConfig", "MAX_BODY_BYTES"):
        from . import config

        return getattr(config, name)
    if name in ("create_app", "render_chat"):
        from . import app

        return getattr(app, name)
    if name == "EngineLoop":
        from .engine_loop import EngineLoop

        return EngineLoop
    raise AttributeError(f"module 'bitdlm.server' has no attribute {name!r}")


__all__ = ["create_app", "ServerConfig", "serve", "add_serve_args", "check_args", "UsageError",
           "build_from_args", "APIError", "EngineLoop", "render_chat"]
