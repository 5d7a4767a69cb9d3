"""The SLO loop: each tick, per InferenceService, measure -> report -> plan -> scale.

1. find the ready router pods (``router_pods``: the ready pods the router Service selects; or the one
   ``SPLITSERVE_METRICS_URL``) and scrape each pod's /metrics, concurrently; each pod's scrapes
   are kept in memory under its uid (after an operator restart the first window just starts
   again);
2. read each pod's delta against its own scrape at least ``spec.autoscaling.windowSeconds`` old
   and add the pods' deltas into one window (``pod_windows``, ``observe.merge``): p50/p90 TTFT
   and TPOT, attainment, load of the whole router Deployment;
3. write ``status.ttftMs``/``tpotMs`` (p90), ``attainment`` and ``status.observed``;
4. when ``spec.autoscaling.enabled``, run the planner with its memory from the status, write its
   choice to ``status.autoscaling`` and apply the prefill and decode Deployments at that size
   (``scaling.py`` says why the spec is never written), with a ``Scaled`` Event saying why.

A pod that cannot be scraped is left out of the tick (warned once per failure streak); a tick
that can scrape no pod changes nothing (no data is not "no load"). A pod whose counters went
down (its router restarted) starts a new baseline of its own; a pod that appeared starts one; a
pod that is gone drops out.

Why one operator-wide loop and not ``@kopf.timer``: kopf puts a finalizer on every object that
has a timer or daemon (to stop it before the object goes), and this operator deliberately has
none, so an InferenceService can be deleted while the operator is down or uninstalled (see
``handlers``). The loop learns which objects exist from kopf's watch (``SloLoop.note``, called
by an ``@kopf.on.event`` handler, which needs no finalizer) and ticks them all concurrently.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import datetime as dt
import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from splitserve.operator import capacity as capacity_mod
from splitserve.operator import (
    crd,
    kube,
    metrics,
    observe,
    pod_start,
    pod_windows,
    reconcile,
    router_pods,
    scaling,
    settings,
)
from splitserve.operator.planner import Decision, Observation, PlannerConfig, plan, replicas_for
from splitserve.router.policy.latency import LatencyModel

log = logging.getLogger(__name__)
# what a tick may raise that is not a bug: logged in one line and retried at the next tick
EXPECTED_ERRORS = (kopf.TemporaryError, kopf.PermanentError, ApiException, ValueError, OSError)
MAX_PARALLEL_SCRAPES = 8  # router pods scraped at once (each scrape waits at most 5 s)


@dataclass
class Memory:
    """What one InferenceService's loop keeps between ticks in this process."""

    history: pod_windows.History = field(default_factory=pod_windows.History)
    failing: set[str] = field(default_factory=set)  # pods whose last scrape failed (warn once)
    no_pods: bool = False  # the last tick found no ready router pod (log once)


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@functools.cache
def latency_model(path: str | None) -> LatencyModel | None:
    """The mounted latency model, loaded once; a bad file is an error, never a silent default."""
    return LatencyModel.load(path) if path else None


def observed_status(win: observe.Window, now: float, kv: dict[str, Any] | None = None) -> dict[str, Any]:
    """The status fields every tick writes (None deletes a field: nothing finished);
    ``kv``: the KV links' summary (``observe.kv_summary``), None while no link is known."""
    ms = None if win.ttft_p90_ms is None else round(win.ttft_p90_ms, 1)
    tpot = None if win.tpot_p90_ms is None else round(win.tpot_p90_ms, 1)
    att = None if win.attainment is None else round(win.attainment, 3)
    return {
        "ttftMs": ms,
        "tpotMs": tpot,
        "attainment": att,
        "observed": {**win.to_status(), "time": _iso(now), "kvTransfer": kv},
    }


def decide(
    spec: dict[str, Any],
    status: dict[str, Any] | None,
    win: observe.Window,
    cap: capacity_mod.SourcedCapacity,
    now: float,
    lead_time_s: float | None = None,
) -> tuple[Decision, dict[str, Any], str | None]:
    """One planner step for a defaulted spec: (decision, status patch, Event message or None
    when neither pool changes size). ``lead_time_s``: the pods' measured start time (the
    forecast's horizon; None keeps the planner's default)."""
    before = scaling.effective_replicas(spec, status)
    states = {pool: scaling.pool_state(spec, status, pool) for pool in scaling.POOLS}
    cfg = scaling.planner_config(spec, cap.capacity)
    if lead_time_s is not None:
        cfg = dataclasses.replace(cfg, lead_time_s=lead_time_s)
    obs = Observation(win.prompt_tokens_per_s, win.concurrent_seqs,
                      prefill_busy_replicas=win.busy_workers.get("prefill", 0),
                      decode_busy_replicas=win.busy_workers.get("decode", 0),
                      queued_prompt_tokens=win.queued_prompt_tokens, oldest_wait_s=win.oldest_wait_s,
                      ttft_attainment=win.ttft_attainment, tpot_attainment=win.tpot_attainment)
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


def _scrape_one(target: router_pods.Target) -> observe.Snapshot:
    return observe.parse(observe.fetch(target.url), time.monotonic())


