"""Serving one sequence: choose a pair, stream decode's tokens; when a worker fails, retry before
the first token, resume after it.

Life cycle of a sequence: admitted (policy picks a pair; if none can meet its targets it waits in
admission for a bounded time, then is shed) -> decode ``/generate`` opened (decode allocates
blocks) -> prefill ``/prefill`` sent with decode's KV endpoint -> tokens stream -> done.

Failure (one rule for both hops, ``after_failure``): a worker that cannot be reached, breaks its
stream or times out is marked unhealthy at once; the sequence goes on on another pair (closing
the decode stream, so decode frees the blocks); a worker's 400 is the client's 400.

- Before the first token it is retried from the start, at most ``max_attempts`` tries in a row
  that send nothing; after them the client gets a 502. Until the first token an attempt also
  fails at once when a worker of its pair is marked unhealthy by anyone (``_Tripwire``): a
  request sent to a worker that hung just before a poll noticed waits for that poll, not for
  its own timeouts.
- After the first token it is resumed: a new sequence whose prompt is the prompt and the tokens
  the client already has, asking for the tokens still due, so the client's stream goes on
  without a seam (for greedy sampling, token for token the answer it would have had; a seeded
  sample continues with a fresh draw). A decode worker that dies breaks its stream; one that
  hangs with its connection open is noticed by ``StallWatch`` (stall.py) once it misses its
  polls and its stream has been silent for ``stream_stall_timeout_s``, instead of after the
  idle timeout (``stream_idle_timeout_s``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from splitserve.protocol import (
    GenerateRequest,
    LogprobEntry,
    PrefillRequest,
    PrefillResult,
    SamplingParams,
    TokenLine,
)
from splitserve.router.admission import AdmissionSignal
from splitserve.router.backlog import AwaitingFirstToken
from splitserve.router.config import MAX_SLO_MS, SLO, RouterConfig
from splitserve.router.errors import RouterError, ShedError, UpstreamError
from splitserve.router.metrics import RouterMetrics
from splitserve.router.policy import (
    Decision,
    NoCandidate,
    Policy,
    RouteRequest,
    SloUnattainable,
    Unservable,
)
from splitserve.router.pool import WorkerPool
from splitserve.router.stall import StallWatch
from splitserve.router.workers import WorkerClient, WorkerRejected, WorkerState, WorkerUnreachable

log = logging.getLogger("splitserve.router.dispatch")


@dataclass
class SequenceSpec:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    slo: SLO
    arrival: float  # time.monotonic() when the HTTP request arrived


Chunk = TokenLine  # what one sequence yields: decode's lines that arrived together, merged


# A resumed sequence was admitted already: the policy must not queue or shed it for latency
# targets it can no longer meet (room in the KV cache is still required).
RESUMED_SLO = SLO(MAX_SLO_MS, MAX_SLO_MS)


class _WorkerFailed(Exception):
    """One worker failed this attempt. ``unreachable``: transport failure, timeout, stalled or
    marked unhealthy (the worker is suspect); else it answered with an error (``status``)."""

    def __init__(self, role: str, worker: WorkerState, message: str, unreachable: bool, status: int | None = None,
                 stalled: bool = False) -> None:
        super().__init__(message)
        self.role, self.worker, self.unreachable, self.status = role, worker, unreachable, status
        self.stalled = stalled


class _Retryable(Exception):
    """Go on on another pair (without ``bad_urls``): from the start, or, with ``resume`` (the
    client has tokens of this attempt), from the tokens sent."""

    def __init__(self, message: str, bad_urls: set[str], reason: str, resume: bool = False) -> None:
        super().__init__(message)
        self.bad_urls, self.reason, self.resume = bad_urls, reason, resume


def after_failure(failure: _WorkerFailed, yielded: bool) -> Exception:
    """The retry rule, for both hops: what a worker's failure becomes.

    - the worker refused the request itself (400): the client's error, as a 400, no retry;
    - after the first token went to the client: resume on another pair from the tokens sent
      (reason ``stalled`` for a worker that hung, else ``failed``);
    - otherwise: retry on another pair, without that worker (``Dispatcher.run`` bounds the
      tries that send nothing by ``max_attempts``)."""
    if failure.status == 400:
        return RouterError(400, f"the {failure.role} worker refused the request: {failure}")
    if yielded:
        return _Retryable(f"{failure.role} worker {failure.worker.url} failed mid-request: {failure}",
                          {failure.worker.url}, "stalled" if failure.stalled else "failed", resume=True)
    return _Retryable(f"{failure.role} worker {failure.worker.url} failed: {failure}", {failure.worker.url},
                      failure.role)


def resumed(spec: SequenceSpec, sent: list[int]) -> SequenceSpec:
    """What is left of ``spec`` once the client has ``sent``: the prompt and those tokens as the
    prompt (computed again by whichever pair serves it), the tokens still due as the limit. The
    stop strings are the router's to find across the seam (choices.py); the context is no
    longer than the original's (prompt + max_tokens)."""
    left = spec.sampling.max_tokens - len(sent)
    return replace(spec, prompt_token_ids=spec.prompt_token_ids + sent,
                   sampling=replace(spec.sampling, max_tokens=left), slo=RESUMED_SLO)


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
        self.queued_prompt_tokens = 0  # of the requests in the admission queue
        self.admission = AdmissionSignal()  # woken by each poll round
        self.awaiting = AwaitingFirstToken()
        pool.on_change.add(self.admission.notify)
        pool.on_change.add(self.export_backlog)

    def export_backlog(self) -> None:
        """The planner's queue inputs, refreshed with each poll round: prompt tokens waiting for
        a prefill (here and in the workers' queues: the prefill pool's, or the colocated
        workers' when there is none) and the oldest wait for a first token (backlog.py)."""
        computing = self.pool.role("prefill") or self.pool.role("decode")
        # a worker marked unhealthy keeps its last load: its queue and work are not counted
        workers = sum(w.load.queued_prompt_tokens for w in computing if w.healthy and w.load is not None)
        self.metrics.queued_prompt_tokens.set(self.queued_prompt_tokens + workers)
        self.metrics.oldest_wait.set(self.awaiting.oldest_wait(time.monotonic()))
        for role in ("prefill", "decode"):
            busy = sum(1 for w in self.pool.role(role)
                       if w.healthy and w.load is not None and (w.load.running or w.load.waiting))
            self.metrics.child(self.metrics.busy_workers, role).set(busy)

    async def route(self, req: RouteRequest, exclude: set[str]) -> Decision:
        """A pair for ``req``, queueing while the policy says no pair can take it now (it cannot
        meet the targets, or no decode worker has the KV blocks for the prompt)."""
        deadline = time.monotonic() + self.config.max_queue_ms / 1000
        queued = False
        try:
            while True:
                all_prefills = self.pool.role("prefill")  # afresh each ask: a worker may have joined
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
                except Unservable as exc:
                    self.metrics.child(self.metrics.decisions, self.policy.name, "unservable").inc()
                    raise RouterError(400, exc.message, code=exc.code) from exc
                except NoCandidate as exc:
                    self.metrics.child(self.metrics.decisions, self.policy.name, "no_candidate").inc()
                    raise UpstreamError(503, str(exc), code="no_worker_available") from exc
                except SloUnattainable as exc:
                    if not queued:
                        if self.queued >= self.config.max_queued_requests:
                            self._shed("queue_full", f"admission queue is full ({self.queued} waiting); {exc}")
                        queued = True
                        self.queued += 1
                        self.queued_prompt_tokens += len(req.prompt_token_ids)
                        self.metrics.queued.inc()
                        self.metrics.child(self.metrics.waited, exc.reason).inc()
                    if time.monotonic() >= deadline:
                        self._shed(exc.reason, f"{exc} (waited {self.config.max_queue_ms:.0f} ms)")
                    await self.admission.wait(deadline - time.monotonic())
                    continue
                finally:
                    self.metrics.child(self.metrics.decision_seconds, self.policy.name).observe(time.perf_counter() - t0)
                self.metrics.child(self.metrics.decisions, self.policy.name, "queued" if queued else "routed").inc()
                self.metrics.observe_policy_steps(self.policy.name, decision.timings_us)
                return decision
        finally:
            if queued:
                self.queued -= 1
                self.queued_prompt_tokens -= len(req.prompt_token_ids)
                self.metrics.queued.dec()

    def _shed(self, reason: str, message: str) -> None:
        self.metrics.child(self.metrics.decisions, self.policy.name, "shed").inc()
        self.metrics.child(self.metrics.shed, reason).inc()
        raise ShedError(reason, message)

    async def run(self, spec: SequenceSpec) -> AsyncIterator[Chunk]:
        """The sequence's chunks; raises RouterError (with its HTTP status) on failure."""
        exclude: set[str] = set()
        last_error = ""
        first_at = last_at = None
        sent: list[int] = []  # the tokens the client has, over all attempts
        tries = failures = 0  # attempts made; attempts in a row that sent nothing
        self.metrics.inflight.inc()
        self.metrics.prompt_tokens.inc(len(spec.prompt_token_ids))
        waiting = self.awaiting.add(spec.arrival)
        try:
            while True:
                seq = resumed(spec, sent) if sent else spec
                if seq.sampling.max_tokens < 1:  # (a worker that sent every token but no finish)
                    yield Chunk([], "length")
                    return
                req = RouteRequest(seq.prompt_token_ids, seq.sampling.max_tokens, seq.slo)
                try:
                    decision = await self.route(req, exclude)
                except UpstreamError as exc:
                    if not tries:
                        raise
                    raise UpstreamError(502, f"{last_error}; no other worker pair to retry on ({exc.message})") from exc
                rid = spec.request_id if not tries else f"{spec.request_id}-retry{tries}"
                tries += 1
                self.policy.on_routed(req, decision)
                try:
                    async for chunk in self._attempt(rid, seq, decision):
                        if chunk.token_ids:
                            last_at = time.monotonic()
                            if first_at is None:
                                first_at = last_at
                                self.awaiting.remove(waiting)
                            sent += chunk.token_ids
                        yield chunk
                    return
                except _Retryable as exc:
                    last_error = str(exc)
                    exclude.update(exc.bad_urls)
                    if exc.resume:
                        failures = 0
                        self.metrics.child(self.metrics.resumed, exc.reason).inc()
                        log.warning("request %s: %s; resuming after %d tokens on another pair",
                                    spec.request_id, exc, len(sent))
                        continue
                    failures += 1
                    self.metrics.child(self.metrics.retries, exc.reason).inc()
                    log.warning("request %s attempt %d failed: %s", spec.request_id, tries, exc)
                    if failures >= self.config.max_attempts:
                        raise UpstreamError(502, f"request failed after {failures} attempts: {last_error}") from None
        finally:
            self.awaiting.remove(waiting)
            self.metrics.inflight.dec()
            now = time.monotonic()
            ttft = first_at - spec.arrival if first_at else None
            tokens = len(sent)
            tpot = (last_at - first_at) / (tokens - 1) if first_at and last_at and tokens > 1 else None
            self.metrics.observe_sequence(ttft, tpot, now - spec.arrival, tokens, spec.slo.ttft_ms / 1000, spec.slo.tpot_ms / 1000)

    async def _attempt(self, rid: str, spec: SequenceSpec, decision: Decision) -> AsyncIterator[Chunk]:
        d, p = decision.decode, decision.prefill
        n = len(spec.prompt_token_ids)
        for w in (d, p):
            if w is not None:
                w.note_assigned(n)
        request = GenerateRequest(rid, spec.prompt_token_ids, spec.sampling, recompute=p is None)
        yielded = False
        prefill_task: asyncio.Task | None = None
        # Decode's first line comes after the prefill and the KV transfer: wait for it as long as
        # the prefill may take, so a slow prefill is the prefill's failure, not decode's.
        first_timeout = self.config.prefill_timeout_s + self.config.stream_idle_timeout_s if p else None
        wire = _Tripwire([("decode", d), ("prefill", p)])
        stall: StallWatch | None = None
        try:
            try:
                async with self.client.generate(d.url, request) as stream:
                    batches = stream.batches(first_timeout)
                    if p is not None:
                        prefill_task = asyncio.create_task(self._prefill(p, rid, spec, d))
                        wire.watch(prefill_task)
                    first = await anext(batches, None)
                    wire.disarm()
                    stall = StallWatch(d, stream, self.config.stream_stall_timeout_s)
                    async for chunk in self._chunks(first, batches, d):
                        yielded = True
                        yield chunk
                    await stream.finish()
                if prefill_task is not None:
                    await self._settle(prefill_task)
            except WorkerUnreachable as exc:
                if stall is not None and stall.stalled:
                    raise _WorkerFailed("decode", d, stall.stalled, unreachable=True, stalled=True) from exc
                raise _WorkerFailed("decode", d, str(exc), unreachable=True) from exc
            except WorkerRejected as exc:
                raise _WorkerFailed("decode", d, f"HTTP {exc.status} {exc.message}", False, exc.status) from exc
            except _DecodeError as exc:
                raise _WorkerFailed("decode", d, str(exc), unreachable=False) from exc
            except asyncio.CancelledError:
                failure = wire.absorb()
                if failure is None:
                    raise
                raise failure from None
        except _WorkerFailed as failure:
            wire.disarm()  # (marking the worker must not trip this attempt's own wire or watch)
            if stall is not None:
                stall.close()
            if failure.unreachable:
                self.pool.mark_unhealthy(failure.worker, str(failure))
            raise after_failure(failure, yielded) from failure
        finally:
            wire.disarm()
            if stall is not None:
                stall.close()
            if prefill_task is not None and not prefill_task.done():
                prefill_task.cancel()
            for w in (d, p):
                if w is not None:
                    w.note_done()

    async def _prefill(self, p: WorkerState, rid: str, spec: SequenceSpec, d: WorkerState) -> PrefillResult:
        request = PrefillRequest(rid, spec.prompt_token_ids, spec.sampling, d.kv_endpoint)
        try:
            result = await self.client.prefill(p.url, request)
        except WorkerUnreachable as exc:
            raise _WorkerFailed("prefill", p, str(exc), unreachable=True) from exc
        except WorkerRejected as exc:
            raise _WorkerFailed("prefill", p, f"HTTP {exc.status} {exc.message}", False, exc.status) from exc
        self.policy.observe_transfer(p.url, d.url, len(spec.prompt_token_ids), result.transfer_ms)
        return result

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
    async def _chunks(
        first: list[TokenLine] | None, batches: AsyncIterator[list[TokenLine]], d: WorkerState
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


class _Tripwire:
    """Until the first token: fails the attempt at once if the prefill fails or a worker of the
    pair is marked unhealthy (by a poll, or another request that could not reach it), instead
    of waiting out a connect, prefill or stream timeout. It cancels the attempt's task (no
    second task and no ``asyncio.wait`` per request: this runs for every request), and
    ``absorb`` turns that cancellation into the failure."""

    def __init__(self, workers: list[tuple[str, WorkerState | None]]) -> None:
        self.task = asyncio.current_task()
        self.failure: _WorkerFailed | None = None
        self.armed = True
        self._prefill: asyncio.Task | None = None
        self._watches = [(w, self._down(role, w)) for role, w in workers if w is not None]
        for w, callback in self._watches:
            w.on_unhealthy.add(callback)

    def _down(self, role: str, w: WorkerState) -> Callable[[], None]:
        return lambda: self._fail(_WorkerFailed(role, w, f"marked unhealthy: {w.last_error}", unreachable=True))

    def _fail(self, failure: _WorkerFailed) -> None:
        if self.armed and self.failure is None:
            self.failure = failure
            self.task.cancel()

    def _on_prefill_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and isinstance(task.exception(), _WorkerFailed):
            self._fail(task.exception())

    def watch(self, prefill_task: asyncio.Task) -> None:
        self._prefill = prefill_task
        prefill_task.add_done_callback(self._on_prefill_done)

    def disarm(self) -> None:
        if not self.armed:
            return
        self.armed = False
        for w, callback in self._watches:
            w.on_unhealthy.discard(callback)
        if self._prefill is not None:
            self._prefill.remove_done_callback(self._on_prefill_done)

    def absorb(self) -> _WorkerFailed | None:
        """In ``except CancelledError``: the failure that cancelled the task (the cancellation is
        then handled), or None when the cancellation came from elsewhere (it must propagate)."""
        if self.failure is None:
            return None
        if hasattr(self.task, "uncancel"):  # Python >= 3.11
            self.task.uncancel()
        return self.failure


def _merge(lines: list[TokenLine], d: WorkerState) -> Chunk:
    """The lines of one batch as one Chunk: their tokens (and logprobs) in order, the finish of
    the line that finished; lines after a finish are ignored, an error line raises."""
    if len(lines) == 1:  # the common case: the line is the chunk
        line = lines[0]
        if line.failed:
            raise _DecodeError(f"decode worker {d.url} reported an error: {line.error}")
        return line
    tokens: list[int] = []
    logprobs: list[LogprobEntry | None] | None = None
    finish = stop = None
    for line in lines:
        if line.failed:
            raise _DecodeError(f"decode worker {d.url} reported an error: {line.error}")
        tokens += line.token_ids
        if line.logprobs is not None:
            logprobs = (logprobs or []) + list(line.logprobs)
        finish, stop = line.finish_reason, line.stop_string
        if finish is not None:
            break
    return Chunk(tokens, finish, stop, logprobs)


class _DecodeError(Exception):
    """The decode worker reported an error line."""
