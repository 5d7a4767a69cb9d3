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
