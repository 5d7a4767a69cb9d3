"""What the router knows about each worker, and the HTTP calls it makes to them.

The calls follow the Worker HTTP API in the contracts exactly: ``GET /health``, ``GET /load``,
``POST /prefill`` and the NDJSON stream of ``POST /generate``. Connection failures surface as
``WorkerUnreachable`` so the caller can mark the worker unhealthy at once.

The two calls of every request (``/generate``, ``/prefill``) go through http1.py, a small
keep-alive HTTP/1.1 client (see there why); the polls use aiohttp. Bodies are encoded with orjson,
and the decode stream is read in batches: every line that has already arrived is parsed in one
go, so a backlog costs one pass through the router, not one per line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from splitserve.protocol import (
    ErrorReply,
    GenerateRequest,
    Health,
    LoadReport,
    PrefillRequest,
    PrefillResult,
    TokenLine,
)
from splitserve.router import http1
from splitserve.router.codec import dumps, loads

_JSON_HEADERS = {"Content-Type": "application/json"}


class WorkerUnreachable(Exception):
    """Connecting to or reading from a worker failed (it is down or died mid-request)."""


class WorkerRejected(Exception):
    """The worker answered with an error status (4xx/5xx) and this message."""

    def __init__(self, status: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


WorkerLoad = LoadReport  # the router's name for a worker's last /load (policies read it)


@dataclass
class WorkerState:
    """Live view of one worker: health, last load, and what this router sent it since."""

    url: str
    role: str  # "prefill" | "decode"
    healthy: bool = False
    kv_endpoint: str | None = None
    fingerprint: str | None = None
    load: WorkerLoad | None = None
    load_time: float = 0.0
    last_error: str | None = None
    # Work this router assigned since the last /load (so a burst does not all pick one worker).
    assigned_since_poll: int = 0
    assigned_tokens_since_poll: int = 0
    inflight: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # Called when the worker is marked unhealthy: requests waiting on it fail over at once.
    on_unhealthy: set[Callable[[], None]] = field(default_factory=set)

    def set_load(self, load: WorkerLoad) -> None:
        self.load, self.load_time = load, time.monotonic()
        self.assigned_since_poll = self.assigned_tokens_since_poll = 0

    def note_assigned(self, prompt_tokens: int) -> None:
        self.assigned_since_poll += 1
        self.assigned_tokens_since_poll += prompt_tokens
        self.inflight += 1

    def note_done(self) -> None:
        self.inflight = max(0, self.inflight - 1)


_NET_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


async def _error_message(resp: aiohttp.ClientResponse) -> tuple[str, str | None]:
    return _error_text(await resp.read(), resp.status)


def _error_text(raw: bytes, status: int) -> tuple[str, str | None]:
    """(message, reason) from an error answer: the worker's JSON error if it is one."""
    reply = ErrorReply.parse(raw, status)
    return reply.message, reply.reason


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class WorkerClient:
    """Async HTTP calls to workers over one shared connection pool (made in the running loop)."""

    def __init__(
        self, connect_timeout_s: float, prefill_timeout_s: float, idle_timeout_s: float,
        headers: dict[str, str] | None = None, probe_timeout_s: float | None = None,
    ) -> None:
        """``headers`` go on every call to a worker (the internal authentication header);
        ``probe_timeout_s`` bounds a /health or /load poll (default: the connect timeout, at least 1 s)."""
        self.headers = dict(headers or {})
        self.prefill_timeout = aiohttp.ClientTimeout(total=prefill_timeout_s, connect=connect_timeout_s)
        self.stream_timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_read=idle_timeout_s
        )
        probe_s = probe_timeout_s or max(1.0, connect_timeout_s)
        self.probe_timeout = aiohttp.ClientTimeout(total=probe_s, connect=min(connect_timeout_s, probe_s))
        self._session: aiohttp.ClientSession | None = None
        self.pool = http1.Pool(connect_timeout_s, self.headers)
        self._addresses: dict[str, tuple[str, int, str]] = {}

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300), trust_env=False,
                headers=self.headers,
            )
        return self._session

    async def aclose(self) -> None:
        self.pool.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get_json(self, url: str) -> dict[str, Any]:
        try:
            async with self.session.get(url, timeout=self.probe_timeout) as resp:
                if resp.status != 200:
                    msg, reason = await _error_message(resp)
                    raise WorkerRejected(resp.status, msg, reason)
                return await resp.json(content_type=None)
        except _NET_ERRORS as exc:
            raise WorkerUnreachable(f"{url}: {_describe(exc)}") from exc

    async def health(self, base: str) -> Health:
        try:
            return Health.from_json(await self._get_json(f"{base}/health"))
        except ValueError as exc:
            raise WorkerRejected(200, f"{base}/health: {exc}") from exc

    async def load(self, base: str) -> WorkerLoad:
        return WorkerLoad.from_json(await self._get_json(f"{base}/load"))

    def _address(self, base: str) -> tuple[str, int, str]:
        found = self._addresses.get(base)
        if found is None:
            try:
                found = self._addresses[base] = http1.split_url(base)
            except ValueError as exc:
                raise WorkerUnreachable(str(exc)) from exc
        return found

    async def post(self, base: str, path: str, body: dict[str, Any], timeout: float) -> http1.Response:
        """``POST base+path`` on the hot-path client; raises the transport's OSError/TimeoutError."""
        host, port, prefix = self._address(base)
        return await self.pool.post(host, port, prefix + path, dumps(body), timeout)

    async def prefill(self, base: str, request: PrefillRequest) -> PrefillResult:
        timeout = self.prefill_timeout.total
        try:
            resp = await self.post(base, "/prefill", request.to_json(), timeout)
            try:
                raw = await resp.read(timeout)
            finally:
                resp.close()
        except _NET_ERRORS as exc:
            raise WorkerUnreachable(f"prefill {base}: {_describe(exc)}") from exc
        if resp.status != 200:
            msg, reason = _error_text(raw, resp.status)
            raise WorkerRejected(resp.status, f"prefill {base}: {msg}", reason)
        try:
            return PrefillResult.from_json(loads(raw))
        except ValueError as exc:
            raise WorkerRejected(resp.status, f"prefill {base}: answer is not a prefill result: {exc}") from exc

    def generate(self, base: str, request: GenerateRequest) -> GenerateStream:
        return GenerateStream(self, base, request.to_json())


