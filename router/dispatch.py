"""Serving one sequence: choose a pair, stream decode's tokens, retry once if a worker fails
before the first token.

Life cycle of a sequence: admitted (policy picks a pair; if none can meet its targets it waits in
admission for a bounded time, then is shed) -> decode ``/generate`` opened (decode allocates
blocks) -> prefill ``/prefill`` sent with decode's KV endpoint -> tokens stream -> done. A
prefill failure closes the decode stream (decode frees the blocks) and the sequence is retried on
another pair; a decode worker that breaks its stream is marked unhealthy at once; after the first
token has gone to the client there is no retry, the client gets an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from splitserve.router.config import SLO, RouterConfig
from splitserve.router.errors import RouterError, ShedError, UpstreamError
from splitserve.router.metrics import RouterMetrics
from splitserve.router.policy import Decision, NoCandidate, Policy, RouteRequest, SloUnattainable
from splitserve.router.pool import WorkerPool
from splitserve.router.workers import WorkerClient, WorkerRejected, WorkerState, WorkerUnreachable

log = logging.getLogger("splitserve.router.dispatch")


@dataclass
class SequenceSpec:
    request_id: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any]
    slo: SLO
    arrival: float  # time.monotonic() when the HTTP request arrived


@dataclass(frozen=True)
class Chunk:
    token_ids: list[int]
    finish_reason: str | None
    stop_string: str | None
    logprobs: list[dict[str, Any]] | None = None  # one entry per token, when the request asked


class _PrefillFailed(Exception):
    def __init__(self, worker: WorkerState, cause: Exception) -> None:
        super().__init__(str(cause))
        self.worker, self.cause = worker, cause


class _Retryable(Exception):
    """A failure before the first token: try another pair (without ``bad_urls``)."""

    def __init__(self, message: str, bad_urls: set[str]) -> None:
        super().__init__(message)
        self.bad_urls = bad_urls


class Dispatcher:
    def __init__(
        self,
        config: RouterConfig,
        pool: WorkerPool,
        client: WorkerClient,
        policy: Policy,
        metrics: RouterMetrics,
    ) -> None:
        self.config, self.pool, self.client = config, pool, client
        self.policy, self.metrics = policy, metrics
        self.queued = 0

    async def route(self, req: RouteRequest, exclude: set[str]) -> Decision:
        """A pair for ``req``, queueing while the policy says no pair can meet its targets."""
        all_prefills = self.pool.role("prefill")
        deadline = time.monotonic() + self.config.max_queue_ms / 1000
        queued = False
        try:
            while True:
                prefills = [w for w in all_prefills if w.url not in exclude]
                decodes = [w for w in self.pool.role("decode") if w.url not in exclude]
                # No prefill worker left to serve: the decode worker computes the prompt itself
                # (slower first token, but the request is served rather than refused).
                req.with_prefill = any(w.healthy for w in prefills)
                if all_prefills and not req.with_prefill:
                    self.metrics.child(self.metrics.decisions, self.policy.name, "recompute_fallback").inc()
                t0 = time.perf_counter()
                try:
                    decision = self.policy.pick(req, prefills, decodes)
                except NoCandidate as exc:
                    self.metrics.child(self.metrics.decisions, self.policy.name, "no_candidate").inc()
                    raise UpstreamError(503, str(exc), code="no_worker_available") from exc
                except SloUnattainable as exc:
                    if not queued:
                        if self.queued >= self.config.max_queued_requests:
                            self._shed("queue_full", f"admission queue is full ({self.queued} waiting); {exc}")
                        queued = True
                        self.queued += 1
                        self.metrics.queued.inc()
                    if time.monotonic() >= deadline:
                        self._shed(exc.reason, f"{exc} (waited {self.config.max_queue_ms:.0f} ms)")
                    await asyncio.sleep(0.01)
                    continue
                finally:
                    self.metrics.child(self.metrics.decision_seconds, self.policy.name).observe(time.perf_counter() - t0)
                self.metrics.child(self.metrics.decisions, self.policy.name, "queued" if queued else "routed").inc()
                return decision
        finally:
            if queued:
                self.queued -= 1
                self.metrics.queued.dec()

    def _shed(self, reason: str, message: str) -> None:
        self.metrics.child(self.metrics.decisions, self.policy.name, "shed").inc()
        self.metrics.child(self.metrics.shed, reason).inc()
        raise ShedError(reason, message)

    async def run(self, spec: SequenceSpec) -> AsyncIterator[Chunk]:
        """The sequence's chunks; raises RouterError (with its HTTP status) on failure."""
        req = RouteRequest(spec.prompt_token_ids, spec.sampling["max_tokens"], spec.slo)
        exclude: set[str] = set()
        last_error = ""
        first_at = last_at = None
        tokens = 0
        self.metrics.inflight.inc()
        self.metrics.prompt_tokens.inc(len(spec.prompt_token_ids))
        try:
            for attempt in range(1, self.config.max_attempts + 1):
                try:
                    decision = await self.route(req, exclude)
                except UpstreamError as exc:
                    if attempt == 1:
                        raise
                    raise UpstreamError(502, f"{last_error}; no other worker pair to retry on ({exc.message})") from exc
                rid = spec.request_id if attempt == 1 else f"{spec.request_id}-retry{attempt - 1}"
                self.policy.on_routed(req, decision)
                try:
                    async for chunk in self._attempt(rid, spec, decision):
                        if chunk.token_ids:
                            last_at = time.monotonic()
                            first_at = first_at or last_at
                            tokens += len(chunk.token_ids)
                        yield chunk
                    return
                except _Retryable as exc:
                    last_error = str(exc)
                    self.metrics.child(self.metrics.retries, "prefill" if isinstance(exc.__cause__, _PrefillFailed) else "decode").inc()
                    log.warning("request %s attempt %d failed: %s", spec.request_id, attempt, exc)
                    exclude.update(exc.bad_urls)
            raise UpstreamError(502, f"request failed after {self.config.max_attempts} attempts: {last_error}")
        finally:
            self.metrics.inflight.dec()
            now = time.monotonic()
            ttft = first_at - spec.arrival if first_at else None
            tpot = (last_at - first_at) / (tokens - 1) if first_at and last_at and tokens > 1 else None
            self.metrics.observe_sequence(ttft, tpot, now - spec.arrival, tokens, spec.slo.ttft_ms / 1000, spec.slo.tpot_ms / 1000)

    async def _attempt(self, rid: str, spec: SequenceSpec, decision: Decision) -> AsyncIterator[Chunk]:
        d, p = decision.decode, decision.prefill
        n = len(spec.prompt_token_ids)
        for w in (d, p):
            if w is not None:
                w.note_assigned(n)
        body = {"request_id": rid, "token_ids": spec.prompt_token_ids, "sampling": spec.sampling, "recompute": p is None}
        yielded = False
        prefill_task: asyncio.Task | None = None
        try:
            async with self.client.generate(d.url, body) as stream:
                batches = stream.batches()
                if p is not None:
                    prefill_task = asyncio.create_task(self._prefill(p, rid, spec, d))
                first = await self._first_batch(batches, prefill_task)
                if first and prefill_task is not None and spec.sampling.get("logprobs") is not None:
                    # The first token came through the KV transfer, which carries the token only:
                    # its logprobs are in the prefill worker's response.
                    first[0] = dict(first[0], logprobs=[(await prefill_task).get("first_logprobs")])
                async for chunk in self._chunks(first, batches, d):
                    yielded = True
                    yield chunk
                await stream.finish()
            if prefill_task is not None:
                await self._settle(prefill_task)
        except _PrefillFailed as exc:
            raise _Retryable(f"prefill on {exc.worker.url} failed: {exc.cause}", {exc.worker.url}) from exc
        except WorkerUnreachable as exc:
            self.pool.mark_unhealthy(d, str(exc))
            if yielded:
                raise UpstreamError(502, f"decode worker {d.url} failed mid-request: {exc}", code="decode_failed") from exc
            raise _Retryable(f"decode worker {d.url} unreachable: {exc}", {d.url}) from exc
        except WorkerRejected as exc:
            if exc.status == 400:
                raise RouterError(400, f"the decode worker refused the request: {exc.message}") from exc
            raise _Retryable(f"decode worker {d.url} refused: HTTP {exc.status} {exc.message}", {d.url}) from exc
        except _DecodeError as exc:
            if yielded:
                raise UpstreamError(502, str(exc), code="decode_failed") from exc
            raise _Retryable(str(exc), {d.url}) from exc
        finally:
            if prefill_task is not None and not prefill_task.done():
                prefill_task.cancel()
            for w in (d, p):
                if w is not None:
                    w.note_done()

    async def _prefill(self, p: WorkerState, rid: str, spec: SequenceSpec, d: WorkerState) -> dict[str, Any]:
        body = {
            "request_id": rid,
            "token_ids": spec.prompt_token_ids,
            "sampling": spec.sampling,
            "decode_kv_endpoint": d.kv_endpoint,
        }
        try:
            return await self.client.prefill(p.url, body)
        except WorkerUnreachable as exc:
            self.pool.mark_unhealthy(p, str(exc))
            raise _PrefillFailed(p, exc) from exc
        except WorkerRejected as exc:
            raise _PrefillFailed(p, exc) from exc

    @staticmethod
    async def _settle(prefill_task: asyncio.Task) -> None:
        """After decode finished: let the prefill answer arrive (it is due; with instant workers
        it can trail the last token) rather than cancel it, which would drop a connection the
        next request could use. Its result no longer matters, its failure neither."""
        if not prefill_task.done():
            await asyncio.wait({prefill_task}, timeout=1.0)
        if prefill_task.done() and not prefill_task.cancelled():
            prefill_task.exception()  # retrieved: a late failure is not logged as unhandled

    @staticmethod
    async def _first_batch(
        batches: AsyncIterator[list[dict[str, Any]]], prefill_task: asyncio.Task | None
    ) -> list[dict[str, Any]] | None:
        """Decode's first lines, unless the prefill fails first (then raise _PrefillFailed).

        Waits in this task, and a failing prefill cancels the wait (no second task and no
        ``asyncio.wait`` per request: this runs for every request)."""
        if prefill_task is None:
            return await anext(batches, None)
        current = asyncio.current_task()
        waiting, failed = True, False

        def on_prefill_done(task: asyncio.Task) -> None:
            nonlocal failed
            if waiting and not task.cancelled() and task.exception() is not None:
                failed = True
                current.cancel()

        prefill_task.add_done_callback(on_prefill_done)
        try:
            return await anext(batches, None)
        except asyncio.CancelledError:
            if not failed:
                raise
            if hasattr(current, "uncancel"):  # Python >= 3.11: this cancellation is handled
                current.uncancel()
        finally:
            waiting = False
            prefill_task.remove_done_callback(on_prefill_done)
        raise prefill_task.exception()  # the stream is abandoned; the prefill's error is reported

    @staticmethod
    async def _chunks(
        first: list[dict[str, Any]] | None, batches: AsyncIterator[list[dict[str, Any]]], d: WorkerState
    ) -> AsyncIterator[Chunk]:
        """One Chunk per batch of lines (tokens joined), until the line with a finish_reason."""
        batch = first
        while batch is not None:
            chunk = _merge(batch, d)
            yield chunk
            if chunk.finish_reason is not None:
                return
            batch = await anext(batches, None)
        raise WorkerUnreachable(f"decode {d.url} ended the stream without a finish_reason")


def _merge(lines: list[dict[str, Any]], d: WorkerState) -> Chunk:
    """The lines of one batch as one Chunk: their tokens (and logprobs) in order, the finish of
    the line that finished; lines after a finish are ignored, an error line raises."""
    if len(lines) == 1:  # the common case: no lists to join
        line = lines[0]
        if line.get("error") is not None or line.get("finish_reason") == "error":
            raise _DecodeError(f"decode worker {d.url} reported an error: {line.get('error')}")
        return Chunk(list(line.get("token_ids") or []), line.get("finish_reason"), line.get("stop_string"),
                     line.get("logprobs"))
    tokens: list[int] = []
    logprobs: list[dict[str, Any]] | None = None
    finish = stop = None
    for line in lines:
        if line.get("error") is not None or line.get("finish_reason") == "error":
            raise _DecodeError(f"decode worker {d.url} reported an error: {line.get('error')}")
        tokens += line.get("token_ids") or []
        if line.get("logprobs") is not None:
            logprobs = (logprobs or []) + list(line["logprobs"])
        finish, stop = line.get("finish_reason"), line.get("stop_string")
        if finish is not None:
            break
    return Chunk(tokens, finish, stop, logprobs)


class _DecodeError(Exception):
    """The decode worker reported an error line."""
