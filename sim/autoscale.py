"""The planner in the loop of a simulation: every tick it reads what the cluster's SLO loop would
read, decides with ``operator/planner.py``'s own ``plan``, and the simulated pools follow.

Each tick (``tick_s``, the operator's ``SPLITSERVE_SLO_TICK_SECONDS``) the loop measures over
the metrics window (``windowSeconds``) what the router exports: the prompt-token arrival rate,
sequences in flight (the larger of Little's law over the finished requests and the in-flight
gauge, as ``operator/observe.py`` computes it), TTFT and TPOT attainment of the requests that
finished; a planner that ``sees_queues`` also gets the prompt tokens waiting in the prefill
workers' queues and the age of the oldest request without its first token. The planner's
replicas per pool count pods starting and ready, as a Deployment's do; the pools follow:

- scale up: a new worker takes its GPU at once and serves after ``start_delay_s`` (the pod's
  start: image, weights, warm-up);
- scale down: a pod not ready yet goes first (a ReplicaSet deletes unready pods first), then the
  ready one holding the fewest requests; it drains (the router picks it no more, it finishes
  what it holds) and its GPU stops counting when it holds nothing.

All clocks (tick, windows, cooldowns, start delay, forecast horizon) are in simulated seconds:
``compressed`` divides a real-time configuration by the day's compression (``sim/day.py``).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from splitserve.bench.stats import SLO, meets
from splitserve.operator import scaling
from splitserve.operator.planner import Capacity, Observation, PlannerConfig, PoolState, plan
from splitserve.sim.cluster import SimRequest, Simulation

ROLES = ("prefill", "decode")
# the CRD's defaults (operator/crd.py): spec.autoscaling's windows and cooldowns, seconds
CRD_AUTOSCALING = {"windowSeconds": 60, "scaleUpCooldownSeconds": 60, "scaleDownCooldownSeconds": 300}


@dataclass(frozen=True)
class LoopConfig:
    """The control loop around the planner, in simulated seconds."""

    planner: PlannerConfig | None  # None: a fixed fleet
    tick_s: float
    start_delay_s: float
    window_s: float  # the metrics window
    sees_queues: bool = True

    def compressed(self, factor: float) -> LoopConfig:
        """This configuration with every clock divided by ``factor`` (a time-compressed day)."""
        p = self.planner
        if p is not None:
            p = replace(p, window_s=p.window_s / factor,
                        scale_up_cooldown_s=p.scale_up_cooldown_s / factor,
                        scale_down_cooldown_s=p.scale_down_cooldown_s / factor,
                        scale_up_window_s=p.scale_up_window_s / factor,
                        lead_time_s=p.lead_time_s / factor)
        return replace(self, planner=p, tick_s=self.tick_s / factor,
                       start_delay_s=self.start_delay_s / factor, window_s=self.window_s / factor)


def planner_v2(prefill: tuple[int, int], decode: tuple[int, int], capacity: Capacity, slo: SLO,
               start_delay_s: float, headroom: float = 0.8) -> PlannerConfig:
    """The planner as the operator configures it from a spec with the CRD's defaults
    (``scaling.planner_config``), its forecast horizon set to the pods' start time."""
    spec = {
        "prefill": {"replicas": prefill[0], "minReplicas": prefill[0], "maxReplicas": prefill[1]},
        "decode": {"replicas": decode[0], "minReplicas": decode[0], "maxReplicas": decode[1]},
        "autoscaling": {**CRD_AUTOSCALING, "enabled": True, "headroom": headroom},
        "slo": {"ttftMs": slo.ttft_s * 1000, "tpotMs": slo.tpot_s * 1000, "attainment": slo.attainment},
    }
    return replace(scaling.planner_config(spec, capacity), lead_time_s=start_delay_s)


def reactive(cfg: PlannerConfig) -> PlannerConfig:
    """The planner as it was before v2 (``git show b9c3744:operator/planner.py``): sized from the
    last window's load alone: scale up at once, no forecast, no margin feedback, no hysteresis
    (the loop also hides the queues from it: ``LoopConfig.sees_queues=False``)."""
    return replace(cfg, scale_up_window_s=0.0, lead_time_s=0.0, margin_step=0.0, hysteresis=1.0)


@dataclass
class _Window:
    """What the router's counters hold over the metrics window."""

    arrivals: deque[tuple[float, int]] = field(default_factory=deque)  # (time, prompt tokens)
    finished: deque[tuple[float, float, bool, bool]] = field(default_factory=deque)  # (t, e2e, ttft ok, tpot ok)

    def prune(self, now: float, span: float) -> None:
        for q in (self.arrivals, self.finished):
            while q and q[0][0] <= now - span:
                q.popleft()


@dataclass
class _Pod:
    name: str
    ready_s: float