class GenerateStream:
    """``async with`` context around decode's ``POST /generate``; leaving it closes the
    connection unless the stream was read to its end, which makes the decode worker abort the
    sequence and free its blocks."""

    def __init__(self, client: WorkerClient, base: str, body: dict[str, Any]) -> None:
        self._client, self.base, self._body = client, base, body
        self._resp: http1.Response | None = None
        self._idle = client.stream_timeout.sock_read

    async def __aenter__(self) -> GenerateStream:
        try:
            resp = await self._client.post(self.base, "/generate", self._body, self._idle)
        except _NET_ERRORS as exc:
            raise WorkerUnreachable(f"decode {self.base}: {_describe(exc)}") from exc
        if resp.status != 200:
            try:
                msg, reason = _error_text(await resp.read(self._idle), resp.status)
            except _NET_ERRORS as exc:
                msg, reason = _describe(exc), None
            finally:
                resp.close()
            raise WorkerRejected(resp.status, f"decode {self.base}: {msg}", reason)
        self._resp = resp
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._resp is not None:
            self._resp.close()  # complete: the connection is kept; unfinished: it is closed

    def silent_s(self) -> float:
        """Seconds since the worker last sent anything on this stream (0 while data waits to be read)."""
        return 0.0 if self._resp is None else self._resp.silent_s()

    def stall(self, why: str) -> None:
        """Give up on the stream: its reader gets WorkerUnreachable(``why``) once it has read
        what already arrived; leaving the context then closes the connection."""
        if self._resp is not None:
            self._resp.fail(TimeoutError(why))

    async def finish(self) -> None:
        """After the last line: read the (empty) end of the body so the connection is reused."""
        if self._resp is None or self._resp.complete:
            return
        try:
            await self._resp.read(1.0)
        except _NET_ERRORS:
            pass  # __aexit__ closes it; nothing is lost but the connection

    async def batches(self, first_timeout: float | None = None) -> AsyncIterator[list[TokenLine]]:
        """Parsed NDJSON token lines, as lists of every complete line that had arrived; a broken
        connection or a line that is not JSON raises WorkerUnreachable. The first data may
        take ``first_timeout`` (default: the idle timeout), the rest the idle timeout each."""
        if self._resp is None:
            raise RuntimeError("GenerateStream.batches() is only valid inside `async with`")
        rest = b""
        timeout = first_timeout or self._idle
        try:
            while True:
                data = await self._resp.next_data(timeout)
                timeout = self._idle
                if not data:
                    break
                *complete, rest = (rest + data).split(b"\n")
                batch = [TokenLine.from_json(loads(line)) for line in complete if line.strip()]
                if batch:
                    yield batch
            if rest.strip():
                yield [TokenLine.from_json(loads(rest))]
        except _NET_ERRORS as exc:
            raise WorkerUnreachable(f"decode {self.base} stream broke: {_describe(exc)}") from exc
        except ValueError as exc:
            raise WorkerUnreachable(f"decode {self.base} sent a line that is not JSON: {exc}") from exc
