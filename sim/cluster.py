"""The discrete-event simulation of one deployment under one request list.

A deployment is ``xPyD`` (x prefill workers, y decode workers, KV moved between them) or
colocated N (N workers that each prefill in chunks and decode). Each worker is a real
``LLMEngine`` over a ``TimingRunner``; the router is the real routing policy
(``router.policy.build_policy``) fed each worker's exact ``/load`` at the moment it decides.

A request's life, as the served system lives it (router/dispatch.py, prefill/ and decode/):
arrives (the router picks a pair; when the policy says no pair can meet the targets, or no decode
worker has KV room for it now, it waits in the admission queue, asking again at each of the
router's poll rounds of its workers' loads,
every ``POLL_ROUND_MS`` as router/admission.py does, once more at its deadline, and is shed
after ``max_queue_ms``) ->
split: the decode worker reserves blocks for the prompt at once, the prefill worker queues it,
prefills it in a whole-prompt batch and streams its KV while computing (``costs.transfer_done_ms``);
when the KV lands, the decode worker activates it between two steps (its engine thread runs
commands only there) and the first token leaves then; the prefill worker frees its blocks then
too -> colocated: the worker queues the prompt and computes it in chunks inside its steps ->
every later token leaves at the end of the step that sampled it -> done.

Costs outside the engine steps come from the latency model's measured ``overhead`` (drawn per
request from its values) and delay the routing of every request: ``request_ms`` (HTTP in and
out, tokenising, routing, admission) on a colocated layout, ``split_request_ms`` (the same plus
the prefill hop, the KV connection, the decode worker taking the sequence) on a split one; an
older model's ``handoff_ms`` delays a split request's activation on its decode worker instead.
A constant ``overhead_ms`` of the config adds to them.

Workers that share a GPU (a layout with fewer ``gpus`` than workers, as ``splitserve up`` runs
a split on one GPU) slow each other down while their steps overlap, as CUDA time-slices the
contexts of two processes: each of k workers with a step in flight progresses at
``1 / (1 + s (k - 1))`` of its own speed, ``s`` the latency model's measured
``sharing.slowdown`` (1: processor sharing), so a decode step that overlaps a prefill stretches
(``_SharedGpu``).

What is not modelled: the router's load being up to one poll old (here it is exact), failures
and retries (the simulated workers never fail), and the one-step delay of overlapped steps'
outputs.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from splitserve.bench.records import RequestRecord
from splitserve.engine.block_manager import NoFreeBlocks
from splitserve.engine.engine import LLMEngine, PromptTooLong, StepOutput
from splitserve.engine.sampling import SamplingParams
from splitserve.engine.sequence import Sequence as EngineSeq
from splitserve.router.config import SLO as RouterSLO
from splitserve.router.config import RouterConfig
from splitserve.router.policy import (
    NoCandidate,
    RouteRequest,
    SloUnattainable,
    Unservable,
    build_policy,
)
from splitserve.router.policy.latency import LatencyModel
from splitserve.router.workers import WorkerState
from splitserve.sim.costs import transfer_done_ms
from splitserve.sim.runner import VOCAB, EngineShape, sim_engine

# a queued request asks the policy again at each poll round of the router (its default interval)
POLL_ROUND_MS = RouterConfig.poll_interval_s * 1000


@dataclass(frozen=True)
class Layout:
    """``num_prefill`` prefill + ``num_decode`` decode workers; no prefill workers means
    ``num_decode`` colocated workers (chunked prefill), as ``splitserve up --prefill 0`` does.
    A GPU each, unless ``gpus`` says fewer: then worker i (prefill workers first) runs on GPU
    ``i % gpus`` and shares it (``splitserve up --devices cuda:0,cuda:0``)."""

    num_prefill: int
    num_decode: int
    gpus: int | None = None

    def __post_init__(self) -> None:
        if self.num_prefill < 0 or self.num_decode < 1:
            raise ValueError("a layout needs >= 0 prefill and >= 1 decode workers")
        if self.gpus is not None and not 1 <= self.gpus <= self.num_prefill + self.num_decode:
            raise ValueError(f"a layout of {self.num_prefill + self.num_decode} workers needs 1 to "
                             f"{self.num_prefill + self.num_decode} GPUs, got {self.gpus}")

    @property
    def colocated(self) -> bool:
        return self.num_prefill == 0

    @property
    def num_gpus(self) -> int:
        return self.gpus or self.num_prefill + self.num_decode

    @property
    def shared(self) -> bool:
        """Some GPU holds more than one worker."""
        return self.num_gpus < self.num_prefill + self.num_decode

    @property
    def label(self) -> str:
        base = f"colocated{self.num_decode}" if self.colocated else f"{self.num_prefill}P{self.num_decode}D"
        return f"{base}-on-{self.gpus}gpu" if self.shared else base

    @classmethod
    def parse(cls, text: str) -> Layout:
        """``"2P6D"`` or ``"colocated8"`` (also ``"c8"``), as ``label`` writes them; a suffix
        ``"-on-1gpu"`` puts the workers on fewer GPUs (``"1P1D-on-1gpu"``)."""
        t = text.strip().lower()
        t, _, on = t.partition("-on-")
        gpus = None
        if on:
            if not (on.endswith("gpu") and on[:-3].isdigit()):
                raise ValueError(f"layout's GPU suffix must look like -on-1gpu, got {text!r}")
            gpus = int(on[:-3])
        for prefix in ("colocated", "c"):
            if t.startswith(prefix) and t[len(prefix):].isdigit():
                return cls(0, int(t[len(prefix):]), gpus)
        p, sep, d = t.partition("p")
        if sep and p.isdigit() and d.endswith("d") and d[:-1].isdigit():
            return cls(int(p), int(d[:-1]), gpus)
        raise ValueError(f"layout must look like 2P6D, colocated8 or 1P1D-on-1gpu, got {text!r}")


@dataclass(frozen=True)
class SimConfig:
    """One simulated deployment: its layout, each worker's engine, the router."""

    layout: Layout
    shape: EngineShape
    policy: str = "least_loaded"
    slo: RouterSLO = field(default_factory=RouterSLO)  # what the goodput policy aims at
    max_queue_ms: float = 500.0
    overhead_ms: float = 0.0


