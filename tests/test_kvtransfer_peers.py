"""What a worker keeps per KV peer is bounded and ages (kvtransfer/peers.py): a long-lived
prefill worker in an autoscaling cluster forgets decode workers gone for good, and their
per-peer Prometheus series leave /metrics with them (kvtransfer/metrics.py)."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from splitserve.kvtransfer import metrics
from splitserve.kvtransfer.base import FailureReason
from splitserve.kvtransfer.negotiate import Choice, Offer
from splitserve.kvtransfer.peers import PeerTable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_records_unused_for_the_idle_horizon_are_dropped_and_reported():
    clock, dropped = Clock(), []
    table = PeerTable(10, 60.0, on_drop=lambda k, v: dropped.append(k), clock=clock)
    table.setdefault("a", lambda: 1)
    table.setdefault("b", lambda: 2)
    clock.now += 50
    assert table.get("a") == 1  # used: its horizon starts again
    clock.now += 20
    assert table.get("b") is None and dropped == ["b"]
    assert [k for k, _ in table.items()] == ["a"]
    clock.now += 61
    assert list(table.items()) == [] and dropped == ["b", "a"]


def test_beyond_the_bound_the_least_recently_used_record_goes():
    dropped = []
    table = PeerTable(2, 60.0, on_drop=lambda k, v: dropped.append((k, v)), clock=Clock())
    table.setdefault("a", lambda: 1)
    table.setdefault("b", lambda: 2)
    table.get("a")
    table.setdefault("c", lambda: 3)
    assert dropped == [("b", 2)] and len(table) == 2
    assert table.pop("a") == 1 and dropped == [("b", 2)]  # an explicit pop is the caller's
    with pytest.raises(ValueError):
        PeerTable(0, 1.0)


def _series(peer: str) -> dict[str, float | None]:
    return {
        "info": REGISTRY.get_sample_value("splitserve_kv_backend_info", {
            "side": "send", "peer": peer, "backend": "shm", "fallback": "false"}),
        "bytes": REGISTRY.get_sample_value("splitserve_kv_peer_bytes_total", {
            "side": "send", "peer": peer, "backend": "shm"}),
        "seconds": REGISTRY.get_sample_value("splitserve_kv_peer_seconds_total", {
            "side": "send", "peer": peer, "backend": "shm"}),
        "failures": REGISTRY.get_sample_value("splitserve_kv_peer_failures_total", {
            "side": "send", "peer": peer, "backend": "auto", "reason": "connection_lost"}),
    }


def _use(peer: str) -> None:
    metrics.report_choice("send", peer, Choice("shm", "same host"), Offer(("shm", "tcp"), "h", False))
    metrics.record_peer_success("send", peer, "shm", 100, 0.5)
    metrics.record_peer_failure("send", peer, "auto", FailureReason.CONNECTION_LOST)


@pytest.mark.parametrize("how", ["idle", "bound"])
def test_a_forgotten_peer_takes_its_metric_series_and_report_with_it(monkeypatch, how):
    clock = Clock()
    table = PeerTable(2, 60.0, on_drop=metrics._forget_peer, clock=clock)
    monkeypatch.setattr(metrics, "_peers", table)
    _use("10.0.0.1:7000")
    assert all(v is not None for v in _series("10.0.0.1:7000").values())
    assert [r["peer"] for r in metrics.peer_report()] == ["10.0.0.1:7000"]
    metrics.record_peer_failure("send", "10.0.0.2:7000", "auto", FailureReason.CONNECTION_LOST)
    if how == "idle":
        clock.now += 61
    else:
        _use("10.0.0.3:7000")
    # bound 2: the third peer pushes out the least recently used one, the first
    assert [r["peer"] for r in metrics.peer_report()] == ([] if how == "idle" else ["10.0.0.3:7000"])
    assert all(v is None for v in _series("10.0.0.1:7000").values())
    if how == "idle":  # never negotiated (it did not answer): its failure series goes too
        assert _series("10.0.0.2:7000")["failures"] is None


def test_a_peer_that_comes_back_is_reported_afresh(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(metrics, "_peers", PeerTable(4, 60.0, on_drop=metrics._forget_peer, clock=clock))
    _use("10.0.0.1:7000")
    clock.now += 61
    _use("10.0.0.1:7000")
    (report,) = metrics.peer_report()
    assert (report["transfers"], report["failures"], report["bytes"]) == (1, 1, 100)
    assert _series("10.0.0.1:7000")["bytes"] == 100
