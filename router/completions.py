"""The two endpoints every request goes through, as plain ASGI handlers.

``POST /v1/completions`` and ``POST /v1/chat/completions`` are answered here, ahead of FastAPI:
through FastAPI each request passed about ten middleware and routing layers, each wrapping every
``send`` of the stream, and the body went JSON -> dict -> pydantic; that was the larger part of
the router's CPU time per request (bench/lab/router.py measures it). Here the body is validated in
one pydantic-core call from the raw bytes (same models, same 400 messages), errors are OpenAI's
JSON shape with the same statuses, and the SSE stream is written straight to the server.

A client that disconnects is noticed at once, from the moment its body has been read (one small
watcher on ``receive``): whatever the request is doing is cancelled: waiting in the admission
queue, waiting for its first token, streaming (which closes the decode worker's stream, which
aborts the sequence there). A request nobody waits for any more gives its place back at once
instead of being queued, prefilled and decoded for nobody.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError
from splitserve.router.choices import Shape, SSEStream
from splitserve.router.codec import dumps
from splitserve.router.config import MAX_SLO_MS, SLO, check_slo_ms
from splitserve.router.errors import LimitError, RouterError, bad_request, error_body
from splitserve.router.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    check_model,
    validation_message,
)

if TYPE_CHECKING:
    from splitserve.router.app import RouterState

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

SLO_TTFT_HEADER = "x-slo-ttft-ms"
SLO_TPOT_HEADER = "x-slo-tpot-ms"
_SLO_HEADERS = ((SLO_TTFT_HEADER.encode(), "ttft_ms"), (SLO_TPOT_HEADER.encode(), "tpot_ms"))
_OUTCOMES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 408: "timeout", 413: "too_large", 429: "shed"}
_TOKENIZE_INLINE_BYTES = 64 * 1024  # a body larger than this is tokenized in a thread
_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_DONE = "data: [DONE]\n\n"


def header(scope: Scope, name: bytes) -> bytes | None:
    """A request header's value (``name`` lower-case, as ASGI gives them), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def request_slo(scope: Scope, default: SLO) -> SLO:
    """Per-request targets from headers, else the configured ones; a header that is not a
    finite, positive, bounded number of milliseconds is a 400 naming it."""
    values: dict[str, float] = {}
    for name, field in _SLO_HEADERS:
        raw = header(scope, name)
        if raw is None:
            continue
        label = name.decode()
        try:
            values[field] = float(raw)
            check_slo_ms(label, values[field])
        except ValueError as exc:
            raise bad_request(
                f"header {label} must be a number of milliseconds in (0, {MAX_SLO_MS:.0f}], "
                f"got {raw.decode(errors='replace')[:64]!r}", label,
            ) from exc
    if not values:
        return default
    return SLO(values.get("ttft_ms", default.ttft_ms), values.get("tpot_ms", default.tpot_ms))


