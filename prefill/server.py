"""The prefill worker: computes a prompt's KV cache and first token, then ships the KV to the
decode worker the router chose.

A request's life here: connecting (the transfer to the decode worker opens and handshakes at once)
-> queued (waiting for a prefill batch with room in the token budget and the cache) -> prefilling
(each layer's KV goes on the wire as soon as the layer is computed) -> prefilled (first token
sampled and sent; blocks held until the decode side acknowledges) -> released (blocks freed,
whether the transfer succeeded or failed; the response says which). Prompts that share a prefix
reuse its cached blocks. A :class:`~splitserve.worker.block_lease.BlockLease` (queued -> sending
-> finished, or cancelled / failed from either) frees the blocks exactly once on every path,
without awaiting: a request cancelled during its cleanup still gives them back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request  # (at module level: FastAPI resolves the annotation here)
from splitserve.engine.sequence import Sequence
from splitserve.kvtransfer import SampledToken
from splitserve.protocol import InvalidMessage, PrefillRequest, PrefillResult, TransferMeta
from splitserve.worker.block_lease import BlockLease, Stage
from splitserve.worker.handshake import kv_sender
from splitserve.worker.metrics import REQUESTS
from splitserve.worker.options import WorkerOptions
from splitserve.worker.shell import (
    EngineWorker,
    error,
    read_message,
    worker_app,
)

log = logging.getLogger(__name__)


class PrefillWorker(EngineWorker):
    """Owns the engine thread, the KV sender and the transfer threads of one prefill worker."""

    def __init__(self, options: WorkerOptions) -> None:
        super().__init__(options)
        self.sender = kv_sender(self.engine, options, self.secret)
        self.transfers = ThreadPoolExecutor(max_workers=64, thread_name_prefix="kv-send")

    def close(self) -> None:
        super().close()
        self.transfers.shutdown(wait=False, cancel_futures=True)
        self.sender.close()

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        """Prefill while streaming each layer's KV to the decode worker, then release the blocks.

        The transfer starts (connects and handshakes) before the prompt is computed; the engine
        hands it layer i's KV right after layer i's forward pass, and the first token after the
        last layer. Raises ValueError (bad input) or TransferError.
        """
        seq = Sequence(req.request_id, req.token_ids, req.sampling, prefill_only=True)
        self.engine.check_prompt(seq.prompt_token_ids)
        stream = LayerStream(self.engine.runner.model_config.num_layers)
        seq.on_layer_kv = stream.put
        loop = asyncio.get_running_loop()
        transfer = loop.run_in_executor(
            self.transfers,
            lambda: self.sender.send(seq.request_id, req.decode_kv_endpoint, stream, stream.first_token,
                                     TransferMeta(seq.num_prompt_tokens).to_json(),
                                     num_tokens=seq.num_prompt_tokens),
        )
        started = time.perf_counter()
        lease = BlockLease(seq.request_id, release=lambda: self.async_engine.abort(seq))
        try:
            lease.advance(Stage.QUEUED)
            async for out in self.async_engine.stream(seq, self.engine.add):
                stream.finish(SampledToken(out.token_id, out.logprobs))  # END carries both
            lease.advance(Stage.SENDING)
            prefilled = time.perf_counter()
            await transfer
            lease.finish()
        except BaseException as exc:
            # first, without awaiting: the sender reads copies of the layers, never the blocks
            lease.end(Stage.FAILED if isinstance(exc, Exception) else Stage.CANCELLED)
            stream.fail(exc)  # the sender stops at once; the decode side learns of it
            await asyncio.gather(transfer, return_exceptions=True)
            raise
        return PrefillResult(
            req.request_id, stream.first_token().token_id, seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            prefill_ms=(prefilled - started) * 1e3,
            transfer_ms=(time.perf_counter() - prefilled) * 1e3,
        )


class LayerStream:
    """The per-layer KV of one prompt, from the engine thread (``put``) to the sending thread
    (iteration), then the first token and its logprobs. ``fail`` ends the iteration with the
    error, so a failed prefill never leaves the sender waiting."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self._next = 0  # the next layer to pass on
        self._layers: queue.Queue = queue.Queue()
        self._first: concurrent.futures.Future = concurrent.futures.Future()

    def put(self, layer: int, kv) -> None:
        """Pass on layer ``layer``'s KV; a layer already passed on is dropped (a step the engine
        runs again after a failure computes the same KV once more)."""
        if layer < self._next:
            return
        self._next = layer + 1
        self._layers.put(kv)

    def finish(self, first: SampledToken) -> None:
        self._first.set_result(first)

    def fail(self, exc: BaseException) -> None:
        self._layers.put(exc)
        if not self._first.done():
            self._first.set_exception(exc)

    def first_token(self) -> SampledToken:
        return self._first.result()

    def __iter__(self):
        for _ in range(self.num_layers):
            item = self._layers.get()
            if isinstance(item, BaseException):
                raise item
            yield item


def create_app(options: WorkerOptions):
    """Build the worker (loads the model now, so the port only opens once it can serve)."""
    from splitserve.kvtransfer import TransferError

    worker = PrefillWorker(options)
    app = worker_app(worker)

    @app.post("/prefill")
    async def prefill(request: Request):
        try:
            req = await read_message(request, PrefillRequest)
        except InvalidMessage as exc:
            REQUESTS.labels("prefill", "bad_request").inc()
            return error(400, str(exc))
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
        return result.to_json()

    return app
