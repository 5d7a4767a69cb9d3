"""What the prefill and decode workers share at run time: the engine in its thread with its
metrics, the ``/health``, ``/load``, ``/drain`` and ``/metrics`` routes, the internal-secret
guard, the announcement in the registry (``splitserve.discovery``) and the server loop.

A worker's life: options -> secret read -> model loaded and warmed up (``EngineWorker``) -> app
built with the common routes and its role's own (``splitserve.prefill.server`` or
``splitserve.decode.server``) -> serving: engine thread started, announced by heartbeat ->
draining (``/drain``: out of the registry, finishing what it has) -> stopped (heartbeat key
deleted, engine thread joined)."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from splitserve.engine.engine import LLMEngine
from splitserve.engine.kv_spec import fingerprint
from splitserve.protocol import DrainReply, ErrorReply, Health, InvalidMessage
from splitserve.trust import (
    InternalAuthMiddleware,
    InternalSecret,
    load_internal_secret,
    warn_unauthenticated,
)
from splitserve.worker.options import WorkerOptions

if TYPE_CHECKING:
    from splitserve.discovery.registry import Heartbeat

log = logging.getLogger(__name__)


class EngineWorker:
    """An engine in its own thread, with metrics under the worker's role: what both worker kinds
    are built on. The common routes read it: ``kv_endpoint`` (where a decode worker's KV receiver
    listens; None on prefill), ``draining`` and the registry ``heartbeat`` (None without Redis or
    once drained)."""

    kv_endpoint: str | None = None

    def __init__(self, options: WorkerOptions) -> None:
        from splitserve.engine.async_engine import AsyncEngine
        from splitserve.worker.metrics import observe_engine

        self.options = options
        self.secret = worker_secret(options)  # before the model loads: a bad path fails fast
        from splitserve.engine.warmup import warm_up

        self.engine = LLMEngine(options.engine)
        warm_up(self.engine)  # before metrics observe it and before /health can answer
        observe_engine(self.engine, options.role)
        self.async_engine = AsyncEngine(self.engine)
        self.draining = False
        self.heartbeat: Heartbeat | None = None

    def start(self) -> None:
        self.async_engine.start()

    def close(self) -> None:
        self.async_engine.shutdown()


def worker_secret(options: WorkerOptions) -> InternalSecret | None:
    """The internal secret this worker proves and demands (HTTP header, KV handshake, registry
    MAC); without one, a loud warning: its ports then trust anyone who can connect."""
    secret = load_internal_secret(options.internal_secret_file)
    if secret is None:
        warn_unauthenticated(f"{options.role} worker")
    return secret


def guard(app, worker: EngineWorker) -> None:
    """Refuse every request without the router's internal header (401), except ``/health``
    (probes carry no credentials) and, with ``--public-metrics``, ``/metrics``."""
    if worker.secret is None:
        return
    from splitserve.worker.metrics import REQUESTS

    role = worker.options.role
    open_paths = {"/health", "/metrics"} if worker.options.public_metrics else {"/health"}
    app.add_middleware(InternalAuthMiddleware, secret=worker.secret, open_paths=open_paths,
                       on_reject=lambda _path: REQUESTS.labels(role, "unauthorized").inc())


def worker_app(worker: EngineWorker):
    """The app of one worker, before its role adds its own routes: 400s for bad bodies, the
    common routes, the guard, and a lifespan that runs the engine thread and the heartbeat."""
    app = make_app(worker.options.role)
    app.router.lifespan_context = lifespan(worker)
    add_common_routes(app, worker)
    guard(app, worker)
    app.state.worker = worker
    return app


def add_common_routes(app, worker: EngineWorker) -> None:
    """``/health``, ``/load``, ``/drain`` and ``/metrics``."""
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    role = worker.options.role

    @app.get("/health")
    async def health() -> dict:
        return identity(worker).to_json()

    @app.get("/load")
    async def load() -> dict:
        from splitserve.kvtransfer.metrics import peer_report

        return replace(worker.engine.load(), role=role, draining=worker.draining, kv_peers=tuple(peer_report())).to_json()

    @app.post("/drain")
    async def drain() -> dict:
        """The pod is terminating (preStop: ``splitserve drain``): leave the registry now and
        tell routers (``/load``'s ``draining``) to send nothing new, while what runs finishes.
        Kubernetes' own removal from the Service does not reach routers that find workers
        through Redis."""
        if not worker.draining:
            log.info("%s worker draining: no new requests; finishing the ones it has", role)
        worker.draining = True
        heartbeat, worker.heartbeat = worker.heartbeat, None
        if heartbeat is not None:  # deletes its key; joins its thread: not on the event loop
            await asyncio.to_thread(heartbeat.stop)
        return DrainReply().to_json()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def identity(worker: EngineWorker) -> Health:
    """Who this worker is: its ``/health`` answer and its registry entry."""
    options = worker.options
    return Health(options.role, options.engine.runner.model_dir, worker.kv_endpoint,
                  fingerprint(worker.engine, options.generation))


async def read_message(request, message_type: Any) -> Any:
    """The request's JSON body as ``message_type`` (a protocol request), or InvalidMessage."""
    try:
        data = json.loads(await request.body())
    except ValueError as exc:
        raise InvalidMessage(f"invalid request: body is not JSON: {exc}") from None
    return message_type.from_json(data)


def serve(app, options: WorkerOptions) -> None:
    import uvicorn

    log.info("%s worker listening on http://%s:%d", options.role, options.host, options.port)
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning", timeout_graceful_shutdown=5)


def make_app(role: str):
    """A FastAPI app whose validation errors are 400s with a reason (not FastAPI's 422)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    app = FastAPI(title=f"splitserve {role} worker")

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse(ErrorReply(f"invalid request: {reasons}").to_json(), status_code=400)

    return app


def error(status: int, message: str, reason: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(ErrorReply(message, reason).to_json(), status_code=status)


def lifespan(worker: EngineWorker):
    """Start ``worker`` (its engine thread) with the app, announce it in Redis when configured
    (so routers find it; the key expires if this process dies), and undo both on shutdown."""
    from contextlib import asynccontextmanager

    options = worker.options

    @asynccontextmanager
    async def run(_app):
        worker.start()
        if options.redis_url:
            from splitserve.discovery.registry import redis_password, start_heartbeat

            worker.heartbeat = start_heartbeat(  # /drain stops it early
                options.redis_url, identity(worker).announcement(options.url),
                namespace=options.redis_namespace, secret=worker.secret,
                password=redis_password(options.redis_password_file))
        try:
            yield
        finally:
            if worker.heartbeat is not None:
                worker.heartbeat.stop()
            worker.close()

    return run
