"""Stub prefill and decode workers that speak the Worker HTTP API with no model behind them.

For router tests and ``bench/router.py``: they answer instantly (or after a set delay), emit
deterministic tokens, and can be told to fail in the ways real workers do (prefill refuses,
decode dies mid-stream). The KV hand-off is imitated over HTTP: the prefill stub POSTs
``/stub_kv`` to the decode stub's ``kv_endpoint``, and a decode stub that is not told to
recompute waits for it, like a real decode worker waits for the KV.

Run one: ``python -m splitserve.router.stub_worker --role decode --port 9001``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from splitserve.router.streaming import DisconnectAwareStreamingResponse


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
    die_after_tokens: int | None = None  # decode: break the connection after this many tokens
    dead: bool = False  # every endpoint answers 500
    wait_for_kv_s: float = 5.0
    load: dict[str, int] = field(default_factory=dict)
    stop_strings_from: Any = None  # a RouterTokenizer: apply stop strings like the engine does
    requests: list[dict[str, Any]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)


def create_stub_app(b: StubBehaviour) -> FastAPI:
    from contextlib import asynccontextmanager

    kv_events: dict[str, asyncio.Event] = {}
    running = {"n": 0}
    clients: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        if "http" in clients:
            await clients.pop("http").close()

    app = FastAPI(lifespan=lifespan)

    def event(rid: str) -> asyncio.Event:
        return kv_events.setdefault(rid, asyncio.Event())

    @app.middleware("http")
    async def _dead(request: Request, call_next):  # noqa: ANN001, ANN202
        if b.dead:
            return JSONResponse({"error": "stub is dead"}, status_code=500)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "role": b.role,
            "model": "stub",
            "kv_endpoint": b.kv_endpoint,
            "fingerprint": "stub",
        }

    @app.get("/load")
    async def load() -> dict:
        base = {
            "role": b.role,
            "waiting": 0,
            "running": running["n"],
            "queued_prompt_tokens": 0,
            "free_blocks": 1000,
            "total_blocks": 1000,
            "block_size": 16,
            "max_model_len": b.max_model_len,
        }
        return base | b.load

    @app.post("/stub_kv")
    async def stub_kv(body: dict) -> dict:
        event(body["request_id"]).set()
        return {"ok": True}

    @app.post("/prefill")
    async def prefill(body: dict) -> JSONResponse:
        b.requests.append(body)
        if b.prefill_status != 200:
            return JSONResponse(
                {"error": "stub prefill refuses", "reason": "stub"}, status_code=b.prefill_status
            )
        import aiohttp

        if "http" not in clients:  # one pooled client per app, made on first use (in its loop)
            clients["http"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        url = f"http://{body['decode_kv_endpoint']}/stub_kv"
        for attempt in (1, 2):  # idempotent: once more if a kept-alive connection was just closed
            try:
                async with clients["http"].post(url, json={"request_id": body["request_id"]}) as resp:
                    await resp.read()
                break
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                if attempt == 2:
                    raise
        return JSONResponse(
            {
                "request_id": body["request_id"],
                "first_token": b.output_token_ids[0],
                "num_prompt_tokens": len(body["token_ids"]),
                "num_cached_tokens": 0,
                "prefill_ms": 0.0,
                "transfer_ms": 0.0,
            }
        )

    @app.post("/generate")
    async def generate(body: dict) -> DisconnectAwareStreamingResponse:
        b.requests.append(body)
        rid = body["request_id"]
        max_tokens = body["sampling"]["max_tokens"]
        stops = body["sampling"].get("stop") or []

        async def lines() -> AsyncIterator[str]:
            running["n"] += 1
            try:
                if not body.get("recompute"):
                    try:
                        await asyncio.wait_for(event(rid).wait(), b.wait_for_kv_s)
                    except asyncio.TimeoutError:
                        yield (
                            json.dumps({"error": "KV never arrived", "finish_reason": "error"})
                            + "\n"
                        )
                        return
                out: list[int] = []
                pending: list[int] = []
                i = 0
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
                        yield (
                            json.dumps(
                                {"token_ids": pending, "finish_reason": finish, "stop_string": hit}
                            )
                            + "\n"
                        )
                        pending = []
                    if finish:
                        return
                    if b.token_delay_s:
                        await asyncio.sleep(b.token_delay_s)
            except asyncio.CancelledError:
                b.aborted.append(rid)
                raise
            finally:
                running["n"] -= 1
                kv_events.pop(rid, None)

        return DisconnectAwareStreamingResponse(lines(), "application/x-ndjson")

    return app


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
    args = ap.parse_args(argv)
    b = StubBehaviour(role=args.role, token_delay_s=args.token_delay, wait_for_kv_s=args.kv_wait)
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

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        import uvicorn

        self._sock = socket.socket()
        self._sock.bind((host, port))
        self.host, self.port = host, self._sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
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
