"""How long this cluster takes to bring a worker pod up, measured from the pods themselves.

The planner scales ahead of a rising load by the time a new replica needs before it serves
(``PlannerConfig.lead_time_s``, the forecast's horizon). That time is the cluster's, not a
constant: image pulls, weight loading and CUDA graph capture take 2-8 minutes in the reports
the planner issue cites, and seconds on a warm node. Each Ready pod carries its own answer: the
Ready condition's transition time minus the pod's creation. The median of the newest few is the
lead time; with none measured yet, the configured default stands.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

from splitserve.operator.pod_problems import api_seconds

NEWEST = 10  # pods whose start times are taken (the cluster's present, not its history)
LONGEST_START_S = 1800.0  # a later Ready transition is a readiness blip of a running pod, not its start


def start_seconds(pod: dict[str, Any]) -> float | None:
    """Seconds from the pod's creation to it becoming Ready; None unless it is Ready now and
    that transition was its start: no container restarted, within ``LONGEST_START_S`` (a probe
    that failed once moves the transition to now, which would read a day-old pod as a day)."""
    created = api_seconds(pod.get("metadata", {}).get("creationTimestamp"))
    ready = next((c for c in (pod.get("status") or {}).get("conditions") or []
                  if c.get("type") == "Ready" and c.get("status") == "True"), None)
    became = api_seconds(ready.get("lastTransitionTime")) if ready else None
    restarted = any(c.get("restartCount") for c in (pod.get("status") or {}).get("containerStatuses") or [])
    if created is None or became is None or restarted or not 0 <= became - created <= LONGEST_START_S:
        return None
    return became - created


def lead_time(pods: Iterable[dict[str, Any]], default: float) -> tuple[float, bool]:
    """(the lead time to plan with, whether it was measured): the median start of the newest
    ``NEWEST`` Ready pods, else ``default``."""
    timed = [(pod["metadata"].get("creationTimestamp") or "", s) for pod in pods
             if (s := start_seconds(pod)) is not None]
    if not timed:
        return default, False
    newest = [s for _, s in sorted(timed)[-NEWEST:]]
    return statistics.median(newest), True
