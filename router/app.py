"""The router's ASGI application: everything a request meets, built from the config.

``create_app(config)`` builds everything from the config: the tokenizer (at once, so a bad model
folder fails at start-up), and on start-up the worker client, registry, pool poller, policy and
dispatcher. Every error a client sees is OpenAI's JSON shape, with 400 for bad input (including
malformed JSON), 401 without the API key, 404 for an unknown model, 429 when shed, 502/503 when
workers fail.

The two completion endpoints, which every request goes through, are plain ASGI handlers
(completions.py) that ``RouterApp`` calls before FastAPI's middleware and routing; FastAPI serves the
rest (/v1/models, /health, /metrics, errors for unknown paths).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from splitserve.discovery.registry import RedisRegistry, Registry, StaticRegistry, redis_password
from splitserve.router.auth import APIKeyMiddleware
from splitserve.router.choices import Serving
from splitserve.router.completions import CompletionsEndpoint
from splitserve.router.config import RouterConfig
from splitserve.router.dispatch import Dispatcher
from splitserve.router.errors import error_body
from splitserve.router.kv_links import kv_links
from splitserve.router.metrics import RouterMetrics
from splitserve.router.policy import LatencyModel, build_policy
from splitserve.router.pool import WorkerPool
from splitserve.router.tokenizer import RouterTokenizer
from splitserve.router.workers import WorkerClient
from splitserve.trust import auth_headers, load_internal_secret, warn_unauthenticated
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("splitserve.router")

def model_max_len(model_path: str | Path) -> int:
    """Context length from the model's config (max_position_embeddings)."""
    from splitserve.modelfiles.read import read_config

    try:
        cfg = read_config(model_path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the config of {model_path}: {exc}") from exc
    value = cfg.get("max_position_embeddings") or cfg.get("max_seq_len")
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"the config of {model_path} has no usable max_position_embeddings")
    return value


def _registry(config: RouterConfig, state: RouterState) -> Registry:
    static = StaticRegistry(config.prefill_urls, config.decode_urls)
    if config.redis_url:
        return RedisRegistry(
            config.redis_url, config.redis_namespace, static, secret=state.secret,
            password=redis_password(config.redis_password_file),
            on_forged=lambda _key: state.metrics.registry_forged.inc(),
        )
    return static


def guarded_paths(config: RouterConfig) -> frozenset[str]:
    """Paths outside /v1/ that need the API key: /metrics unless public, the docs if served."""
    paths = set() if config.public_metrics else {"/metrics"}
    if config.docs:
        paths |= {"/docs", "/docs/oauth2-redirect", "/openapi.json"}
    return frozenset(paths)


class RouterState:
    """Everything the handlers share; built in the app's lifespan."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.secret = load_internal_secret(config.internal_secret_file)  # proven to every worker
        if self.secret is None:
            warn_unauthenticated("router")
        self.tokenizer = RouterTokenizer(config.model_dir)
        self.config_max_len = model_max_len(config.model_dir)
        self.latency_model = LatencyModel.load(config.latency_model_path) if config.latency_model_path else None
        self.metrics = RouterMetrics()
        self.policy = build_policy(config.policy_config or config.policy, self.latency_model)
        self.pool: WorkerPool | None = None
        self.serving: Serving | None = None
        self.client: WorkerClient | None = None

    def max_model_len(self) -> int:
        worker_len = self.pool.max_model_len() if self.pool else None
        return min(self.config_max_len, worker_len) if worker_len else self.config_max_len

    async def start(self, registry: Registry | None) -> None:
        c = self.config
        self.client = WorkerClient(c.connect_timeout_s, c.prefill_timeout_s, c.stream_idle_timeout_s,
                                   auth_headers(self.secret), c.poll_timeout_s)
        self.pool = WorkerPool(registry or _registry(c, self), self.client, c.poll_interval_s)
        pool = self.pool
        pool.on_change.add(lambda: self.metrics.observe_kv_links(
            kv_links(pool.role("prefill"), pool.role("decode"))))
        await self.pool.start()
        dispatcher = Dispatcher(c, self.pool, self.client, self.policy, self.metrics)
        self.serving = Serving(self.tokenizer, dispatcher, c.served_model_name)

    async def stop(self) -> None:
        if self.pool is not None:
            await self.pool.stop()
            await self.pool.registry.aclose()
        if self.client is not None:
            await self.client.aclose()


class RouterApp(FastAPI):
    """FastAPI, except that the paths in ``hot`` go straight to their ASGI handlers."""

    def __init__(self, hot: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hot = hot

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            handler = self._hot.get(scope["path"])
            if handler is not None:
                await handler(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(config: RouterConfig, registry: Registry | None = None) -> FastAPI:
    """The router app. ``registry`` overrides the one the config implies (tests, embedding)."""
    state = RouterState(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start(registry)
        log.info(
            "router serving %r with policy %s: %d prefill, %d decode workers",
            config.served_model_name, config.policy,
            len(state.pool.role("prefill")), len(state.pool.role("decode")),
        )
        try:
            yield
        finally:
            await state.stop()

    def on_reject(path: str) -> None:
        state.metrics.child(state.metrics.requests, path, "unauthorized").inc()

    def guarded(handler: Any) -> Any:
        return APIKeyMiddleware(handler, config.api_key, on_reject) if config.api_key else handler

    hot = {
        "/v1/completions": guarded(CompletionsEndpoint(state, chat=False)),
        "/v1/chat/completions": guarded(CompletionsEndpoint(state, chat=True)),
    }
    docs = {"docs_url": "/docs" if config.docs else None, "redoc_url": None,
            "openapi_url": "/openapi.json" if config.docs else None}
    app = RouterApp(hot, title="splitserve router", lifespan=lifespan, **docs)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key, on_reject=on_reject,
                           guarded=guarded_paths(config))
    app.state.router = state

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(str(exc.detail), code=code), status_code=exc.status_code)

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": config.served_model_name,
                    "object": "model",
                    "created": int(state_created),
                    "owned_by": "splitserve",
                    "root": config.model_dir,
                    "max_model_len": state.max_model_len(),
                }
            ],
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        pool = state.pool
        counts = {
            role: {"healthy": sum(w.healthy for w in pool.role(role)), "total": len(pool.role(role))}
            for role in ("prefill", "decode")
        }
        # Ready when a request can be served: a healthy decode worker, and a healthy prefill
        # worker unless there is no prefill pool (decode then computes prompts itself).
        ok = counts["decode"]["healthy"] > 0 and (counts["prefill"]["total"] == 0 or counts["prefill"]["healthy"] > 0)
        body = {"status": "ok" if ok else "unavailable", "role": "router", "model": config.served_model_name,
                "policy": config.policy, "workers": counts}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        state.metrics.worker_healthy.clear()  # workers that left the registry disappear
        for w in state.pool.workers.values():
            state.metrics.worker_healthy.labels(w.role, w.url).set(1 if w.healthy else 0)
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    state_created = time.time()
    return app
