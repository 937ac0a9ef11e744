"""Pure ASGI middleware (BaseHTTPMiddleware would get in the way of streaming
and of disconnect detection): bearer auth, shutdown refusal, per-route status
counting, and the browser checks of docs/server.md "Limits" (Host on loopback,
Content-Type of a POST)."""
from __future__ import annotations

import hmac
import ipaddress
import socket

from .errors import APIError, shutting_down

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
          "/generation/algorithms")


# The Content-Types a browser page may POST to another origin without a CORS
# preflight ("simple requests"); with none it is one too. Refused on POSTs
# (415) so that a web page cannot drive the API; any other type needs a
# preflight, which this server never answers, so the browser stops there.
SIMPLE_CONTENT_TYPES = ("", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data")


def _is_loopback(host) -> bool:
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def host_allowed(host_header: bytes, local_names: frozenset) -> bool:
    """The Host header of a request that came in on a loopback address: an IP
    literal, `localhost` (or `*.localhost`), or this machine's name. Anything
    else is a name that resolved to 127.0.0.1 in the browser of whoever sent
    it: DNS rebinding (a page on evil.example re-resolved to 127.0.0.1)."""
    host = host_header.decode("latin-1").strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1:].split("]")[0]
    elif host.count(":") == 1:
        host = host.split(":")[0]
    host = host.rstrip(".")
    if not host:  # HTTP/1.0 without Host: no browser sends that
        return True
    if host == "localhost" or host.endswith(".localhost") or host in local_names:
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _local_names() -> frozenset:
    name = socket.gethostname().lower()
    return frozenset({name, name.split(".")[0], socket.getfqdn().lower()})


class Gate:
    def __init__(self, app, metrics, engine_loop, api_key=None):
        self.app = app
        self.metrics = metrics
        self.engine_loop = engine_loop
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.local_names = _local_names()

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

        headers = dict(scope["headers"])
        server = scope.get("server")
        if server and _is_loopback(server[0]) and \
                not host_allowed(headers.get(b"host", b""), self.local_names):
            return await refuse(APIError(403, "Invalid Host header: this server answers on loopback "
                                         "only to localhost or an IP address (DNS rebinding "
                                         "protection).", code="invalid_host"))
        if scope["method"] == "POST":
            ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower().decode("latin-1")
            if ctype in SIMPLE_CONTENT_TYPES:
                return await refuse(APIError(
                    415, f"Unsupported Content-Type {ctype or '(none)'!r}: send the JSON body with "
                    "'Content-Type: application/json'.", code="unsupported_media_type"))
        if self.expected is not None and path != "/health":
            got = headers.get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                msg = ("Missing API key: pass it as 'Authorization: Bearer KEY'." if not got
                       else "Incorrect API key provided.")
                return await refuse(APIError(401, msg, code="invalid_api_key"),
                                    {"WWW-Authenticate": "Bearer"})
        if self.engine_loop.draining and path != "/metrics":
            return await refuse(shutting_down(), {"Retry-After": "1", "Connection": "close"})
        await self.app(scope, receive, counting_send)
