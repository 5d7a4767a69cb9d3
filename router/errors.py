"""Errors the router returns, in OpenAI's JSON shape.

Every failure a client can see is a ``RouterError`` carrying the HTTP status and the OpenAI error
fields, so the app has one place that turns it into ``{"error": {message, type, param, code}}``.
"""

from __future__ import annotations

from typing import Any


class RouterError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> RouterError:
    return RouterError(400, message, param=param)


class UpstreamError(RouterError):
    """A worker failed (502) or none could take the request (503)."""

    def __init__(self, status: int, message: str, code: str = "upstream_error") -> None:
        super().__init__(status, message, type="server_error", code=code)


class ShedError(RouterError):
    """Admission refused the request because no worker pair can meet its latency targets."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(429, message, type="rate_limit_error", code=reason)
        self.reason = reason


class LimitError(RouterError):
    """A request refused by one of the router's limits (config.Limits); ``reason`` labels the
    refusal metric and is the error's code."""

    def __init__(self, status: int, reason: str, message: str, param: str | None = None) -> None:
        super().__init__(status, message, param=param, code=reason)
        self.reason = reason
