"""What the prefill and decode workers share: command-line options, the engine they build,
the KV-transfer handshake spec, and the ``/health``, ``/load`` and ``/metrics`` routes."""

from __future__ import annotations

import argparse
import hashlib
import logging
from dataclasses import dataclass

from splitserve.engine.engine import EngineConfig, LLMEngine
from splitserve.engine.runner import RunnerConfig
from splitserve.engine.scheduler import SchedulerConfig

log = logging.getLogger(__name__)


def add_worker_args(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model folder (config.json, safetensors, tokenizer.json)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=default_port, help=f"HTTP port (default {default_port})")
    parser.add_argument("--advertise-host", default=None, help="address peers use to reach this worker (default: --host, or 127.0.0.1 for 0.0.0.0)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default: the checkpoint's")
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if present)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default 16)")
    parser.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache blocks (default: sized from memory)")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences per batch (default 64)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192, help="prompt tokens per prefill batch (default 8192)")
    parser.add_argument("--chunked-prefill", action="store_true", help="mix prompt chunks into decode steps (the colocated baseline)")
    parser.add_argument("--kv-backend", default="tcp", help="KV transfer backend (default tcp)")
    parser.add_argument("--generation", default="", help="serving generation: workers of different generations never pair")
    parser.add_argument("--redis-url", default=None, help="announce this worker in a Redis registry (optional)")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for the decode step (debugging)")
    parser.add_argument("--random-weights", action="store_true", help="random weights of the model's shape (timing only)")


@dataclass(frozen=True)
class WorkerOptions:
    role: str
    engine: EngineConfig
    host: str
    port: int
    advertise_host: str
    kv_backend: str
    generation: str
    redis_url: str | None
    kv_port: int = 0
    kv_timeout: float = 30.0

    @property
    def url(self) -> str:
        return f"http://{self.advertise_host}:{self.port}"


def options_from_args(args: argparse.Namespace, role: str) -> WorkerOptions:
    engine = EngineConfig(
        RunnerConfig(
            model_dir=args.model,
            dtype=args.dtype,
            device=args.device,
            block_size=args.block_size,
            num_kv_blocks=args.num_kv_blocks,
            max_model_len=args.max_model_len,
            random_weights=args.random_weights,
            cuda_graphs=not args.enforce_eager,
            max_num_seqs=args.max_num_seqs,
        ),
        SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            chunked_prefill=args.chunked_prefill,
        ),
    )
    advertise = args.advertise_host or ("127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host)
    return WorkerOptions(
        role=role,
        engine=engine,
        host=args.host,
        port=args.port,
        advertise_host=advertise,
        kv_backend=args.kv_backend,
        generation=args.generation,
        redis_url=args.redis_url,
        kv_port=getattr(args, "kv_port", 0),
        kv_timeout=getattr(args, "kv_timeout", 30.0),
    )


def fingerprint(engine: LLMEngine, generation: str) -> str:
    """Model architecture + serving generation: what must match for two workers to pair."""
    blob = f"{engine.runner.model_config.fingerprint()}:{generation}".encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def kv_spec(engine: LLMEngine, backend: str, generation: str):
    from splitserve.engine.config import dtype_name
    from splitserve.kvtransfer import KVSpec

    mc = engine.runner.model_config
    return KVSpec(
        model_fingerprint=fingerprint(engine, generation),
        dtype=dtype_name(engine.runner.dtype),
        num_layers=mc.num_layers,
        num_kv_heads=mc.num_kv_heads,
        head_dim=mc.head_dim,
        block_size=engine.runner.block_size,
        backend=backend,
    )


def add_common_routes(app, state, role: str) -> None:
    """``/health``, ``/load`` and ``/metrics``; ``state`` has ``engine``, ``options`` and, on
    decode, ``kv_endpoint``."""
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "role": role,
            "model": state.options.engine.runner.model_dir,
            "kv_endpoint": getattr(state, "kv_endpoint", None),
            "fingerprint": fingerprint(state.engine, state.options.generation),
        }

    @app.get("/load")
    async def load() -> dict:
        return {"role": role, **state.engine.load()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


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
        return JSONResponse({"error": f"invalid request: {reasons}"}, status_code=400)

    return app


def error(status: int, message: str, **extra):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message, **extra}, status_code=status)


def lifespan(worker, options: WorkerOptions, state):
    """Start ``worker`` (its engine thread) with the app, announce it in Redis when configured
    (so routers find it; the key expires if this process dies), and undo both on shutdown."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def run(_app):
        worker.start()
        heartbeat = None
        if options.redis_url:
            from splitserve.router.registry import start_heartbeat

            heartbeat = start_heartbeat(options.redis_url, {
                "url": options.url,
                "role": options.role,
                "model": options.engine.runner.model_dir,
                "kv_endpoint": getattr(state, "kv_endpoint", None),
                "fingerprint": fingerprint(state.engine, options.generation),
            })
        try:
            yield
        finally:
            if heartbeat is not None:
                heartbeat.stop()
            worker.close()

    return run
