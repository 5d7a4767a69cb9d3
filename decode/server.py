"""The decode worker: receives a prompt's KV from a prefill worker and generates the rest.

A request's life here: reserved (blocks allocated for the prompt, so a full cache is refused up
front with 503) -> receiving (the KV receiver fills those blocks; a transfer that fails, stalls or
never starts ends the request within the transfer timeout, and the blocks are freed) -> running
(joins the decode batch with the prefill worker's first token) -> done. With ``recompute`` the
worker prefills the prompt itself: the fallback when no prefill worker can serve.
Tokens stream back as NDJSON lines; a client that disconnects aborts the sequence.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from types import SimpleNamespace

from splitserve.engine.block_manager import NoFreeBlocks
from splitserve.engine.engine import StepOutput
from splitserve.engine.metrics import REQUESTS
from splitserve.engine.sampling import SamplingParams
from splitserve.engine.sequence import Sequence
from splitserve.engine.worker import (
    EngineWorker,
    WorkerOptions,
    WorkerRequest,
    add_common_routes,
    error,
    guard,
    kv_spec,
    lifespan,
    make_app,
)

log = logging.getLogger(__name__)

RECEIVER_STOP_WAIT_S = 5.0  # a cancelled transfer's future resolves within milliseconds


class GenerateRequest(WorkerRequest):
    recompute: bool = False


def _line(obj: dict) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def _token_line(out: StepOutput) -> bytes:
    seq = out.seq
    line = {
        "token_ids": [out.token_id],
        "finish_reason": seq.finish_reason if out.finished else None,
        "stop_string": seq.stop_string if out.finished else None,
    }
    if out.logprobs is not None:
        line["logprobs"] = [out.logprobs]
    return _line(line)


class DecodeWorker(EngineWorker):
    def __init__(self, options: WorkerOptions) -> None:
        from splitserve.kvtransfer import create_receiver

        super().__init__(options)
        spec = kv_spec(self.engine, options.kv_backend, options.generation)
        self.receiver = create_receiver(
            options.kv_backend, spec, self.engine.runner.kv_cache, host=options.host, port=options.kv_port,
            secret=self.secret,
        )
        kv_port = int(self.receiver.endpoint.rsplit(":", 1)[1])
        self.kv_endpoint = f"{options.advertise_host}:{kv_port}"

    def start(self) -> None:
        super().start()
        log.info("decode worker: KV receiver at %s", self.kv_endpoint)

    def close(self) -> None:
        self.receiver.close()
        super().close()

    async def reserve(self, seq: Sequence) -> list[int]:
        return await self.async_engine.run(self.engine.reserve, seq)

    async def generate(self, seq: Sequence, recompute: bool) -> AsyncIterator[bytes]:
        """Stream the sequence's tokens; for a transferred prompt, blocks are already reserved."""
        try:
            if recompute:
                submit = self.engine.add
            else:
                result = await self._receive(seq)
                submit = lambda s: self.engine.activate(s, result.first_token)  # noqa: E731
            async for out in self.async_engine.stream(seq, submit):
                yield _token_line(out)
            REQUESTS.labels("decode", "ok").inc()
        except asyncio.CancelledError:
            REQUESTS.labels("decode", "client_gone").inc()
            raise
        except Exception as exc:
            REQUESTS.labels("decode", "failed").inc()
            log.warning("request %s failed: %s", seq.request_id, exc)
            yield _line({"error": str(exc), "finish_reason": "error"})

    async def _receive(self, seq: Sequence):
        fut = self.receiver.expect(seq.request_id, seq.num_prompt_tokens, list(seq.block_table), self.options.kv_timeout)
        try:
            return await asyncio.wrap_future(fut)
        except BaseException:
            # Transfer failed, timed out or the client left: the blocks are ours to free, but
            # only once the receiver has stopped writing into them (its future is done).
            self.receiver.cancel(seq.request_id)
            done, _ = await asyncio.wait([asyncio.wrap_future(fut)], timeout=RECEIVER_STOP_WAIT_S)
            if done:
                await self.async_engine.run(self.engine.abort, seq)
            else:  # a sender writing straight into our cache (cuda_ipc) may not have stopped yet
                log.warning(
                    "request %s: the KV receiver has not confirmed within %.0f s that nothing "
                    "writes its blocks any more; they are freed once it does",
                    seq.request_id, RECEIVER_STOP_WAIT_S,
                )
                fut.add_done_callback(lambda _: self.async_engine.call(self.engine.abort, seq))
            raise


def create_app(options: WorkerOptions):
    from fastapi.responses import StreamingResponse

    worker = DecodeWorker(options)
    app = make_app("decode")
    state = SimpleNamespace(engine=worker.engine, options=options, kv_endpoint=worker.kv_endpoint)
    app.router.lifespan_context = lifespan(worker, options, state)
    add_common_routes(app, state, "decode")
    guard(app, worker)

    @app.post("/generate")
    async def generate(req: GenerateRequest):
        try:
            seq = Sequence(req.request_id, req.token_ids, SamplingParams.from_dict(req.sampling))
            if req.recompute:
                worker.engine.check_prompt(seq.prompt_token_ids)
            else:
                await worker.reserve(seq)
        except NoFreeBlocks as exc:
            REQUESTS.labels("decode", "no_room").inc()
            worker.receiver.reject(req.request_id, "no_space", str(exc))  # the prefill side stops now
            return error(503, str(exc))
        except ValueError as exc:
            REQUESTS.labels("decode", "bad_request").inc()
            worker.receiver.reject(req.request_id, "invalid_input", str(exc))
            return error(400, str(exc))
        return StreamingResponse(worker.generate(seq, req.recompute), media_type="application/x-ndjson")

    app.state.worker = worker
    return app
