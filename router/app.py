"""The router's OpenAI-compatible HTTP app.

``create_app(config)`` builds everything from the config: the tokenizer (at once, so a bad model
folder fails at start-up), and on start-up the worker client, registry, pool poller, policy and
dispatcher. Every error a client sees is OpenAI's JSON shape, with 400 for bad input (including
malformed JSON), 401 without the API key, 404 for an unknown model, 429 when shed, 502/503 when
workers fail.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from splitserve.router.auth import APIKeyMiddleware
from splitserve.router.config import SLO, RouterConfig
from splitserve.router.dispatch import Dispatcher
from splitserve.router.errors import RouterError, bad_request, error_body
from splitserve.router.metrics import RouterMetrics
from splitserve.router.policy import LatencyModel, build_policy
from splitserve.router.pool import WorkerPool
from splitserve.router.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    check_model,
    validation_message,
)
from splitserve.router.registry import RedisRegistry, Registry, StaticRegistry
from splitserve.router.serving import Serving, Shape
from splitserve.router.streaming import DisconnectAwareStreamingResponse
from splitserve.router.tokenizer import RouterTokenizer
from splitserve.router.workers import WorkerClient
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("splitserve.router")

SLO_TTFT_HEADER = "x-slo-ttft-ms"
SLO_TPOT_HEADER = "x-slo-tpot-ms"


def model_max_len(model_dir: str | Path) -> int:
    """Context length from config.json (max_position_embeddings)."""
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    value = cfg.get("max_position_embeddings") or cfg.get("max_seq_len")
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{path} has no usable max_position_embeddings")
    return value


def request_slo(request: Request, default: SLO) -> SLO:
    """Per-request targets from headers, else the configured ones."""
    values = {}
    for header, field in ((SLO_TTFT_HEADER, "ttft_ms"), (SLO_TPOT_HEADER, "tpot_ms")):
        raw = request.headers.get(header)
        if raw is None:
            continue
        try:
            values[field] = float(raw)
        except ValueError as exc:
            raise bad_request(f"header {header} must be a number of milliseconds, got {raw!r}") from exc
    if not values:
        return default
    try:
        return SLO(values.get("ttft_ms", default.ttft_ms), values.get("tpot_ms", default.tpot_ms))
    except ValueError as exc:
        raise bad_request(str(exc)) from exc


def _registry(config: RouterConfig) -> Registry:
    static = StaticRegistry(config.prefill_urls, config.decode_urls)
    if config.redis_url:
        return RedisRegistry(config.redis_url, config.redis_namespace, static)
    return static


class _State:
    """Everything the handlers share; built in the app's lifespan."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.tokenizer = RouterTokenizer(config.model_dir)
        self.config_max_len = model_max_len(config.model_dir)
        self.latency_model = LatencyModel.load(config.latency_model_path) if config.latency_model_path else None
        self.metrics = RouterMetrics()
        self.policy = build_policy(config.policy, self.latency_model)
        self.pool: WorkerPool | None = None
        self.serving: Serving | None = None
        self.client: WorkerClient | None = None

    def max_model_len(self) -> int:
        worker_len = self.pool.max_model_len() if self.pool else None
        return min(self.config_max_len, worker_len) if worker_len else self.config_max_len

    async def start(self, registry: Registry | None) -> None:
        c = self.config
        self.client = WorkerClient(c.connect_timeout_s, c.prefill_timeout_s, c.stream_idle_timeout_s)
        self.pool = WorkerPool(registry or _registry(c), self.client, c.poll_interval_s)
        await self.pool.start()
        dispatcher = Dispatcher(c, self.pool, self.client, self.policy, self.metrics)
        self.serving = Serving(self.tokenizer, dispatcher, c.served_model_name)

    async def stop(self) -> None:
        if self.pool is not None:
            await self.pool.stop()
            await self.pool.registry.aclose()
        if self.client is not None:
            await self.client.aclose()


def create_app(config: RouterConfig, registry: Registry | None = None) -> FastAPI:
    """The router app. ``registry`` overrides the one the config implies (tests, embedding)."""
    state = _State(config)

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

    v1 = APIRouter(prefix="/v1")
    app = FastAPI(title="splitserve router", lifespan=lifespan)
    if config.api_key:
        app.add_middleware(
            APIKeyMiddleware,
            api_key=config.api_key,
            on_reject=lambda path: state.metrics.requests.labels(path, "unauthorized").inc(),
        )
    app.state.router = state

    @app.exception_handler(RouterError)
    async def _router_error(request: Request, exc: RouterError) -> JSONResponse:
        outcome = {400: "bad_request", 401: "unauthorized", 404: "not_found", 429: "shed"}.get(exc.status, "error")
        state.metrics.requests.labels(request.url.path, outcome).inc()
        headers = {"retry-after": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        state.metrics.requests.labels(request.url.path, "bad_request").inc()
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(str(exc.detail), code=code), status_code=exc.status_code)

    async def respond(request: Request, shape: Shape, body, prompts: list[list[int]]) -> Response:  # noqa: ANN001
        slo = request_slo(request, config.slo)
        result = await state.serving.serve(shape, body, prompts, state.max_model_len(), slo)
        path = request.url.path
        if isinstance(result, dict):
            state.metrics.requests.labels(path, "ok").inc()
            return JSONResponse(result)

        async def counted() -> AsyncIterator[str]:
            outcome = "client_closed"
            try:
                async for line in result.lines:
                    if line.startswith('data: {"error"'):
                        outcome = "error"
                    yield line
                if outcome != "error":
                    outcome = "ok"
            finally:
                state.metrics.requests.labels(path, outcome).inc()

        return DisconnectAwareStreamingResponse(
            counted(), "text/event-stream", on_close=result.close, headers={"cache-control": "no-cache"}
        )

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model, config.served_model_name)
        prompts = []
        for p in body.prompts():
            if isinstance(p, str):
                prompts.append(state.tokenizer.encode(p))
            else:
                bad = [t for t in p if not 0 <= t < state.tokenizer.vocab_size]
                if bad:
                    raise bad_request(f"prompt token ids out of range [0, {state.tokenizer.vocab_size}): {bad[:5]}", "prompt")
                prompts.append(list(p))
        if any(not p for p in prompts):
            raise bad_request("prompt must not be empty", "prompt")
        return await respond(request, Shape(chat=False), body, prompts)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model, config.served_model_name)
        try:
            ids = state.tokenizer.encode_chat([m.template_dict() for m in body.messages], body.add_generation_prompt)
        except ValueError as exc:
            raise bad_request(str(exc), "messages") from exc
        return await respond(request, Shape(chat=True), body, [ids])

    @v1.get("/models")
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

    app.include_router(v1)

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
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    state_created = time.time()
    return app
