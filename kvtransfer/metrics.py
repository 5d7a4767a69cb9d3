"""Prometheus metrics of the transfer layer (default registry, prefix ``splitserve_kv_``).

Defined once here; backends only call :func:`record_success` / :func:`record_failure`.
Labels: ``side`` ("send" on prefill, "receive" on decode) and ``backend``.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from .base import FailureReason

BYTES = Counter(
    "splitserve_kv_bytes", "KV cache bytes moved (payload only)", ["side", "backend"]
)
TRANSFERS = Counter(
    "splitserve_kv_transfers", "KV transfers by outcome (ok or a failure reason)",
    ["side", "backend", "outcome"],
)
SECONDS = Histogram(
    "splitserve_kv_transfer_seconds", "Duration of successful KV transfers (handshake to ack)",
    ["side", "backend"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
FAILURES = Counter(
    "splitserve_kv_failures", "Failed KV transfers by reason", ["side", "backend", "reason"]
)
AUTH_FAILURES = Counter(
    "splitserve_kv_auth_failures",
    "KV connections refused because the peer did not prove it holds the internal secret",
    ["side", "backend"],
)


def record_bytes(side: str, backend: str, nbytes: int) -> None:
    BYTES.labels(side, backend).inc(nbytes)


def record_success(side: str, backend: str, seconds: float) -> None:
    TRANSFERS.labels(side, backend, "ok").inc()
    SECONDS.labels(side, backend).observe(seconds)


def record_failure(side: str, backend: str, reason: FailureReason) -> None:
    TRANSFERS.labels(side, backend, reason.value).inc()
    FAILURES.labels(side, backend, reason.value).inc()


def record_auth_failure(side: str, backend: str) -> None:
    AUTH_FAILURES.labels(side, backend).inc()
