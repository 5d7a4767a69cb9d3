"""The decode worker: receives a prompt's KV from a prefill worker and generates the rest.

A request's life here: reserved (blocks allocated for the prompt, so a full cache is refused up
front with 503) -> receiving (the KV receiver fills those blocks; a transfer that fails, stalls or
never starts ends the request within the transfer timeout) -> running (joins the decode batch
with the prefill worker's first token and its logprobs, both from the transfer's END) -> done.
With ``recompute`` the worker prefills the prompt itself: the fallback when no prefill worker can
serve. Tokens stream back as NDJSON lines.

Each request's blocks are held by a :class:`~splitserve.worker.block_lease.BlockLease` from
before the reserve until they are freed, once, however the request ends: finished, failed, or
cancelled at any await (the reserve, the wait for KV, the stream) and even when the response
body is never iterated (the client left before the headers went out: ``LeasedStream``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request  # (at module level: FastAPI resolves the annotation here)
from fastapi.responses import StreamingResponse
from splitserve.engine.block_manager import NoFreeBlocks
from splitserve.engine.engine import StepOutput
from splitserve.engine.sequence import Sequence
from splitserve.protocol import GenerateRequest, InvalidMessage, TokenLine
from splitserve.worker.block_lease import BlockLease, Stage
from splitserve.worker.handshake import kv_receiver
from splitserve.worker.metrics import REQUESTS
from splitserve.worker.options import WorkerOptions
from splitserve.worker.shell import (
    EngineWorker,
    error,
    read_message,
    worker_app,
)

log = logging.getLogger(__name__)


def _token_line(out: StepOutput) -> bytes:
    seq, done = out.seq, out.finished
    logprobs = None if out.logprobs is None else [out.logprobs]
    return TokenLine([out.token_id], seq.finish_reason if done else None, seq.stop_string if done else None,
                     logprobs).encode()


class DecodeWorker(EngineWorker):
    def __init__(self, options: WorkerOptions) -> None:
        super().__init__(options)
        self.receiver = kv_receiver(self.engine, options, self.secret)
        kv_port = int(self.receiver.endpoint.rsplit(":", 1)[1])
        self.kv_endpoint = f"{options.advertise_host}:{kv_port}"

    def start(self) -> None:
        super().start()
        log.info("decode worker: KV receiver at %s", self.kv_endpoint)

    def close(self) -> None:
        self.receiver.close()
        super().close()

    def lease(self, seq: Sequence) -> BlockLease:
        """The owner of ``seq``'s blocks: releasing aborts it in the engine (after any reserve
        sent before); stopping the receiver cancels its transfer."""
        return BlockLease(
            seq.request_id,
            release=lambda: self.async_engine.abort(seq),
            stop_receiver=lambda: self.receiver.cancel(seq.request_id),
        )

    async def reserve(self, seq: Sequence, lease: BlockLease) -> None:
        """Allocate blocks for the prompt's KV (NoFreeBlocks, ValueError). A caller cancelled
        here ends the lease, which frees them after the reserve has run."""
        lease.advance(Stage.RESERVING)
        await self.async_engine.run(self.engine.reserve, seq)
        lease.advance(Stage.RESERVED)

    async def generate(self, seq: Sequence, lease: BlockLease, recompute: bool) -> AsyncIterator[bytes]:
        """Stream the sequence's tokens; for a transferred prompt, blocks are already reserved."""
        try:
            if recompute:
                lease.advance(Stage.QUEUED)
                submit = self.engine.add
            else:
                result = await self._receive(seq, lease)
                lease.advance(Stage.RUNNING)
                submit = lambda s: self.engine.activate(s, result.first_token, result.first_logprobs)  # noqa: E731
            async for out in self.async_engine.stream(seq, submit):
                yield _token_line(out)
            lease.finish()
            REQUESTS.labels("decode", "ok").inc()
        except asyncio.CancelledError:
            lease.end(Stage.CANCELLED)
            REQUESTS.labels("decode", "client_gone").inc()
            raise
        except Exception as exc:
            lease.end(Stage.FAILED)
            REQUESTS.labels("decode", "failed").inc()
            log.warning("request %s failed: %s", seq.request_id, exc)
            yield TokenLine.failure(str(exc)).encode()
        finally:  # closed at a yield (GeneratorExit): the client is gone
            lease.end(Stage.CANCELLED)

    async def _receive(self, seq: Sequence, lease: BlockLease) -> Any:
        """Wait for the prompt's KV. The lease learns from the receiver's future when nothing
        writes the blocks any more: a request that ends before then is released only after."""
        fut = self.receiver.expect(seq.request_id, seq.num_prompt_tokens, list(seq.block_table), self.options.kv_timeout)
        lease.advance(Stage.RECEIVING)
        fut.add_done_callback(lambda _: lease.receiver_stopped())
        return await asyncio.wrap_future(fut)


class LeasedStream(StreamingResponse):
    """A streaming response that ends its request's lease however the response ends. Starlette
    cancels the body when the client disconnects, possibly before the body generator has
    started (then none of its own cleanup ever runs): this frees the blocks in that case too."""

    def __init__(self, content: AsyncIterator[bytes], lease: BlockLease) -> None:
        super().__init__(content, media_type="application/x-ndjson")
        self.lease = lease

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.lease.end(Stage.CANCELLED):
                REQUESTS.labels("decode", "client_gone").inc()


def _refuse(worker: DecodeWorker, request_id: str, exc: Exception):
    """The answer to a request refused before streaming: 503 for a full cache, 400 for bad
    input; the prefill side (already told to send) is stopped at once either way."""
    if isinstance(exc, NoFreeBlocks):
        REQUESTS.labels("decode", "no_room").inc()
        worker.receiver.reject(request_id, "no_space", str(exc))
        return error(503, str(exc))
    REQUESTS.labels("decode", "bad_request").inc()
    worker.receiver.reject(request_id, "invalid_input", str(exc))
    return error(400, str(exc))


def create_app(options: WorkerOptions):
    worker = DecodeWorker(options)
    app = worker_app(worker)

    @app.post("/generate")
    async def generate(request: Request):
        try:
            req = await read_message(request, GenerateRequest)
        except InvalidMessage as exc:
            if exc.request_id is None:  # not a request: nothing to tell the prefill side
                REQUESTS.labels("decode", "bad_request").inc()
                return error(400, str(exc))
            return _refuse(worker, exc.request_id, exc)
        try:
            seq = Sequence(req.request_id, req.token_ids, req.sampling)
        except ValueError as exc:
            return _refuse(worker, req.request_id, exc)
        lease = worker.lease(seq)
        try:
            if req.recompute:
                worker.engine.check_prompt(seq.prompt_token_ids)
            else:
                await worker.reserve(seq, lease)
        except (NoFreeBlocks, ValueError) as exc:
            lease.end(Stage.FAILED)
            return _refuse(worker, req.request_id, exc)
        except BaseException as exc:
            lease.end(Stage.FAILED if isinstance(exc, Exception) else Stage.CANCELLED)
            raise
        return LeasedStream(worker.generate(seq, lease, req.recompute), lease)

    return app