def _scrape(
    targets: list[router_pods.Target], memory: Memory, logger: logging.Logger
) -> tuple[dict[str, observe.Snapshot], set[str]]:
    """Scrape every target concurrently: (pod key -> snapshot, keys that failed)."""
    if not targets:
        memory.failing = set()
        return {}, set()
    scraped: dict[str, observe.Snapshot] = {}
    failed: set[str] = set()
    with ThreadPoolExecutor(min(len(targets), MAX_PARALLEL_SCRAPES)) as pool:
        futures = [(t, pool.submit(_scrape_one, t)) for t in targets]
        for target, fut in futures:
            try:
                scraped[target.key] = fut.result()
            except observe.MetricsUnavailable as exc:
                metrics.SCRAPES.labels("error").inc()
                failed.add(target.key)
                if target.key not in memory.failing:
                    logger.warning("SLO loop: router pod %s: %s (left out until it answers)",
                                   target.pod, exc)  # fmt: skip
                continue
            metrics.SCRAPES.labels("ok").inc()
            if target.key in memory.failing:
                logger.info("SLO loop: router pod %s answers again", target.pod)
    memory.failing = failed
    return scraped, failed


def _window(
    name: str, namespace: str, router: list[dict[str, Any]], memory: Memory, window_s: float,
    logger: logging.Logger,
) -> observe.Window | None:
    """Scrape the ``router`` pods and return the window this tick closes, if one is complete."""
    targets = router_pods.targets(name, namespace, router)
    if not targets:
        if not memory.no_pods:
            logger.info("SLO loop: no ready router pod to scrape (pools keep their size)")
        memory.no_pods = True
    else:
        memory.no_pods = False
    scraped, failed = _scrape(targets, memory, logger)
    # no pod read: None (no data is not "no load"); pods now gone are forgotten all the same
    return pod_windows.update(memory.history, scraped, failed, window_s)


def record_planner_metrics(namespace: str, name: str, decision: Decision,
                           spec: dict[str, Any], cap: capacity_mod.SourcedCapacity) -> None:
    """The planner's choice, need, inputs and margin per pool, as Prometheus gauges."""
    cfg = scaling.planner_config(spec, cap.capacity)
    per_replica = {"prefill": cap.capacity.prefill_tokens_per_s_at_ttft,
                   "decode": cap.capacity.decode_seqs_at_tpot}
    for pool in scaling.POOLS:
        state = getattr(decision, f"{pool}_state")
        labels = (namespace, name, pool)
        metrics.PLANNER_REPLICAS.labels(*labels).set(getattr(decision, pool))
        metrics.PLANNER_MARGIN.labels(*labels).set(state.margin)
        if state.demand:
            now_demand = state.demand[-1][1]
            metrics.PLANNER_DEMAND.labels(*labels).set(now_demand)
            metrics.PLANNER_DESIRED.labels(*labels).set(
                replicas_for(now_demand, per_replica[pool], cfg.headroom, state.margin))
        if state.forecast.level is not None:
            metrics.PLANNER_FORECAST.labels(*labels).set(state.forecast.level)


def tick(name: str, namespace: str, memory: Memory, logger: logging.Logger = log) -> None:
    """One tick for one InferenceService (``SloLoop`` calls it in a worker thread; API errors
    propagate to it and the next tick tries again)."""
    obj = kube.get_inference_service(namespace, name)
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        return
    listed_at = time.monotonic()
    pods = reconcile.pods_by_pool(name, namespace)  # one listing for the status, scrape and planner
    # a pod Running but not Ready for long changes nothing on the pod: only time says it
    reconcile.publish_status(namespace, name, pods=pods, listed_at=listed_at)
    spec = crd.defaulted_spec(dict(obj["spec"]))
    win = _window(name, namespace, pods["router"], memory,
                  float(spec["autoscaling"]["windowSeconds"]), logger)
    if win is None:
        return
    now = time.time()
    latest = [scrapes[-1] for scrapes in memory.history.pods.values() if scrapes]
    patch = observed_status(win, now, observe.kv_summary(latest))
    if not scaling.enabled(spec):
        kube.patch_status(namespace, name, patch)
        return
    with reconcile.lock_for(namespace, name):
        obj = kube.get_inference_service(namespace, name)  # fresh: under the lock
        if obj is None:
            return
        spec = crd.defaulted_spec(dict(obj["spec"]))
        cap = capacity_mod.for_spec(spec, latency_model(settings.LATENCY_MODEL))
        lead, measured = pod_start.lead_time(
            [p for pool in scaling.POOLS for p in pods[pool]], PlannerConfig.lead_time_s)
        patch["observed"]["podStartSeconds"] = round(lead, 1) if measured else None
        decision, scale_patch, message = decide(spec, obj.get("status"), win, cap, now,
                                                lead if measured else None)
        kube.patch_status(namespace, name, patch | scale_patch)
        # every tick, not only on a change: heals a Deployment someone else resized
        reconcile.apply_worker_replicas(
            obj, {"prefill": decision.prefill, "decode": decision.decode}
        )
    record_planner_metrics(namespace, name, decision, spec, cap)
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
