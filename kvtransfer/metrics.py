"""Prometheus metrics of the transfer layer (default registry, prefix ``splitserve_kv_``).

Defined once here; backends only call :func:`record_success` / :func:`record_failure`.
Labels: ``side`` ("send" on prefill, "receive" on decode) and ``backend`` (the one that carried
the bytes, also under a negotiating sender or receiver). :func:`report_choice` logs and exports
which backend a negotiation picked for a peer, and why; the per-peer series (label ``peer``) go
with the peer's record, once it is idle for ``PEER_IDLE_S`` or evicted beyond ``MAX_PEERS``, so
/metrics does not grow with every peer a long-lived worker ever met.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from .base import FailureReason
from .negotiate import Choice, Offer
from .peers import IDLE_S, MAX_PEERS, PeerTable

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
PEER_BYTES = Counter(
    "splitserve_kv_peer_bytes", "KV bytes a negotiating sender moved, per peer",
    ["side", "peer", "backend"],
)
PEER_SECONDS = Counter(
    "splitserve_kv_peer_seconds", "Seconds of a negotiating sender's successful transfers, per "
    "peer (bytes / seconds: the pair's transfer rate)", ["side", "peer", "backend"],
)
PEER_FAILURES = Counter(
    "splitserve_kv_peer_failures", "Failed KV transfers of a negotiating sender, per peer",
    ["side", "peer", "backend", "reason"],
)


@dataclasses.dataclass
class PeerRecord:
    """One peer as a worker's /load reports it: the negotiated backend and how it went."""

    peer: str
    side: str
    backend: str
    fallback: bool
    reason: str
    transfers: int = 0
    failures: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["bytes_per_s"] = round(self.bytes / self.seconds) if self.seconds > 0 else None
        return out


@dataclasses.dataclass
class _Peer:
    """What this process exports about one peer: its report, once a backend was negotiated with
    it, and every per-peer label set made for it (removed with the peer, see ``_peers``)."""

    record: PeerRecord | None = None
    series: dict[tuple[Any, tuple[str, ...]], Any] = dataclasses.field(default_factory=dict)

    def labels(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, remembered as this peer's (and kept: asking the metric
        again per transfer would cost more than the lookup)."""
        child = self.series.get((metric, values))
        if child is None:
            child = self.series[(metric, values)] = metric.labels(*values)
        return child

    def unlabel(self, metric: Any, *values: str) -> None:
        self.series.pop((metric, values), None)
        metric.remove(*values)


def _forget_peer(key: tuple[str, str], peer: _Peer) -> None:
    for metric, values in peer.series:
        metric.remove(*values)


# a peer unused this long is forgotten, its labels too: a little longer than a negotiating
# sender keeps its choice (auto.py), so a report never ends under a choice still in use (a
# sender that forgot a peer negotiates again, which reports it anew)
PEER_IDLE_S = IDLE_S + 60.0
# beyond MAX_PEERS the least recently used peer goes, with its labels
_peers: PeerTable[tuple[str, str], _Peer] = PeerTable(MAX_PEERS, PEER_IDLE_S, on_drop=_forget_peer)
_peers_lock = threading.Lock()


def report_choice(side: str, peer: str, choice: Choice, offer: Offer) -> None:
    """Log (INFO, or WARNING for a fallback) and export the backend chosen for ``peer``."""
    level = logging.WARNING if choice.fallback else logging.INFO
    log.log(level, "kv backend %s chosen for %s: %s; peer offered %s (requested %s)",
            choice.backend, peer, choice.reason, list(offer.backends), offer.requested)
    with _peers_lock:
        known = _peers.setdefault((side, peer), _Peer)
        old = known.record
        if old is not None:
            known.unlabel(BACKEND_INFO, side, peer, old.backend, str(old.fallback).lower())
        record = PeerRecord(peer, side, choice.backend, choice.fallback, choice.reason)
        if old is not None and old.backend == choice.backend:  # the same pair again: keep counts
            record = dataclasses.replace(old, fallback=choice.fallback, reason=choice.reason)
        known.record = record
        known.labels(BACKEND_INFO, side, peer, choice.backend, str(choice.fallback).lower()).set(1)


def record_peer_success(side: str, peer: str, backend: str, nbytes: int, seconds: float) -> None:
    with _peers_lock:
        known = _peers.setdefault((side, peer), _Peer)
        known.labels(PEER_BYTES, side, peer, backend).inc(nbytes)
        known.labels(PEER_SECONDS, side, peer, backend).inc(seconds)
        if known.record is not None:
            known.record.transfers += 1
            known.record.bytes += nbytes
            known.record.seconds += seconds


def record_peer_failure(side: str, peer: str, backend: str, reason: FailureReason) -> None:
    with _peers_lock:
        known = _peers.setdefault((side, peer), _Peer)
        known.labels(PEER_FAILURES, side, peer, backend, reason.value).inc()
        if known.record is not None:
            known.record.failures += 1


def peer_report() -> list[dict[str, Any]]:
    """Every negotiated peer of this process still known (for a worker's /load)."""
    with _peers_lock:
        return [known.record.to_dict() for _, known in _peers.items() if known.record is not None]