class Autoscaler:
    """Drives ``sim``'s pools from the planner; ``timeline`` holds one row per tick."""

    def __init__(self, sim: Simulation, requests: list[SimRequest], loop: LoopConfig, slo: SLO,
                 end_s: float) -> None:
        self.sim, self.loop, self.slo, self.end_s = sim, loop, slo, end_s
        self.requests = sorted(requests, key=lambda r: r.arrival_s)
        self.pods = {"prefill": [_Pod(w.state.url, 0.0) for w in sim.prefills],
                     "decode": [_Pod(w.state.url, 0.0) for w in sim.decodes]}
        self.states = {role: PoolState(len(self.pods[role])) for role in ROLES}
        self.timeline: list[dict[str, Any]] = []
        self.reasons: list[tuple[float, str]] = []
        self._next = 0  # the next request to arrive
        self._open: dict[int, SimRequest] = {}  # arrived, not finished
        self._win = _Window()

    def start(self) -> None:
        self.sim.at(0.0, self.tick)

    def tick(self, t_ms: float) -> None:
        now = t_ms / 1000
        self._advance(now)
        obs = self.observe(now)
        if self.loop.planner is not None:
            d = plan(self.loop.planner, obs, self.states["prefill"], self.states["decode"], now)
            self.states = {"prefill": d.prefill_state, "decode": d.decode_state}
            for role, n in (("prefill", d.prefill), ("decode", d.decode)):
                self._resize(role, n, now)
            self.reasons += [(now, r) for r in d.reasons if "->" in r]
        self.timeline.append(self._row(now, obs))
        if now + self.loop.tick_s < self.end_s:
            self.sim.at(t_ms + self.loop.tick_s * 1000, self.tick)

    # -- measuring, as the router's metrics would

    def _advance(self, now: float) -> None:
        while self._next < len(self.requests) and self.requests[self._next].arrival_s <= now:
            r = self.requests[self._next]
            self._open[r.index] = r
            self._win.arrivals.append((r.arrival_s, r.prompt_tokens))
            self._next += 1
        for i in [i for i in self._open if self._done(i)]:
            rec, req = self.sim.record(i), self._open.pop(i)
            e2e = rec.e2e_s if rec.e2e_s is not None else now - req.arrival_s
            ttft_ok, tpot_ok = meets(rec, self.slo)
            self._win.finished.append((min(now, req.arrival_s + e2e), e2e, ttft_ok, tpot_ok))
        self._win.prune(now, self.loop.window_s)

    def _done(self, index: int) -> bool:
        rec = self.sim.record(index)
        return rec.e2e_s is not None or rec.error is not None

    def observe(self, now: float) -> Observation:
        span = self.loop.window_s
        prompt_rate = sum(n for _, n in self._win.arrivals) / span
        fin = self._win.finished
        concurrent = max(sum(e for _, e, _, _ in fin) / span, float(len(self._open)))
        ttft = sum(ok for _, _, ok, _ in fin) / len(fin) if fin else None
        tpot = sum(ok for _, _, _, ok in fin) / len(fin) if fin else None
        if not self.loop.sees_queues:
            return Observation(prompt_rate, concurrent)
        waiting = [r.arrival_s for i, r in self._open.items() if self.sim.record(i).ttft_s is None]
        queued = sum(w.engine.scheduler.queued_prompt_tokens for w in self.sim.prefills)
        return Observation(prompt_rate, concurrent, queued_prompt_tokens=float(queued),
                           oldest_wait_s=now - min(waiting) if waiting else 0.0,
                           ttft_attainment=ttft, tpot_attainment=tpot)

    # -- the pools follow

    def _resize(self, role: str, n: int, now: float) -> None:
        pods = self.pods[role]
        while len(pods) < n:
            ready = now + self.loop.start_delay_s
            pods.append(_Pod(self.sim.add_worker(role, now * 1000, ready * 1000), ready))
        while len(pods) > n:
            pod = min(pods, key=lambda p: (p.ready_s <= now, self._held(p.name), -p.ready_s))
            pods.remove(pod)
            self.sim.drain_worker(pod.name, now * 1000)

    def _held(self, name: str) -> int:
        w = next((w for w in (*self.sim.prefills, *self.sim.decodes) if w.state.url == name), None)
        if w is None:
            return 0
        sched, blocks = w.engine.scheduler, w.engine.blocks
        return len(sched.waiting) + len(sched.running) + blocks.num_blocks - blocks.num_free_blocks

    def _row(self, now: float, obs: Observation) -> dict[str, Any]:
        fin = self._win.finished
        row: dict[str, Any] = {"t": round(now, 3), "gpus": self.gpus_at(now * 1000),
                               "prompt_tokens_per_s": round(obs.prompt_tokens_per_s or 0.0, 1),
                               "concurrent": round(obs.concurrent_seqs, 1),
                               "attainment": (round(sum(a and b for _, _, a, b in fin) / len(fin), 4)
                                              if fin else None)}
        for role in ROLES:
            row[role] = len(self.pods[role])
            row[f"{role}_ready"] = sum(p.ready_s <= now for p in self.pods[role])
        return row

    def gpus_at(self, t_ms: float) -> int:
        """GPUs held at ``t_ms``: pods starting, serving or draining."""
        return sum(a <= t_ms and (b is None or b > t_ms) for a, _, b in self.sim.gpu_spans.values())


def gpu_seconds(sim: Simulation, end_s: float, compress: float = 1.0) -> float:
    """Real GPU-seconds held over the simulated [0, end_s]: each pod from its creation to the
    end of its drain. Its life until the drain began is control-loop time (``compress`` real
    seconds per simulated one); the drain itself is request time (its requests finishing),
    which the compression leaves at its real length, so it counts once."""
    end_ms = end_s * 1000
    total = 0.0
    for start, drain, stop in sim.gpu_spans.values():
        held_until = end_ms if drain is None else min(drain, end_ms)
        total += max(0.0, held_until - start) * compress
        if drain is not None:
            total += max(0.0, min(end_ms if stop is None else stop, end_ms) - drain)
    return total / 1000


def replicas_for_rate(rate: float, mean_prompt: float, life_s: float, capacity: Capacity,
                      headroom: float) -> tuple[int, int]:
    """(prefill, decode) replicas for ``rate`` requests/s by the planner's arithmetic: prompt
    tokens per second over prefill capacity, sequences in flight (Little's law: rate x a
    request's life) over decode capacity, each at ``headroom``."""
    p = math.ceil(rate * mean_prompt / (capacity.prefill_tokens_per_s_at_ttft * headroom))
    d = math.ceil(rate * life_s / (capacity.decode_seqs_at_tpot * headroom))
    return max(1, p), max(1, d)
