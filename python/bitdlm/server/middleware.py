"""Pure ASGI middleware (BaseHTTPMiddleware would get in the way of streaming
and of disconnect detection): bearer auth, shutdown refusal, per-route status
counting."""
from __future__ import annotations

import hmac

from .errors import APIError, shutting_down

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
          "/generation/algorithms")


class Gate:
    def __init__(self, app, metrics, engine_loop, api_key=None):
        self.app = app
        self.metrics = metrics
        self.engine_loop = engine_loop
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else (
            "/v1/models/{id}" if path.startswith("/v1/models/") else "other")

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route=route, status=str(message["status"])).inc()
            await send(message)

        async def refuse(err: APIError, headers=None):
            from starlette.responses import JSONResponse

            resp = JSONResponse(err.body(), status_code=err.status, headers=headers)
            await resp(scope, receive, counting_send)

        if self.expected is not None and path != "/health":
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                msg = ("Missing API key: pass it as 'Authorization: Bearer KEY'." if not got
                       else "Incorrect API key provided.")
                return await refuse(APIError(401, msg, code="invalid_api_key"),
                                    {"WWW-Authenticate": "Bearer"})
        if self.engine_loop.draining and path != "/metrics":
            return await refuse(shutting_down(), {"Retry-After": "1", "Connection": "close"})
        await self.app(scope, receive, counting_send)
