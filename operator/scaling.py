"""Where the planner's replicas live, and how the spec and the status become its inputs (pure).

The decision on where scaled replicas are written: the InferenceService's ``spec`` belongs to
its user (and often to a GitOps tool that would revert any write the operator made there), so
the planner never touches it. Its replicas go to ``status.autoscaling.<pool>.replicas``, next to
its memory between ticks (last change, the stabilisation window's history), and the renderer
sizes the prefill and decode Deployments from there whenever ``spec.autoscaling.enabled``. So:

- with autoscaling on, ``spec.<pool>.replicas`` is the starting size; ``minReplicas`` and
  ``maxReplicas`` bound the planner (an edit of the bounds applies at the next reconcile);
- every reconcile (create, update, resume) renders the same replicas the planner chose, so a
  spec edit elsewhere never snaps a pool back to ``spec.<pool>.replicas``;
- turning autoscaling off returns the pools to ``spec.<pool>.replicas``;
- the memory lives in the status, so an operator restart keeps cooldowns and windows.

This is the HorizontalPodAutoscaler pattern (the scaler owns the replica count, the user's
manifest does not carry it), with the count kept where ``kubectl get -o yaml`` shows it.
"""

from __future__ import annotations

import math
from typing import Any

from splitserve.operator.planner import Capacity, Forecast, PlannerConfig, PoolBounds, PoolState

POOLS = ("prefill", "decode")
HISTORY_KEEP = 64  # ticks of history kept in the status at most (it is pruned by time first)


def enabled(spec: dict[str, Any]) -> bool:
    return bool((spec.get("autoscaling") or {}).get("enabled"))


def bounds(spec: dict[str, Any], pool: str) -> PoolBounds:
    """The planner's bounds for one pool of a defaulted spec. Unset bounds keep the pool where
    the user put it: minReplicas defaults to min(1, replicas), maxReplicas to replicas, so an
    autoscaled pool never grows past what was asked for without an explicit maximum."""
    p = spec[pool]
    replicas = int(p["replicas"])
    low = int(p["minReplicas"]) if p.get("minReplicas") is not None else min(1, replicas)
    high = int(p["maxReplicas"]) if p.get("maxReplicas") is not None else max(replicas, low)
    return PoolBounds(low, high)


def planner_config(spec: dict[str, Any], capacity: Capacity) -> PlannerConfig:
    """PlannerConfig from a defaulted spec. The scale-down stabilisation window is the
    scale-down cooldown (as HPA's ``behavior.scaleDown.stabilizationWindowSeconds``); a need
    must hold over one metrics window (``windowSeconds``) before a scale-up, unless the forecast
    or a queue older than the TTFT target says otherwise; the SLO's targets drive the feedback."""
    auto, slo = spec["autoscaling"], spec["slo"]
    down = float(auto["scaleDownCooldownSeconds"])
    return PlannerConfig(
        prefill=bounds(spec, "prefill"),
        decode=bounds(spec, "decode"),
        capacity=capacity,
        headroom=float(auto.get("headroom", 0.8)),
        window_s=down,
        scale_up_cooldown_s=float(auto["scaleUpCooldownSeconds"]),
        scale_down_cooldown_s=down,
        scale_up_window_s=float(auto["windowSeconds"]),
        ttft_target_s=float(slo["ttftMs"]) / 1000,
        target_attainment=float(slo["attainment"]),
    )


def effective_replicas(spec: dict[str, Any], status: dict[str, Any] | None) -> dict[str, int]:
    """The replicas the prefill and decode Deployments should have now (defaulted spec)."""
    out = {pool: int(spec[pool]["replicas"]) for pool in POOLS}
    if not enabled(spec):
        return out
    auto = (status or {}).get("autoscaling") or {}
    for pool in POOLS:
        chosen = (auto.get(pool) or {}).get("replicas")
        if chosen is not None:
            out[pool] = bounds(spec, pool).clamp(int(chosen))
    return out


def pool_state(spec: dict[str, Any], status: dict[str, Any] | None, pool: str) -> PoolState:
    """The planner's memory of one pool, read back from the status."""
    saved = ((status or {}).get("autoscaling") or {}).get(pool) or {}
    replicas = effective_replicas(spec, status)[pool]
    last = saved.get("lastChangeTime")
    history = tuple((float(t), int(n)) for t, n in saved.get("history") or ())
    demand = tuple((float(t), float(v)) for t, v in saved.get("demand") or ())
    f = saved.get("forecast") or {}
    forecast = Forecast(f.get("level"), float(f.get("trend", 0.0)),
                        float(f.get("time", -math.inf)), int(f.get("rising", 0)))
    since = saved.get("observedSince")
    return PoolState(replicas, float(last) if last is not None else -math.inf, history, demand,
                     forecast, float(saved.get("margin", 1.0)),
                     float(since) if since is not None else math.inf)


def pool_state_status(state: PoolState) -> dict[str, Any]:
    """One pool's ``status.autoscaling`` entry (JSON: no infinities)."""
    out: dict[str, Any] = {
        "replicas": state.replicas,
        "history": [[round(t, 3), n] for t, n in state.history[-HISTORY_KEEP:]],
        "demand": [[round(t, 3), round(v, 3)] for t, v in state.demand[-HISTORY_KEEP:]],
        "margin": round(state.margin, 3),
    }
    f = state.forecast
    if f.level is not None and math.isfinite(f.time):
        out["forecast"] = {"level": round(f.level, 3), "trend": round(f.trend, 6),
                           "time": round(f.time, 3), "rising": f.rising}
    if math.isfinite(state.last_change_s):
        out["lastChangeTime"] = round(state.last_change_s, 3)
    if math.isfinite(state.observed_since):
        out["observedSince"] = round(state.observed_since, 3)
    return out
