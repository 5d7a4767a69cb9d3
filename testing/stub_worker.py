"""Stub prefill and decode workers that speak the Worker HTTP API with no model behind them.

For router tests and ``bench/lab/router.py``: they answer instantly (or after a set delay), emit
deterministic tokens, and can be told to fail in the ways real workers do (prefill refuses,
decode dies mid-stream). Every message is the real workers' (``splitserve.protocol``). The KV
hand-off is imitated over HTTP: the prefill stub POSTs its ``PrefillResult`` to ``/stub_kv`` at
the decode stub's ``kv_endpoint``, and a decode stub that is not told to recompute waits for it,
like a real decode worker waits for the KV.

Run one: ``python -m splitserve.testing.stub_worker --role decode --port 9001``.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

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
from splitserve.router.completions import read_body, send_json


@dataclass
class StubBehaviour:
    """What the stub does; mutable so a test can change it while the server runs."""

    role: str = "decode"
    kv_endpoint: str | None = None  # decode: "host:port" of this same server
    output_token_ids: list[int] = field(default_factory=lambda: [10, 11, 12, 13, 14, 15, 16, 17])
    eos_token_id: int | None = None
    token_delay_s: float = 0.0
    tokens_per_chunk: int = 1
    max_model_len: int = 1024
    prefill_status: int = 200  # != 200: prefill refuses with this status
    prefill_delay_s: float = 0.0  # prefill answers (and sends the KV) after this long
    die_after_tokens: int | None = None  # decode: break the connection after this many tokens
    # decode: behave like a greedy model, whose answer to a prompt that ends with the first k
    # output tokens is the rest of the output (what a sequence resumed by the router asks)
    continues_prompt: bool = False
    dead: bool = False  # every endpoint answers 500
    wait_for_kv_s: float = 5.0
    load: dict[str, int] = field(default_factory=dict)  # LoadReport fields to report instead
    load_status: int = 200  # != 200: /load answers this error (the worker looks down to the router)
    stop_strings_from: Any = None  # a RouterTokenizer: apply stop strings like the engine does
    requests: list[dict[str, Any]] = field(default_factory=list)  # the bodies received, as sent
    aborted: list[str] = field(default_factory=list)


def create_stub_app(b: StubBehaviour) -> StubApp:
    return StubApp(b)


class StubApp:
    """The stub as a plain ASGI app: the load side of bench/lab/router.py, so it must cost less per
    request than the router it measures (as a FastAPI app with an HTTP middleware the decode stub
    spent ~3x the router's CPU per request)."""

    def __init__(self, b: StubBehaviour) -> None:
        self.b = b
        self.kv_events: dict[str, asyncio.Event] = {}
        self.running = 0
        self.pool: Any = None  # http1.Pool for the KV hand-off, made on first use (in the loop)
        self.routes = {
            ("GET", "/health"): self.health,
            ("GET", "/load"): self.load,
            ("POST", "/stub_kv"): self.stub_kv,
            ("POST", "/prefill"): self.prefill,
            ("POST", "/generate"): self.generate,
        }

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if self.b.dead:
            await send_json(send, 500, ErrorReply("stub is dead").to_json())
            return
        handler = self.routes.get((scope["method"], scope["path"]))
        if handler is None:
            await send_json(send, 404, ErrorReply(f"no route {scope['method']} {scope['path']}").to_json())
            return
        try:
            body = loads(await read_body(receive)) if scope["method"] == "POST" else {}
        except ValueError as exc:
            await send_json(send, 400, ErrorReply(f"body is not JSON: {exc}").to_json())
            return
        await handler(body, receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.pool is not None:
                    self.pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def event(self, rid: str) -> asyncio.Event:
        return self.kv_events.setdefault(rid, asyncio.Event())

    async def health(self, _body: dict, _receive: Any, send: Any) -> None:
        b = self.b
        await send_json(send, 200, Health(b.role, "stub", b.kv_endpoint, "stub").to_json())

    async def load(self, _body: dict, _receive: Any, send: Any) -> None:
        b = self.b
        if b.load_status != 200:
            await send_json(send, b.load_status, ErrorReply("stub /load fails").to_json())
            return
        report = LoadReport(running=self.running, free_blocks=1000, total_blocks=1000, block_size=16,
                            max_model_len=b.max_model_len, role=b.role)
        await send_json(send, 200, replace(report, **b.load).to_json())

    async def stub_kv(self, body: dict, _receive: Any, send: Any) -> None:
        self.event(PrefillResult.from_json(body).request_id).set()
        await send_json(send, 200, {})

    async def prefill(self, body: dict, _receive: Any, send: Any) -> None:
        b = self.b
        req = await _message(PrefillRequest, body, send)
        if req is None:
            return
        b.requests.append(body)
        if b.prefill_status != 200:
            await send_json(send, b.prefill_status, ErrorReply("stub prefill refuses", "stub").to_json())
            return
        if b.prefill_delay_s:
            await asyncio.sleep(b.prefill_delay_s)
        if self.pool is None:
            self.pool = http1.Pool(connect_timeout_s=5.0)
        host, _, port = req.decode_kv_endpoint.rpartition(":")
        result = PrefillResult(req.request_id, b.output_token_ids[0], len(req.token_ids), prefill_ms=0.0,
                               transfer_ms=0.0)
        payload = dumps(result.to_json())
        for attempt in (1, 2):  # idempotent: once more if a kept-alive connection was just closed
            try:
                resp = await self.pool.post(host, int(port), "/stub_kv", payload, 30.0)
                try:
                    await resp.read(30.0)
                finally:
                    resp.close()
                break
            except OSError:
                if attempt == 2:
                    raise
        await send_json(send, 200, result.to_json())

    async def generate(self, body: dict, receive: Any, send: Any) -> None:
        """The NDJSON stream; a client that disconnects cancels it (recorded in ``aborted``)."""
        req = await _message(GenerateRequest, body, send)
        if req is None:
            return
        rid = req.request_id
        self.b.requests.append(body)
        current = asyncio.current_task()
        gone = streaming = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            if streaming:
                gone = True
                current.cancel()

        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/x-ndjson")]})
        watcher = asyncio.ensure_future(watch())
        streaming = True
        lines = self._lines(req)
        try:
            async for line in lines:
                await send({"type": "http.response.body", "body": line, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            if rid not in self.b.aborted:
                self.b.aborted.append(rid)
            if hasattr(current, "uncancel"):
                current.uncancel()
        finally:
            streaming = False
            watcher.cancel()
            await lines.aclose()

    async def _wait_kv(self, rid: str) -> bool:
        event = self.event(rid)
        if event.is_set():
            return True
        try:
            if hasattr(asyncio, "timeout"):  # Python >= 3.11: no extra task per wait
                async with asyncio.timeout(self.b.wait_for_kv_s):
                    await event.wait()
            else:
                await asyncio.wait_for(event.wait(), self.b.wait_for_kv_s)
        except TimeoutError:  # (distinct classes before Python 3.11)
            return False
        return True

    async def _lines(self, req: GenerateRequest) -> AsyncIterator[bytes]:
        b = self.b
        rid = req.request_id
        max_tokens = req.sampling.max_tokens
        stops = list(req.sampling.stop)
        self.running += 1
        try:
            if not req.recompute and not await self._wait_kv(rid):
                yield TokenLine.failure("KV never arrived").encode()
                return
            out: list[int] = []
            pending: list[int] = []
            i = _continued(req.token_ids, b.output_token_ids) if b.continues_prompt else 0
            while True:
                tok = b.output_token_ids[i % len(b.output_token_ids)]
                i += 1
                if b.die_after_tokens is not None and len(out) >= b.die_after_tokens:
                    b.dead = True  # a dead worker stays dead: health polls fail too
                    raise ConnectionAbortedError("stub decode dies mid-stream")
                out.append(tok)
                pending.append(tok)
                finish, hit = _finish(b, out, tok, max_tokens, stops)
                if finish or len(pending) >= b.tokens_per_chunk:
                    yield TokenLine(pending, finish, hit).encode()
                    pending = []
                if finish:
                    return
                if b.token_delay_s:
                    await asyncio.sleep(b.token_delay_s)
        except asyncio.CancelledError:
            if rid not in b.aborted:
                b.aborted.append(rid)
            raise
        finally:
            self.running -= 1
            self.kv_events.pop(rid, None)


async def _message(cls: Any, body: dict, send: Any) -> Any:
    """``body`` as the request ``cls``, or None once the sender got the real workers' 400."""
    try:
        return cls.from_json(body)
    except ValueError as exc:
        await send_json(send, 400, ErrorReply(str(exc)).to_json())
        return None


def _continued(prompt: list[int], output: list[int]) -> int:
    """How many tokens of the (cycled) ``output`` the prompt already ends with."""
    for k in range(len(prompt), 0, -1):
        if prompt[-k:] == [output[j % len(output)] for j in range(k)]:
            return k
    return 0


def _finish(
    b: StubBehaviour, out: list[int], tok: int, max_tokens: int, stops: list[str]
) -> tuple[str | None, str | None]:
    if b.eos_token_id is not None and tok == b.eos_token_id:
        return "stop", None
    if stops and b.stop_strings_from is not None:
        text = b.stop_strings_from.decode(out, skip_special_tokens=False)
        before = b.stop_strings_from.decode(out[:-1], skip_special_tokens=False)
        for s in stops:
            if s in text and s not in before:
                return "stop", s
    if len(out) >= max_tokens:
        return "length", None
    return None, None


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(
        description="stub splitserve worker (no model) for router tests and benches"
    )
    ap.add_argument("--role", choices=["prefill", "decode"], required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--token-delay", type=float, default=0.0)
    ap.add_argument("--tokens", type=int, nargs="*", default=None)
    ap.add_argument("--kv-wait", type=float, default=5.0,
                    help="decode: seconds to wait for the prefill stub's KV before failing (default 5)")
    ap.add_argument("--continues", action="store_true",
                    help="decode: continue a prompt that ends with the first output tokens, as a resumed sequence asks")
    args = ap.parse_args(argv)
    b = StubBehaviour(role=args.role, token_delay_s=args.token_delay, wait_for_kv_s=args.kv_wait,
                      continues_prompt=args.continues)
    if args.tokens:
        b.output_token_ids = args.tokens
    if args.role == "decode":
        b.kv_endpoint = f"{args.host}:{args.port}"
    # Keep-alive longer than the clients' (a bench at saturation can leave a connection idle for
    # seconds); no access log.
    uvicorn.run(create_stub_app(b), host=args.host, port=args.port, log_level="warning",
                access_log=False, timeout_keep_alive=30, backlog=4096)


if __name__ == "__main__":
    main()


class ServerThread:
    """Runs an ASGI app under uvicorn on a free port in a background thread (tests, benches).

    ``with ServerThread(app) as s: s.url`` - the server is up on entry and shut down on exit.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        """``options``: more uvicorn.Config settings (for the router: serve.server_options)."""
        import socket

        import uvicorn

        self._sock = socket.socket()
        self._sock.bind((host, port))
        self.host, self.port = host, self._sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **options))
        self._thread: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        import threading
        import time

        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
