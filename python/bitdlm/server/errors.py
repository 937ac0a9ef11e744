"""The errors of the server: APIError (OpenAI's error JSON with a status), the
engine loop's domain errors (no HTTP in them), and `api_error`, the one place
that maps the latter to the former."""
from __future__ import annotations


class APIError(Exception):
    """An error answered as OpenAI's error JSON."""

    _TYPES = {429: "rate_limit_error"}

    def __init__(self, status: int, message: str, *, param=None, code=None, type=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or self._TYPES.get(
            status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


def bad(message, param=None, code=None) -> APIError:
    return APIError(400, message, param=param, code=code)


def shutting_down() -> APIError:
    """What requests get once shutdown has begun (new ones) or timed out (in-flight ones)."""
    return APIError(503, "The server is shutting down.", code="unavailable")


# -- the engine loop's errors (engine_loop.py raises them or hands them to a request's sink)
class EngineLoopError(Exception):
    """Why the engine loop refused or ended a request."""


class QueueFull(EngineLoopError):
    """As many requests are running or queued as the loop takes."""

    def __init__(self, capacity: int):
        super().__init__(f"{capacity} requests running or queued")
        self.capacity = capacity


class ShuttingDown(EngineLoopError):
    """Shutdown has begun (a new request) or timed out (one in flight)."""


class EngineStopped(EngineLoopError):
    """The engine thread is no longer running."""


class RequestRejected(EngineLoopError):
    """The engine refused the request (its add_request raised ValueError: the message)."""


class EngineFailure(EngineLoopError):
    """The engine failed the request (the message says how)."""


def api_error(exc: EngineLoopError) -> APIError:
    """The HTTP answer to an engine loop error."""
    if isinstance(exc, QueueFull):
        return APIError(429, f"The server is at capacity ({exc.capacity} requests running or "
                        "queued); retry later.", code="queue_full")
    if isinstance(exc, ShuttingDown):
        return shutting_down()
    if isinstance(exc, EngineStopped):
        return APIError(503, "The server's engine stopped.", code="unavailable")
    if isinstance(exc, RequestRejected):
        return bad(str(exc))
    return APIError(500, str(exc), code="engine_error")