@dataclass(frozen=True)
class SimRequest:
    """What the simulator needs of a bench ``Request``: when, how long, and whose prompt it
    extends (so prefix caching sees the same sharing)."""

    index: int
    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    prefix_of: int | None = None


def prompt_ids(requests: Sequence[SimRequest], seed: int) -> Callable[[int], list[int]]:
    """Token ids for each request's prompt: random, except that a request extending an earlier
    one starts with that one's ids (drawn per request, so only intended prefixes are shared)."""

    def ids(i: int) -> list[int]:
        req = requests[i]
        head = ids(req.prefix_of) if req.prefix_of is not None else []
        head = head[: req.prompt_tokens - 1]
        rng = np.random.default_rng([seed, 7, i])
        return head + rng.integers(0, VOCAB, size=req.prompt_tokens - len(head)).tolist()

    return ids


class _Worker:
    """A simulated worker: an engine, its router-side state, and commands that its engine
    thread runs between steps."""

    def __init__(self, name: str, role: str, engine: LLMEngine) -> None:
        self.engine = engine
        self.state = WorkerState(url=name, role=role, healthy=True, kv_endpoint=f"{name}:kv")
        self.busy = False
        self.commands: deque[Callable[[float], None]] = deque()
        self.draining = False
        self.gpu: _SharedGpu | None = None  # None: a GPU of its own
        self.step_id = 0  # which of its steps a step-done event is for (a shared GPU reschedules)
        self.pending: tuple[list[StepOutput], float] = ([], 0.0)  # on a shared GPU: the step in flight

    @property
    def drained(self) -> bool:
        """Nothing left on it: no request queued or running, no block held (a prefill worker
        holds a prompt's blocks until its KV has landed)."""
        blocks = self.engine.blocks
        return not (self.busy or self.commands or self.engine.has_work()
                    or blocks.num_free_blocks < blocks.num_blocks)

    def refresh(self) -> None:
        self.state.set_load(self.engine.load())


class _SharedGpu:
    """A GPU that several workers' steps run on at once. While k of them have a step in flight,
    each progresses at ``1 / (1 + slowdown * (k - 1))`` of its own speed: ``slowdown`` 1 is
    processor sharing (pure time-slicing between the processes' contexts); less, steps that
    leave the GPU partly idle (launch-bound eager steps, host work) and lose less to each other.
    The latency model's ``sharing.slowdown`` sets it (``sim_validate`` measures it). Tracks each
    in-flight step's remaining work (ms at full speed) and says when each would end."""

    def __init__(self, slowdown: float = 1.0) -> None:
        self.slowdown = slowdown
        self.remaining: dict[_Worker, float] = {}
        self.since = 0.0  # when ``remaining`` was last brought up to date

    def _speed(self) -> float:
        return 1.0 / (1.0 + self.slowdown * (len(self.remaining) - 1)) if self.remaining else 1.0

    def _advance(self, now: float) -> None:
        if self.remaining:
            done = (now - self.since) * self._speed()
            for w in self.remaining:
                self.remaining[w] -= done
        self.since = now

    def start(self, now: float, w: _Worker, work_ms: float) -> None:
        self._advance(now)
        self.remaining[w] = work_ms

    def finish(self, now: float, w: _Worker) -> None:
        self._advance(now)
        del self.remaining[w]

    def ends(self, now: float) -> list[tuple[_Worker, float]]:
        """Each in-flight step's end if the sharing stays as it is from ``now``."""
        speed = self._speed()
        return [(w, now + max(left, 0.0) / speed) for w, left in self.remaining.items()]


