"""Pure status computation: the children's Deployment statuses -> the InferenceService status.

Conditions follow the Kubernetes convention (type, status, reason, message, lastTransitionTime,
observedGeneration); a condition's lastTransitionTime only moves when its status flips, so a
status refresh that finds nothing new writes nothing new.

- Ready:       every pool (prefill, decode, router, managed redis) has all desired replicas ready
               and updated to the current template.
- Progressing: a rollout or scale is under way (desired != updated/ready, or a Deployment has not
               yet observed its newest spec).
- Degraded:    a pool's pods have a problem of their own (``pod_problems``: unschedulable with
               the scheduler's message, image pull errors, crash loops with the last exit,
               readiness failing for long), a Deployment reports ReplicaFailure or
               ProgressDeadlineExceeded, or the last reconcile failed (``reconcile_error``).
               Its reason is the most severe one (``ReconcileError``, else the pods' reason,
               e.g. ``PodsUnschedulable``, else ``ReplicaFailure``), its message names each
               pool; Ready, when False, carries the same reason. ``status.problems`` lists the
               pools' problems one by one (what ``pod_problems.transitions`` compares).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from splitserve.operator.pod_problems import PoolProblem, by_severity

POOLS = ("prefill", "decode", "router")


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pool_status(deployment: dict[str, Any] | None, desired: int) -> dict[str, Any]:
    """Replica counts of one pool; ``ready`` is the "ready/desired" printer-column text."""
    st = (deployment or {}).get("status", {}) or {}
    ready = int(st.get("readyReplicas", 0) or 0)
    return {
        "replicas": desired,
        "readyReplicas": ready,
        "updatedReplicas": int(st.get("updatedReplicas", 0) or 0),
        "ready": f"{ready}/{desired}",
    }


def _rolling(deployment: dict[str, Any] | None, desired: int) -> bool:
    if deployment is None:
        return desired > 0
    st = deployment.get("status", {}) or {}
    meta = deployment.get("metadata", {})
    if int(st.get("observedGeneration", 0) or 0) < int(meta.get("generation", 0) or 0):
        return True
    total = int(st.get("replicas", 0) or 0)
    updated = int(st.get("updatedReplicas", 0) or 0)
    ready = int(st.get("readyReplicas", 0) or 0)
    return updated < desired or ready < desired or total > desired


def _failing(deployment: dict[str, Any] | None, desired: int) -> str | None:
    if deployment is None:
        return None
    for cond in (deployment.get("status", {}) or {}).get("conditions", []) or []:
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            return f"{cond.get('reason', 'ReplicaFailure')}: {cond.get('message', '')}".strip()
        if (
            cond.get("type") == "Progressing"
            and cond.get("status") == "False"
            and cond.get("reason") == "ProgressDeadlineExceeded"
        ):
            return "ProgressDeadlineExceeded"
    return None


def condition(
    ctype: str,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    previous: list[dict[str, Any]],
) -> dict[str, Any]:
    """A condition that keeps its previous lastTransitionTime when its status did not change."""
    text = "True" if status else "False"
    old = next((c for c in previous if c.get("type") == ctype), None)
    since = old["lastTransitionTime"] if old and old.get("status") == text else _now()
    return {
        "type": ctype,
        "status": text,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def compute(
    spec: dict[str, Any],
    deployments: dict[str, dict[str, Any] | None],
    generation: int,
    previous_conditions: list[dict[str, Any]] | None = None,
    reconcile_error: str | None = None,
    replicas: dict[str, int] | None = None,
    problems: list[PoolProblem] | None = None,
) -> dict[str, Any]:
    """The status block for a (defaulted) spec and its Deployments keyed by component;
    ``replicas`` overrides the spec's desired counts (the autoscaler's, ``scaling.py``);
    ``problems`` are the pools' pod problems (``pod_problems.pool_problem``)."""
    previous = previous_conditions or []
    problems = by_severity(problems or [], (*POOLS, "redis"))
    pod_reason = problems[0].reason.value if problems else None
    desired = {pool: int(spec[pool]["replicas"]) for pool in POOLS} | (replicas or {})
    if spec["redis"].get("managed", True):
        desired["redis"] = 1
    pools = {pool: pool_status(deployments.get(pool), desired[pool]) for pool in POOLS}
    not_ready = [
        f"{c} {pool_status(deployments.get(c), n)['ready']}"
        for c, n in desired.items()
        if pool_status(deployments.get(c), n)["readyReplicas"] < n
    ]
    rolling = [c for c, n in desired.items() if _rolling(deployments.get(c), n)]
    failures = {c: f for c, n in desired.items() if (f := _failing(deployments.get(c), n))}
    ready = not not_ready and not rolling and reconcile_error is None

    conds = [
        condition(
            "Ready",
            ready,
            "AllPoolsReady"
            if ready
            else ("ReconcileError" if reconcile_error else pod_reason or "PoolsNotReady"),
            "all pools ready"
            if ready
            else (
                "not ready: " + ", ".join(not_ready)
                if not_ready
                else reconcile_error or "rolling out"
            ),
            generation,
            previous,
        ),
        condition(
            "Progressing",
            bool(rolling),
            "RollingOut" if rolling else "AsExpected",
            ("rolling: " + ", ".join(rolling)) if rolling else "all pools at their desired spec",
            generation,
            previous,
        ),
    ]
    degraded_msgs = [p.message for p in problems] + [f"{c}: {f}" for c, f in failures.items()]
    if reconcile_error:
        degraded_msgs.insert(0, reconcile_error)
    conds.append(
        condition(
            "Degraded",
            bool(degraded_msgs),
            ("ReconcileError" if reconcile_error else pod_reason or "ReplicaFailure")
            if degraded_msgs else "AsExpected",
            "; ".join(degraded_msgs) if degraded_msgs else "no failures",
            generation,
            previous,
        )
    )  # fmt: skip
    return {**pools, "conditions": conds, "problems": [p.to_status() for p in problems]}
