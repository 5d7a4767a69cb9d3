"""Prometheus metrics of the operator itself (prefix ``splitserve_operator_``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter(
    "splitserve_operator_reconciles_total", "Reconcile passes by cause and result",
    ["cause", "result"],
)  # fmt: skip
RECONCILE_SECONDS = Histogram(
    "splitserve_operator_reconcile_seconds", "Duration of one reconcile pass", ["cause"]
)

SCRAPES = Counter(
    "splitserve_operator_slo_scrapes_total", "Scrapes of routers' /metrics by result", ["result"]
)
PLANNER_REPLICAS = Gauge(
    "splitserve_operator_planner_replicas",
    "Replicas the planner chose, per InferenceService and pool",
    ["namespace", "name", "pool"],
)

# The planner's inputs and its unbounded need, so that users of their own autoscaler (an HPA on
# an external metric through prometheus-adapter, or KEDA's Prometheus scaler) can scale on
# what the planner sees: charts/splitserve/examples/hpa-external-metric.yaml.
PLANNER_DEMAND = Gauge(
    "splitserve_operator_planner_demand",
    "Demand the planner saw this tick: prompt tokens/s (prefill, with the queue to drain), "
    "concurrent sequences (decode)",
    ["namespace", "name", "pool"],
)
PLANNER_FORECAST = Gauge(
    "splitserve_operator_planner_forecast",
    "The demand forecast one pod start time ahead (Holt's damped trend)",
    ["namespace", "name", "pool"],
)
PLANNER_DESIRED = Gauge(
    "splitserve_operator_planner_desired_replicas",
    "Replicas the pool needs now at the SLO targets (before bounds, windows and cooldowns)",
    ["namespace", "name", "pool"],
)
PLANNER_MARGIN = Gauge(
    "splitserve_operator_planner_margin",
    "The feedback margin on the pool's capacity (raised when its SLO target is missed)",
    ["namespace", "name", "pool"],
)


@contextlib.contextmanager
def reconcile_timer(cause: str) -> Iterator[None]:
    start = time.perf_counter()
    result = "error"
    try:
        yield
        result = "ok"
    finally:
        RECONCILES.labels(cause, result).inc()
        RECONCILE_SECONDS.labels(cause).observe(time.perf_counter() - start)


def serve(port: int, host: str = "0.0.0.0") -> None:
    """Expose /metrics on ``host:port`` from a background thread."""
    start_http_server(port, addr=host)
