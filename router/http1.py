"""A small HTTP/1.1 client for the router's two calls per request (decode ``/generate``, prefill
``/prefill``): keep-alive connections per worker, one write per request, responses parsed by
httptools (the C parser uvicorn uses).

Why not aiohttp here: building and tracking a request through aiohttp (request and response
objects, auto headers, payload registry, timers, flow control) cost about a quarter of the
router's CPU per request in bench/lab/router.py. These calls need none of that: the workers are
known, the bodies are small JSON, and the only streaming is decode's NDJSON. aiohttp stays for
everything off the hot path (health and load polls).

Failure model: any transport failure (refused, reset, the worker died mid-stream, a parse
error, a timeout) raises ``OSError``/``TimeoutError`` to the caller; a connection is reused only
after its response was read to the end, and an idle connection the worker may already have
closed (uvicorn closes keep-alive connections idle for 5 s) is dropped, not reused.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import httptools

_IDLE_REUSE_S = 3.0  # reuse a kept-alive connection only if idle less than this (servers: 5 s)


class ResponseError(OSError):
    """The connection failed before the response was complete."""


class Response:
    """One response: status, then body data as it arrives (``read``, ``next_data``)."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = 0
        self.keep_alive = False
        self._data: list[bytes] = []
        self._headers_done = False
        self.complete = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self.received_at = time.monotonic()  # when the request went out or body data last came

    # -- called by the connection
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if not self.complete and self._error is None:
            self._error = exc
            self._wake()

    # -- used by the caller
    def silent_s(self) -> float:
        """Seconds since data last came; 0 while some waits to be read or the body is complete."""
        return 0.0 if self._data or self.complete else time.monotonic() - self.received_at

    def fail(self, exc: BaseException) -> None:
        """End the wait for more data with ``exc`` (data already here is still read first)."""
        self._fail(exc)

    async def _wait(self, timeout: float | None) -> None:
        if self._error is not None:
            raise self._error
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = loop.call_later(timeout, self._fail, TimeoutError(f"no data for {timeout} s")) if timeout else None
        try:
            await self._waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        if self._error is not None:
            raise self._error

    async def start(self, timeout: float | None) -> None:
        """Wait for the status line and headers."""
        while not self._headers_done:
            await self._wait(timeout)

    async def next_data(self, timeout: float | None) -> bytes:
        """Everything that arrived since the last call (waiting for some); b"" at the end."""
        while not self._data and not self.complete:
            await self._wait(timeout)
        data = b"".join(self._data) if len(self._data) != 1 else self._data[0]
        self._data.clear()
        return data

    async def read(self, timeout: float | None) -> bytes:
        """The whole (rest of the) body."""
        while not self.complete:
            await self._wait(timeout)
        data = b"".join(self._data)
        self._data.clear()
        return data

    def close(self) -> None:
        """Done with the response: the connection goes back to the pool if the response was
        read to its end, else it is closed (for a decode stream: the worker aborts it)."""
        self._conn.finish(self)


class _ClosedParser:
    """Stands in for a closed connection's parser (no callback runs after connection_lost)."""

    def feed_data(self, data: bytes) -> None:
        raise httptools.HttpParserError("connection closed")


_CLOSED_PARSER = _ClosedParser()


class _Connection(asyncio.Protocol):
    def __init__(self, pool: Pool, key: tuple[str, int]) -> None:
        self.pool, self.key = pool, key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.closed = False
        self.idle_since = 0.0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.response is not None:
                self.response._fail(ResponseError(f"bad HTTP response: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None:
            self.response._fail(ResponseError(f"connection closed by the worker{f': {exc}' if exc else ''}"))
        # The parser and the transport both point back at this protocol: drop them so a closed
        # connection is freed by reference counting, not left to the cyclic collector.
        self.transport = None
        self.parser = _CLOSED_PARSER

    # httptools callbacks
    def on_headers_complete(self) -> None:
        r = self.response
        if r is not None:
            r.status = self.parser.get_status_code()
            r.keep_alive = self.parser.should_keep_alive()
            r._headers_done = True
            r._wake()

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._data.append(body)
            self.response.received_at = time.monotonic()
            self.response._wake()

    def on_message_complete(self) -> None:
        if self.response is not None:
            self.response.complete = True
            self.response._wake()

    # used by Pool / Response
    def request(self, head: bytes, body: bytes) -> Response:
        if self.transport is None:  # the worker closed it between connecting and this request
            raise ResponseError("connection closed by the worker")
        self.response = Response(self)
        self.transport.write(head + body)
        return self.response

    def finish(self, response: Response) -> None:
        if self.response is not response:
            return
        self.response = None
        if response.complete and response.keep_alive and not self.closed:
            self.idle_since = time.monotonic()
            self.pool.release(self)
        else:
            self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Kept-alive connections per (host, port)."""

    def __init__(self, connect_timeout_s: float, headers: dict[str, str] | None = None) -> None:
        """``headers`` go on every request (the internal authentication header)."""
        self.connect_timeout_s = connect_timeout_s
        self._extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    def release(self, conn: _Connection) -> None:
        self._idle.setdefault(conn.key, []).append(conn)

    async def _acquire(self, key: tuple[str, int]) -> _Connection:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < _IDLE_REUSE_S:
                return conn
            conn.abort()
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: _Connection(self, key), *key), self.connect_timeout_s
        )
        return conn

    async def post(self, host: str, port: int, path: str, body: bytes, timeout: float | None) -> Response:
        """Send ``POST path`` with a JSON body; returns once the status and headers are in."""
        conn = await self._acquire((host, port))
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"{self._extra}Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        response = conn.request(head, body)
        try:
            await response.start(timeout)
        except BaseException:
            conn.abort()
            raise
        return response

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.abort()
        self._idle.clear()


def split_url(base: str) -> tuple[str, int, str]:
    """``http://host:port[/prefix]`` -> (host, port, prefix); plain http only (workers are
    inside the cluster), port 80 by default."""
    parts = urlsplit(base)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"worker URL must be http://host:port, got {base!r}")
    return parts.hostname, parts.port or 80, parts.path.rstrip("/")
