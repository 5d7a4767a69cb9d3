"""The prefill worker: computes a prompt's KV cache and first token, then ships the KV to the
decode worker the router chose.

A request's life here: queued (waiting for a prefill batch with room in the token budget and the
cache) -> prefilled (first token sampled; blocks held) -> transferring (KV sent layer by layer to
the decode worker) -> released (blocks freed, whether the transfer succeeded or failed; the
response says which). Prompts that share a prefix reuse its cached blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

from pydantic import BaseModel, Field
from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.engine import LLMEngine
from splitserve.engine.metrics import REQUESTS, observe_engine
from splitserve.engine.sampling import SamplingParams
from splitserve.engine.sequence import Sequence
from splitserve.engine.worker import (
    WorkerOptions,
    add_common_routes,
    error,
    kv_spec,
    lifespan,
    make_app,
)

log = logging.getLogger(__name__)


class PrefillRequest(BaseModel):
    request_id: str = Field(min_length=1)
    token_ids: list[int] = Field(min_length=1)
    sampling: dict = Field(default_factory=dict)
    decode_kv_endpoint: str = Field(min_length=3, description="host:port of the decode worker's KV receiver")


class PrefillWorker:
    """Owns the engine thread, the KV sender and the transfer threads of one prefill worker."""

    def __init__(self, options: WorkerOptions) -> None:
        from splitserve.kvtransfer import create_sender

        self.options = options
        self.engine = LLMEngine(options.engine)
        observe_engine(self.engine, "prefill")
        self.async_engine = AsyncEngine(self.engine)
        self.sender = create_sender(options.kv_backend, kv_spec(self.engine, options.kv_backend, options.generation))
        self.transfers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kv-send")

    def start(self) -> None:
        self.async_engine.start()

    def close(self) -> None:
        self.async_engine.shutdown()
        self.transfers.shutdown(wait=False, cancel_futures=True)
        self.sender.close()

    def _send(self, seq: Sequence, endpoint: str, first_token: int):
        runner, n = self.engine.runner, seq.num_prompt_tokens
        layers = (runner.layer_kv(seq.block_table, n, i) for i in range(runner.model_config.num_layers))
        return self.sender.send(seq.request_id, endpoint, layers, first_token, {"num_prompt_tokens": n})

    async def prefill(self, req: PrefillRequest) -> dict:
        """Prefill, transfer, release; raises ValueError (bad input) or TransferError."""
        seq = Sequence(req.request_id, req.token_ids, SamplingParams.from_dict(req.sampling), prefill_only=True)
        started = time.perf_counter()
        first = None
        async for out in self.async_engine.stream(seq, self.engine.add):
            first = out.token_id
        prefilled = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.transfers, self._send, seq, req.decode_kv_endpoint, first)
        finally:
            await self.async_engine.run(self.engine.release, seq)
        return {
            "request_id": req.request_id,
            "first_token": first,
            "num_prompt_tokens": seq.num_prompt_tokens,
            "num_cached_tokens": seq.num_cached_tokens,
            "prefill_ms": (prefilled - started) * 1e3,
            "transfer_ms": (time.perf_counter() - prefilled) * 1e3,
        }


def create_app(options: WorkerOptions):
    """Build the worker (loads the model now, so the port only opens once it can serve)."""
    from splitserve.kvtransfer import TransferError

    worker = PrefillWorker(options)
    app = make_app("prefill")
    state = SimpleNamespace(engine=worker.engine, options=options)
    app.router.lifespan_context = lifespan(worker, options, state)
    add_common_routes(app, state, "prefill")

    @app.post("/prefill")
    async def prefill(req: PrefillRequest):
        try:
            result = await worker.prefill(req)
        except TransferError as exc:
            REQUESTS.labels("prefill", "transfer_failed").inc()
            log.warning("request %s: KV transfer to %s failed: %s", req.request_id, req.decode_kv_endpoint, exc)
            return error(502, f"KV transfer failed: {exc}", reason=str(getattr(exc, "reason", "transfer")))
        except ValueError as exc:
            REQUESTS.labels("prefill", "bad_request").inc()
            return error(400, str(exc))
        REQUESTS.labels("prefill", "ok").inc()
        return result

    app.state.worker = worker
    return app
