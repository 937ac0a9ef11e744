"""The one error type of the HTTP API: OpenAI's error JSON with a status."""
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
