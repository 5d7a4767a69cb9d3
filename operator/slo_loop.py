"""The SLO loop: each tick, per InferenceService, measure -> report -> plan -> scale.

1. scrape the router's /metrics (``settings.metrics_url``) and keep the scrape in memory (after
   an operator restart the first window just starts again);
2. read the window against the newest kept scrape at least ``spec.autoscaling.windowSeconds``
   old (``observe.window``): p50/p90 TTFT and TPOT, attainment, load;
3. write ``status.ttftMs``/``tpotMs`` (p90), ``attainment`` and ``status.observed``;
4. when ``spec.autoscaling.enabled``, run the planner with its memory from the status, write its
   choice to ``status.autoscaling`` and apply the prefill and decode Deployments at that size
   (``scaling.py`` says why the spec is never written), with a ``Scaled`` Event saying why.

A tick that cannot scrape changes nothing (no data is not "no load"); a window in which a
counter went down (router restart) is skipped and the scrape becomes the new baseline.

Why one operator-wide loop and not ``@kopf.timer``: kopf puts a finalizer on every object that
has a timer or daemon (to stop it before the object goes), and this operator deliberately has
none, so an InferenceService can be deleted while the operator is down or uninstalled (see
``handlers``). The loop learns which objects exist from kopf's watch (``SloLoop.note``, called
by an ``@kopf.on.event`` handler, which needs no finalizer) and ticks them all concurrently.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from splitserve.operator import capacity as capacity_mod
from splitserve.operator import crd, kube, metrics, observe, reconcile, scaling, settings
from splitserve.operator.planner import Decision, Observation, plan
from splitserve.router.policy.latency import LatencyModel

log = logging.getLogger(__name__)
# what a tick may raise that is not a bug: logged in one line and retried at the next tick
EXPECTED_ERRORS = (kopf.TemporaryError, kopf.PermanentError, ApiException, ValueError, OSError)


@dataclass
class Memory:
    """What one InferenceService's loop keeps between ticks in this process."""

    scrapes: list[observe.Snapshot] = field(default_factory=list)
    failing: bool = False  # the last scrape failed (warn once per failure streak)


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@functools.cache
def latency_model(path: str | None) -> LatencyModel | None:
    """The mounted latency model, loaded once; a bad file is an error, never a silent default."""
    return LatencyModel.load(path) if path else None


def baseline(scrapes: list[observe.Snapshot], now: float, window_s: float) -> int | None:
    """Index of the newest scrape at least ``window_s`` old, or None while none is."""
    old = [i for i, s in enumerate(scrapes) if now - s.at >= window_s]
    return old[-1] if old else None


def observed_status(win: observe.Window, now: float) -> dict[str, Any]:
    """The status fields every tick writes (None deletes a field: nothing finished)."""
    ms = None if win.ttft_p90_ms is None else round(win.ttft_p90_ms, 1)
    tpot = None if win.tpot_p90_ms is None else round(win.tpot_p90_ms, 1)
    att = None if win.attainment is None else round(win.attainment, 3)
    return {
        "ttftMs": ms,
        "tpotMs": tpot,
        "attainment": att,
        "observed": {**win.to_status(), "time": _iso(now)},
    }


def decide(
    spec: dict[str, Any],
    status: dict[str, Any] | None,
    win: observe.Window,
    cap: capacity_mod.SourcedCapacity,
    now: float,
) -> tuple[Decision, dict[str, Any], str | None]:
    """One planner step for a defaulted spec: (decision, status patch, Event message or None
    when neither pool changes size)."""
    before = scaling.effective_replicas(spec, status)
    states = {pool: scaling.pool_state(spec, status, pool) for pool in scaling.POOLS}
    cfg = scaling.planner_config(spec, cap.capacity)
    obs = Observation(win.prompt_tokens_per_s, win.concurrent_seqs)
    d = plan(cfg, obs, states["prefill"], states["decode"], now)
    after = {"prefill": d.prefill, "decode": d.decode}
    patch: dict[str, Any] = {
        "autoscaling": {
            "prefill": scaling.pool_state_status(d.prefill_state),
            "decode": scaling.pool_state_status(d.decode_state),
        }
    }
    if after == before:
        return d, patch, None
    prompt = (
        "not measured"
        if win.prompt_tokens_per_s is None
        else f"{win.prompt_tokens_per_s:.0f} tokens/s"
    )
    c = cap.capacity
    message = (
        f"{'; '.join(d.reasons)}. Load over {win.seconds:.0f}s: {win.concurrent_seqs:.1f}"
        f" concurrent sequences, prompt {prompt}. Per replica at the SLO ({cap.source}):"
        f" {c.decode_seqs_at_tpot:g} sequences, {c.prefill_tokens_per_s_at_ttft:g} prompt"
        f" tokens/s; headroom {cfg.headroom:g}."
    )
    patch["lastScaling"] = {
        "time": _iso(now),
        "prefill": {"from": before["prefill"], "to": d.prefill},
        "decode": {"from": before["decode"], "to": d.decode},
        "reason": message,
    }
    return d, patch, message


