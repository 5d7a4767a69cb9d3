"""The router's HTTP connections, limited: uvicorn's httptools protocol plus what it lacks.

uvicorn (0.5x) closes a kept-alive connection only after a response, so a client that connects
and sends nothing, or half a request line, holds its socket forever; it reads headers of any
size; and it caps concurrent connections only by answering 503 once headers are complete, by
which time the file descriptor is long spent. Many such clients exhaust the router's file
descriptors and lock everyone out. Here, per connection:

- connected, or between two requests, with nothing sent: closed after ``keep_alive_timeout_s``;
- a request begun (its first byte) whose headers are not complete after ``header_timeout_s``:
  408 and closed; headers larger than ``max_header_bytes``: 431 and closed;
- a response sent before its request's body was all read (a refusal, a 413): the connection is
  closed rather than read to the end of that body;
- beyond ``max_connections`` open connections in this process: 503 at once and closed.

Each of these is counted by reason (``on_refuse``). The body's own size and deadline are checked
by the endpoint that reads it (completions.read_body), where the answer is OpenAI's error JSON.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from splitserve.router.codec import dumps
from splitserve.router.config import Limits
from splitserve.router.errors import error_body
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a refused connection."""


def refusal(status: int, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, with OpenAI's error body."""
    body = dumps(error_body(message, code=code))
    return (f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def limited_protocol(limits: Limits, on_refuse: Callable[[str], None]) -> type[HttpToolsProtocol]:
    """uvicorn's ``http`` protocol class for a server that applies ``limits``."""

    class LimitedProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None
            self._raw_header_bytes = 0  # bytes received while a request's headers are incomplete
            self._header_bytes = 0  # request line and headers as parsed
            self._in_headers = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                self._refuse(503, "too_many_connections",
                             f"the router has {limits.max_connections} open connections; try again")
                return
            self._arm_idle()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            self._unset_keepalive_if_required()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._in_headers or self.cycle is None or self.cycle.response_complete:
                self._raw_header_bytes += len(data)
            super().data_received(data)
            # Headers still incomplete: every byte so far is theirs (the parser buffers a
            # header it has not finished, so this is the count that bounds its memory).
            if self._in_headers and self._raw_header_bytes > limits.max_header_bytes:
                self._headers_too_large()

        def send_400_response(self, msg: str) -> None:
            if not self.transport.is_closing():  # not after a refusal that stopped the parser
                super().send_400_response(msg)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_headers = True
            self._header_bytes = 0
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._header_timeout)

        def on_url(self, url: bytes) -> None:
            super().on_url(url)
            self._header_bytes += len(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            super().on_header(name, value)
            self._header_bytes += len(name) + len(value) + 4

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._raw_header_bytes = 0
            self._cancel_header_timer()
            if self._header_bytes > limits.max_header_bytes:
                self._headers_too_large()
                raise _Refused  # stops the parser: no request is started
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            if self.cycle is not None and self.cycle.more_body:
                self.transport.close()  # the rest of an unread body is not worth reading
            super().on_response_complete()  # (counts the request; nothing more once closing)

        def timeout_keep_alive_handler(self) -> None:
            if not self.transport.is_closing():
                on_refuse("idle_timeout")
            super().timeout_keep_alive_handler()

        # -- helpers
        def _arm_idle(self) -> None:
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(
                limits.keep_alive_timeout_s, self.timeout_keep_alive_handler
            )

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self._in_headers and not self.transport.is_closing():
                self._refuse(408, "header_timeout", f"request headers not complete within {limits.header_timeout_s:g} s")

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_large(self) -> None:
            self._refuse(431, "headers_too_large", f"request line and headers are larger than {limits.max_header_bytes} bytes")

        def _refuse(self, status: int, reason: str, message: str) -> None:
            on_refuse(reason)
            self._cancel_header_timer()
            self._unset_keepalive_if_required()
            self.transport.write(refusal(status, reason, message))
            self.transport.close()

    return LimitedProtocol
