"""Prometheus metrics of the transfer layer (default registry, prefix ``splitserve_kv_``).

Defined once here; backends only call :func:`record_success` / :func:`record_failure`.
Labels: ``side`` ("send" on prefill, "receive" on decode) and ``backend`` (the one that carried
the bytes, also under a negotiating sender or receiver). :func:`report_choice` logs and exports
which backend a negotiation picked for a peer, and why.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import Counter, Gauge, Histogram

from .base import FailureReason
from .negotiate import Choice, Offer

log = logging.getLogger("splitserve.kvtransfer")

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
BACKEND_INFO = Gauge(
    "splitserve_kv_backend_info",
    "1 for the KV backend negotiated with each peer (decode: a sender's host; prefill: a "
    "receiver's endpoint); fallback=\"true\" when a requested backend could not be used",
    ["side", "peer", "backend", "fallback"],
)
PEER_FAILURES = Counter(
    "splitserve_kv_peer_failures", "Failed KV transfers of a negotiating sender, per peer",
    ["side", "peer", "backend", "reason"],
)
_chosen: dict[tuple[str, str], tuple[str, str]] = {}  # (side, peer) -> its BACKEND_INFO labels
_chosen_lock = threading.Lock()


def report_choice(side: str, peer: str, choice: Choice, offer: Offer) -> None:
    """Log (INFO, or WARNING for a fallback) and export the backend chosen for ``peer``."""
    level = logging.WARNING if choice.fallback else logging.INFO
    log.log(level, "kv backend %s chosen for %s: %s; peer offered %s (requested %s)",
            choice.backend, peer, choice.reason, list(offer.backends), offer.requested)
    labels = (choice.backend, str(choice.fallback).lower())
    with _chosen_lock:
        old = _chosen.get((side, peer))
        if old is not None and old != labels:
            BACKEND_INFO.remove(side, peer, *old)
        _chosen[(side, peer)] = labels
        BACKEND_INFO.labels(side, peer, *labels).set(1)


def record_peer_failure(side: str, peer: str, backend: str, reason: FailureReason) -> None:
    PEER_FAILURES.labels(side, peer, backend, reason.value).inc()