def _scrape(url: str, memory: Memory, logger: logging.Logger) -> observe.Snapshot | None:
    try:
        snap = observe.parse(observe.fetch(url), time.monotonic())
    except observe.MetricsUnavailable as exc:
        metrics.SCRAPES.labels("error").inc()
        if not memory.failing:
            logger.warning("SLO loop: %s (pools keep their size until it answers)", exc)
        memory.failing = True
        return None
    metrics.SCRAPES.labels("ok").inc()
    if memory.failing:
        logger.info("SLO loop: %s answers again", url)
    memory.failing = False
    return snap


def _window(memory: Memory, snap: observe.Snapshot, window_s: float) -> observe.Window | None:
    """Add ``snap`` to the memory and return the window it closes, if one is complete."""
    i = baseline(memory.scrapes, snap.at, window_s)
    if i is None:
        memory.scrapes.append(snap)
        return None
    base = memory.scrapes[i]
    memory.scrapes = memory.scrapes[i:] + [snap]  # older ones can never be a baseline again
    win = observe.window(base, snap)
    if win is None:
        memory.scrapes = [snap]  # counters went down: start again from here
    return win


def tick(name: str, namespace: str, memory: Memory, logger: logging.Logger = log) -> None:
    """One tick for one InferenceService (``SloLoop`` calls it in a worker thread; API errors
    propagate to it and the next tick tries again)."""
    obj = kube.get_inference_service(namespace, name)
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        return
    spec = crd.defaulted_spec(dict(obj["spec"]))
    snap = _scrape(settings.metrics_url(name, namespace), memory, logger)
    if snap is None:
        return
    win = _window(memory, snap, float(spec["autoscaling"]["windowSeconds"]))
    if win is None:
        return
    now = time.time()
    patch = observed_status(win, now)
    if not scaling.enabled(spec):
        kube.patch_status(namespace, name, patch)
        return
    with reconcile.lock_for(namespace, name):
        obj = kube.get_inference_service(namespace, name)  # fresh: under the lock
        if obj is None:
            return
        spec = crd.defaulted_spec(dict(obj["spec"]))
        cap = capacity_mod.for_spec(spec, latency_model(settings.LATENCY_MODEL))
        decision, scale_patch, message = decide(spec, obj.get("status"), win, cap, now)
        kube.patch_status(namespace, name, patch | scale_patch)
        # every tick, not only on a change: heals a Deployment someone else resized
        reconcile.apply_worker_replicas(
            obj, {"prefill": decision.prefill, "decode": decision.decode}
        )
    for pool in scaling.POOLS:
        replicas = getattr(decision, pool)
        metrics.PLANNER_REPLICAS.labels(namespace, name, pool).set(replicas)
    if message:
        logger.info("Scaled: %s", message)
        kopf.info(obj, reason="Scaled", message=message)


class SloLoop:
    """The operator-wide loop: the InferenceServices kopf has seen, each with its Memory, ticked
    every ``interval`` seconds. Started and stopped by the startup/cleanup handlers."""

    def __init__(self, interval: float) -> None:
        if interval <= 0:
            raise ValueError(f"SLO loop interval must be > 0, not {interval}")
        self.interval = interval
        self._objects: dict[tuple[str, str], Memory] = {}
        self._lock = threading.Lock()  # note() runs on kopf's loop, ticks in worker threads
        self._task: asyncio.Task[None] | None = None

    def note(self, event_type: str | None, namespace: str, name: str) -> None:
        """Track an object from a watch event (None: kopf's initial listing)."""
        with self._lock:
            if event_type == "DELETED":
                self._objects.pop((namespace, name), None)
            else:
                self._objects.setdefault((namespace, name), Memory())

    def tracked(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(self._objects)

    async def _tick_one(self, namespace: str, name: str) -> None:
        with self._lock:
            memory = self._objects.get((namespace, name))
        if memory is None:
            return
        # kopf's context (its event-posting queue) must reach the thread: kopf.info needs it
        ctx = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, ctx.run, tick, name, namespace, memory)

    async def run(self) -> None:
        """Tick every tracked object concurrently, sleep, repeat. One object's failure is
        logged (with its traceback when unexpected) and retried next tick; it never stops the
        loop for the others."""
        while True:
            keys = self.tracked()
            results = await asyncio.gather(
                *(self._tick_one(ns, name) for ns, name in keys), return_exceptions=True
            )
            for (ns, name), result in zip(keys, results, strict=True):
                if isinstance(result, EXPECTED_ERRORS):
                    log.warning("SLO loop for %s/%s: %s", ns, name, result)
                elif isinstance(result, BaseException):
                    log.error("SLO loop for %s/%s failed", ns, name, exc_info=result)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        """Start the loop on the running event loop (idempotent). The task copies the caller's
        context, and ``kopf.info`` needs kopf's posting queue from it: call from a handler."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="slo-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