async def read_body(receive: Receive, max_bytes: int | None = None, timeout_s: float | None = None) -> bytes:
    """The request body. With ``max_bytes``: a LimitError (413) as soon as more arrived, so the
    rest is never read nor held; with ``timeout_s``: a LimitError (408) if the body has not all
    arrived that long after the first piece (a client trickling its body holds a connection and
    a task). The common body arrives whole with the headers and costs no timer."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ConnectionAbortedError("client left before sending the body")
    first = message.get("body", b"")
    if max_bytes is not None and len(first) > max_bytes:
        raise _body_too_large(max_bytes)
    if not message.get("more_body", False):
        return first
    parts, size = [first], len(first)
    try:
        async with asyncio.timeout(timeout_s):
            while message.get("more_body", False):
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ConnectionAbortedError("client left before sending the body")
                parts.append(message.get("body", b""))
                size += len(parts[-1])
                if max_bytes is not None and size > max_bytes:
                    raise _body_too_large(max_bytes)
    except TimeoutError:
        raise LimitError(408, "body_timeout", f"the request body did not arrive within {timeout_s:g} s") from None
    return b"".join(parts)


def _body_too_large(max_bytes: int) -> LimitError:
    return LimitError(413, "body_too_large", f"the request body is larger than the limit of {max_bytes} bytes")


def check_content_length(scope: Scope, max_bytes: int) -> None:
    """Refuse a declared body over the limit before reading any of it."""
    raw = header(scope, b"content-length")
    if raw is not None and raw.isdigit() and int(raw) > max_bytes:
        raise _body_too_large(max_bytes)


def parse(model: type[BaseModel], scope: Scope, raw: bytes) -> Any:
    """The request body as ``model``, or a 400 RouterError that says what is wrong (the message
    FastAPI's validation gave, including for a body that is not JSON, or not JSON at all)."""
    ctype = header(scope, b"content-type")
    if ctype is not None and b"json" not in ctype.split(b";")[0].lower():
        raise bad_request("request body must be a JSON object (Content-Type: application/json)")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        message, param = validation_message(list(exc.errors()))
        raise bad_request(message, param) from exc


async def send_json(send: Send, status: int, payload: dict[str, Any], headers: list | None = None) -> None:
    body = dumps(payload)
    await send({"type": "http.response.start", "status": status,
                "headers": _JSON_HEADERS + [(b"content-length", str(len(body)).encode())] + (headers or [])})
    await send({"type": "http.response.body", "body": body})


class CompletionsEndpoint:
    """One of the two completion endpoints (``chat`` picks which)."""

    def __init__(self, state: RouterState, chat: bool) -> None:
        self.state, self.chat = state, chat
        self.shape = Shape(chat=chat)
        self.model = ChatCompletionRequest if chat else CompletionRequest

    def count(self, path: str, outcome: str) -> None:
        m = self.state.metrics
        m.child(m.requests, path, outcome).inc()

    def check_sequences(self, body: Any) -> None:
        """prompts x n within the limit, before anything is tokenized."""
        limit = self.state.config.limits.max_sequences
        prompts = 1 if self.chat else len(body.prompts())
        if prompts * body.n > limit:
            param = "n" if body.n > 1 else ("messages" if self.chat else "prompt")
            raise LimitError(400, "too_many_sequences", f"this request asks for {prompts} prompt(s) x n={body.n} "
                             f"= {prompts * body.n} sequences; the limit is {limit} per request", param)

    def check_token_ids(self, body: Any) -> None:
        vocab = self.state.tokenizer.vocab_size
        bad = [t for t in body.stop_token_ids or () if t >= vocab]
        if bad:
            raise bad_request(f"stop_token_ids out of range [0, {vocab}): {bad[:5]}", "stop_token_ids")

    async def prompts(self, body: Any, body_bytes: int) -> list[list[int]]:
        """The request's prompts as token ids. A large one is tokenized in a thread (the
        tokenizer releases the GIL), so other requests and /health are served meanwhile."""
        if body_bytes > _TOKENIZE_INLINE_BYTES:
            return await asyncio.to_thread(self._prompts, body)
        return self._prompts(body)

    def _prompts(self, body: Any) -> list[list[int]]:
        tok = self.state.tokenizer
        if self.chat:
            try:
                return [tok.encode_chat([m.template_dict() for m in body.messages], body.add_generation_prompt)]
            except ValueError as exc:
                raise bad_request(str(exc), "messages") from exc
        prompts = []
        for p in body.prompts():
            if isinstance(p, str):
                prompts.append(tok.encode(p))
            else:
                bad = [t for t in p if not 0 <= t < tok.vocab_size]
                if bad:
                    raise bad_request(f"prompt token ids out of range [0, {tok.vocab_size}): {bad[:5]}", "prompt")
                prompts.append(list(p))
        if any(not p for p in prompts):
            raise bad_request("prompt must not be empty", "prompt")
        return prompts

    async def refuse(self, path: str, exc: RouterError, send: Send) -> None:
        """Answer with the error; a limit's refusal is counted by reason, and one that leaves
        the body unread (413, 408) closes the connection rather than read the rest."""
        self.count(path, _OUTCOMES.get(exc.status, "error"))
        extra = [(b"retry-after", b"1")] if exc.status == 429 else None
        if isinstance(exc, LimitError):
            m = self.state.metrics
            m.child(m.refused, exc.reason).inc()
            if exc.status in (408, 413):
                extra = [(b"connection", b"close")]
        await send_json(send, exc.status, exc.body(), extra)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if scope["method"] != "POST":
            await send_json(send, 405, error_body("Method Not Allowed"))
            return
        state = self.state
        watch = None
        limits = state.config.limits
        try:
            check_content_length(scope, limits.max_body_bytes)
            raw = await read_body(receive, limits.max_body_bytes, limits.body_timeout_s)
            body = parse(self.model, scope, raw)
            check_model(body.model, state.config.served_model_name)
            slo = request_slo(scope, state.config.slo)
            self.check_sequences(body)
            self.check_token_ids(body)
            prompts = await self.prompts(body, len(raw))
            watch = ClientWatch(receive)  # the body is read: receive() now only reports a disconnect
            result = await state.serving.serve(self.shape, body, prompts, state.max_model_len(), slo)
        except RouterError as exc:
            if watch is not None:
                watch.stop()
            await self.refuse(path, exc, send)
            return
        except ConnectionAbortedError:
            self.count(path, "client_closed")
            return
        except asyncio.CancelledError:
            if watch is None or not watch.absorb():
                raise
            self.count(path, "client_closed")  # left while queued or waiting for its answer
            return
        except Exception:
            if watch is not None:
                watch.stop()
            raise
        if isinstance(result, dict):
            watch.stop()
            self.count(path, "ok")
            await send_json(send, 200, result)
            return
        self.count(path, await stream_sse(result, watch, send))


class ClientWatch:
    """Cancels the handler's task when the client disconnects, while ``active`` (the server also
    says "disconnect" once a response is complete: that one must not cancel anything).

    ``stop()`` only deactivates the watch: the watcher ends by itself when the server reports the
    response complete. Cancelling it instead left a reference cycle per request (the
    CancelledError's traceback holds the watcher's frame, which holds the request's objects);
    collecting ~20,000 such objects took the router 4-40 ms at a time, its p99 latency."""

    def __init__(self, receive: Receive) -> None:
        self.gone, self.active = False, True
        self._task = asyncio.current_task()
        self._watcher = asyncio.ensure_future(self._watch(receive))  # held: the loop keeps tasks weakly

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self.active:
            self.gone = True
            self._task.cancel()  # it may be queued or waiting on a worker: stop it now

    def absorb(self) -> bool:
        """In ``except CancelledError``: whether the cancellation was this watch's (then it is
        handled here and must not propagate)."""
        if not self.gone:
            return False
        if hasattr(self._task, "uncancel"):  # Python >= 3.11
            self._task.uncancel()
        return True

    def stop(self) -> None:
        self.active = False


async def stream_sse(result: SSEStream, watch: ClientWatch, send: Send) -> str:
    """Send the SSE stream; returns the outcome (ok, error, client_closed). The events that are
    ready together go out as one write, the last one with the end of the body."""
    await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
    outcome = "client_closed"
    try:
        async for text in result.lines:
            last = text.endswith(_DONE)
            if text.startswith('data: {"error"'):
                outcome = "error"
            await send({"type": "http.response.body", "body": text.encode(), "more_body": not last})
            if last:
                break
        if outcome != "error":
            outcome = "ok"
    except asyncio.CancelledError:
        if not watch.absorb():
            raise
    except OSError:
        pass  # the client's connection broke while sending: the outcome stays client_closed
    finally:
        watch.stop()
        await result.close()
        if hasattr(result.lines, "aclose"):
            await result.lines.aclose()
    return outcome