@dataclass
class _Flight:
    """A request in the simulated system."""

    req: SimRequest
    record: RequestRecord
    last_ms: float | None = None


class Simulation:
    """Runs ``requests`` through the deployment ``config``; ``run`` returns one record per
    request, in the bench's format (seconds, relative to the run's start).

    ``watch``, when given, is called with a request's record and the time (ms; None for a
    failure) when its first token leaves, when it finishes and when it fails; once it returns
    True the run stops there (``stopped``), and the requests still unfinished are recorded as
    failed (a search that only needs to know a run misses its target stops it once enough
    requests have missed)."""

    def __init__(self, config: SimConfig, latency: LatencyModel, requests: Sequence[SimRequest],
                 seed: int = 0, watch: Callable[[RequestRecord, float | None], bool] | None = None) -> None:
        self.config, self.latency, self.requests = config, latency, list(requests)
        self._ids = prompt_ids(self.requests, seed)
        lay = config.layout
        self.prefills = [self._worker(f"sim://prefill-{i}", "prefill", False, seed)
                         for i in range(lay.num_prefill)]
        self.decodes = [self._worker(f"sim://decode-{i}", "decode", lay.colocated, seed)
                        for i in range(lay.num_decode)]
        if lay.shared:
            gpus = [_SharedGpu(latency.sharing_slowdown) for _ in range(lay.num_gpus)]
            for i, w in enumerate((*self.prefills, *self.decodes)):
                w.gpu = gpus[i % lay.num_gpus]
        self._overhead_rng = random.Random(f"{seed}/overhead")
        self._request_overhead = (latency.overhead_split_request_ms
                                  if not lay.colocated and latency.overhead_split_request_ms
                                  else latency.overhead_request_ms)
        self._handoff_overhead = () if latency.overhead_split_request_ms else latency.overhead_handoff_ms
        self._per_inflight = (latency.overhead_split_request_per_inflight_ms
                              if not lay.colocated and latency.overhead_split_request_ms
                              else latency.overhead_request_per_inflight_ms)
        if not any(self._per_inflight):
            self._per_inflight = ()
        self.in_flight = 0  # requests arrived and not yet finished (counted when _per_inflight is set)
        self.policy = build_policy(config.policy, latency)
        self._events: list[tuple[float, int, Callable[..., None], tuple]] = []
        self._order = itertools.count()
        self._flights: dict[str, _Flight] = {}
        # prefill-only sequence id -> (its decode sequence, the decode worker holding its blocks)
        self._pending: dict[int, tuple[EngineSeq, _Worker]] = {}
        self.steps = 0
        # worker name -> [ms its GPU was taken, ms its drain began, ms it was given back]
        self.gpu_spans: dict[str, list[float | None]] = {
            w.state.url: [0.0, None, None] for w in (*self.prefills, *self.decodes)}
        self._names = itertools.count()
        self._added: dict[str, _Worker] = {}  # workers add_worker made, ready or not
        self._seed = seed
        self._watch = watch
        self.stopped = False

    def _worker(self, name: str, role: str, chunked_prefill: bool, seed: int) -> _Worker:
        return _Worker(name, role, sim_engine(self.config.shape, self.latency, chunked_prefill, f"{seed}/{name}"))

    def _draw(self, values: tuple[float, ...]) -> float:
        """One of a measured overhead's equally likely values (0 when none was measured)."""
        return self._overhead_rng.choice(values) if values else 0.0

    def _at(self, t_ms: float, fn: Callable[..., None], *args: object) -> None:
        heapq.heappush(self._events, (t_ms, next(self._order), fn, args))

    def at(self, t_ms: float, fn: Callable[[float], None]) -> None:
        """Call ``fn(t_ms)`` at ``t_ms`` of simulated time (e.g. a planner's tick)."""
        self._at(t_ms, fn)

    def record(self, index: int) -> RequestRecord:
        """Request ``index``'s record as it stands now (filled in as its tokens leave)."""
        return self._flights[str(index)].record

    # -- fleet changes: a pod that starts, a pod that drains (sim/autoscale.py drives them)

    def add_worker(self, role: str, now_ms: float, ready_ms: float) -> str:
        """A new ``role`` worker whose GPU counts from ``now_ms`` and that the router may pick
        from ``ready_ms`` on (the pod's start time); returns its name."""
        if role not in ("prefill", "decode"):
            raise ValueError(f"role must be prefill or decode, not {role!r}")
        name = f"sim://{role}-n{next(self._names)}"
        chunked = role == "decode" and self.config.layout.colocated
        w = self._worker(name, role, chunked, self._seed)
        self.gpu_spans[name] = [now_ms, None, None]
        pool = self.prefills if role == "prefill" else self.decodes
        self._at(ready_ms, lambda t: pool.append(w) if not w.draining else None)
        self._added[name] = w
        return name

    def drain_worker(self, name: str, now_ms: float) -> None:
        """The router picks ``name`` no more; it finishes what it holds, and its GPU stops
        counting once it holds nothing (at once for a pod that was not ready yet)."""
        w = self._added.pop(name, None) or next(
            x for x in (*self.prefills, *self.decodes) if x.state.url == name)
        w.draining = True
        self.gpu_spans[name][1] = now_ms
        for pool in (self.prefills, self.decodes):
            if w in pool:
                pool.remove(w)
        self._stop_if_drained(now_ms, w)

    def _stop_if_drained(self, t: float, w: _Worker) -> None:
        if w.draining and w.drained and self.gpu_spans[w.state.url][2] is None:
            self.gpu_spans[w.state.url][2] = t

    def run(self) -> list[RequestRecord]:
        for req in self.requests:
            record = RequestRecord(index=req.index, scheduled_s=req.arrival_s, sent_s=req.arrival_s,
                                   prompt_tokens=req.prompt_tokens, max_tokens=req.max_tokens)
            self._flights[str(req.index)] = _Flight(req, record)
            if self._per_inflight:
                self._at(req.arrival_s * 1000, self._arrive, str(req.index))
                continue
            t = req.arrival_s * 1000 + self.config.overhead_ms + self._draw(self._request_overhead)
            self._at(t, self._route, str(req.index), t + self.config.max_queue_ms)
        while self._events and not self.stopped:
            t, _, fn, args = heapq.heappop(self._events)
            fn(t, *args)
        records = [f.record for f in self._flights.values()]
        for r in records:
            if r.e2e_s is None and r.error is None:
                r.error = "simulation stopped early" if self.stopped else "simulation ended with the request unfinished"
        return sorted(records, key=lambda r: r.index)

    def _arrive(self, t: float, rid: str) -> None:
        """A request arrives where the overhead grows with the requests in flight, per decode
        (or colocated) worker: each worker's process, and the router's share, carry its streams."""
        load = self.in_flight / max(1, len(self.decodes))
        values, growth = self._request_overhead, self._per_inflight
        k = self._overhead_rng.randrange(len(values)) if values else 0
        t += (self.config.overhead_ms + (values[k] if values else 0.0)
              + growth[k if len(growth) > 1 else 0] * load)
        self.in_flight += 1
        self._at(t, self._route, rid, t + self.config.max_queue_ms)

    # -- the router

    def _route(self, t: float, rid: str, deadline: float) -> None:
        flight = self._flights[rid]
        for w in (*self.prefills, *self.decodes):
            w.refresh()
        ids = self._ids(flight.req.index)
        rreq = RouteRequest(ids, flight.req.max_tokens, self.config.slo,
                            self.config.shape.block_size, with_prefill=bool(self.prefills))
        try:
            decision = self.policy.pick(rreq, [w.state for w in self.prefills],
                                        [w.state for w in self.decodes])
        except SloUnattainable as exc:
            if t < deadline:  # the next round, or one last ask at the deadline
                self._at(min((t // POLL_ROUND_MS + 1) * POLL_ROUND_MS, deadline), self._route, rid, deadline)
            else:
                self._fail(flight, f"HTTP 429: {exc.reason} (shed after {self.config.max_queue_ms:g} ms)")
            return
        except NoCandidate as exc:  # Unservable: no cache could ever hold the prompt (the router's 400)
            self._fail(flight, f"HTTP {400 if isinstance(exc, Unservable) else 503}: {exc}")
            return
        self.policy.on_routed(rreq, decision)
        d = self._by_url(self.decodes, decision.decode.url)
        sampling = SamplingParams(max_tokens=flight.req.max_tokens, temperature=0.0, ignore_eos=True)
        seq = EngineSeq(rid, ids, sampling)
        try:
            if decision.prefill is None:
                d.engine.add(seq)
                self._kick(d, t)
                return
            d.engine.reserve(seq)
        except (PromptTooLong, ValueError, NoFreeBlocks) as exc:  # as the decode worker refuses it
            self._fail(flight, f"{type(exc).__name__}: {exc}")
            return
        p = self._by_url(self.prefills, decision.prefill.url)
        pseq = EngineSeq(rid, ids, sampling, prefill_only=True)
        self._pending[pseq.seq_id] = (seq, d)
        p.engine.add(pseq)
        self._kick(p, t)

    @staticmethod
    def _by_url(workers: list[_Worker], url: str) -> _Worker:
        return next(w for w in workers if w.state.url == url)

    def _fail(self, flight: _Flight, error: str) -> None:
        flight.record.error = error
        if self._per_inflight:
            self.in_flight -= 1
        if self._watch is not None and self._watch(flight.record, None):
            self.stopped = True

    # -- workers

    def _kick(self, w: _Worker, t: float) -> None:
        """Wake an idle worker: it runs its commands, then its next step."""
        if not w.busy:
            self._step(t, w)

    def _step(self, t: float, w: _Worker) -> None:
        while w.commands:
            w.commands.popleft()(t)
        before = w.engine.scheduler.launched
        outputs = w.engine.step()
        if w.engine.scheduler.launched == before:
            w.busy = False
            self._deliver(t, w, outputs)
            self._stop_if_drained(t, w)
            return
        self.steps += 1
        w.busy = True
        if w.gpu is None:
            self._at(t + w.engine.runner.last_ms, self._step_done, w, outputs, t, w.step_id)
            return
        w.gpu.start(t, w, w.engine.runner.last_ms)
        w.pending = (outputs, t)
        self._reschedule(t, w.gpu)

    def _reschedule(self, t: float, gpu: _SharedGpu) -> None:
        """The sharing of ``gpu`` changed at ``t``: every step in flight on it ends at a new time
        (the events already queued for them go stale)."""
        for w, end in gpu.ends(t):
            w.step_id += 1
            outputs, started = w.pending
            self._at(end, self._step_done, w, outputs, started, w.step_id)

    def _step_done(self, t: float, w: _Worker, outputs: list[StepOutput], started: float, step_id: int) -> None:
        if step_id != w.step_id:
            return  # rescheduled: a shared GPU's sharing changed since this event was queued
        if w.gpu is not None:
            w.gpu.finish(t, w)
            self._reschedule(t, w.gpu)
        self._deliver(t, w, outputs, started)
        self._step(t, w)

    def _deliver(self, t: float, w: _Worker, outputs: list[StepOutput], started: float | None = None) -> None:
        emit = self._emit
        for out in outputs:
            if out.seq.prefill_only:
                self._prefilled(t, w, out, t if started is None else started)
            else:
                emit(t, out)

    def _prefilled(self, t: float, p: _Worker, out: StepOutput, started: float) -> None:
        """The prompt is computed on ``p``: its KV lands on the decode worker, which activates
        it between steps; ``p`` frees its blocks once the transfer is done."""
        seq, d = self._pending.pop(out.seq.seq_id)
        landed = transfer_done_ms(self.latency, out.seq.num_prompt_tokens, started, t)
        first = out.token_id
        pseq = out.seq

        def activate(now: float) -> None:
            self._emit(now, d.engine.activate(seq, first))

        def release(now: float) -> None:
            p.engine.release(pseq)

        self._at(landed + self._draw(self._handoff_overhead), self._command, d, activate)
        self._at(landed, self._command, p, release)

    def _command(self, t: float, w: _Worker, fn: Callable[[float], None]) -> None:
        w.commands.append(fn)
        self._kick(w, t)

    def _emit(self, t: float, out: StepOutput) -> None:
        """A token leaves a decode (or colocated) worker at ``t`` ms."""
        flight = self._flights[out.seq.request_id]
        rec = flight.record
        if flight.last_ms is None:
            rec.ttft_s = t / 1000 - rec.sent_s
        else:
            rec.itl_s.append((t - flight.last_ms) / 1000)
        flight.last_ms = t
        rec.output_tokens += 1
        if out.finished:
            rec.e2e_s, rec.finish_reason = t / 1000 - rec.sent_s, out.seq.finish_reason
            if self._per_inflight:
                self.in_flight -= 1
        if self._watch is not None and (out.finished or rec.output_tokens == 1) and self._watch(rec, t):
            self.stopped = True
