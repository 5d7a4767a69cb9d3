"""The KV links of a deployment travel worker /load -> router /metrics -> operator status.

Specifications of the three pure steps: the router reads each prefill worker's negotiated peers
from its last load (``router/kv_links.py``), exports them as gauges per link, and the operator
parses those gauges and summarises the pool pair in ``status.observed.kvTransfer``.
"""

from __future__ import annotations

from splitserve.operator import observe, slo_loop
from splitserve.router.kv_links import KvLink, kv_links
from splitserve.router.metrics import RouterMetrics
from splitserve.router.workers import WorkerLoad, WorkerState


def _peer(endpoint: str, backend: str, *, side: str = "send", fallback: bool = False,
          transfers: int = 3, failures: int = 0, rate: int | None = 1_000_000) -> dict:
    return {"peer": endpoint, "side": side, "backend": backend, "fallback": fallback,
            "reason": "test", "transfers": transfers, "failures": failures, "bytes": 0,
            "seconds": 0.0, "bytes_per_s": rate}


def _worker(url: str, role: str, peers: tuple = (), kv_endpoint: str | None = None) -> WorkerState:
    w = WorkerState(url=url, role=role, healthy=True, kv_endpoint=kv_endpoint)
    w.set_load(WorkerLoad(role=role, kv_peers=peers))
    return w


def test_links_name_decode_workers_by_url_and_skip_departed_peers_and_the_receive_side():
    prefill = [_worker("http://p0", "prefill", (_peer("127.0.0.1:7001", "shm"),
                                                  _peer("127.0.0.1:7999", "tcp", fallback=True),
                                                  _peer("127.0.0.9:1", "tcp", side="receive")))]
    decode = [_worker("http://d0", "decode", kv_endpoint="127.0.0.1:7001")]
    links = kv_links(prefill, decode)
    assert links == [KvLink("http://p0", "http://d0", "shm", False, 3, 0, 1_000_000.0)]  # 7999 left


def test_malformed_peer_entries_are_ignored_not_fatal():
    prefill = [_worker("http://p0", "prefill", ("junk", {"side": "send"}, {"peer": 5, "backend": "tcp",
                                                                            "side": "send"}))]
    assert kv_links(prefill, []) == []


def test_router_gauges_parse_back_into_the_status_summary():
    m = RouterMetrics()
    m.observe_kv_links([
        KvLink("http://p0", "http://d0", "cuda_ipc", False, 10, 1, 4e9),
        KvLink("http://p1", "http://d0", "tcp", True, 4, 0, None),
    ])
    snap = observe.parse(m.exposition().decode(), at=0.0)
    assert sorted(k.backend for k in snap.kv_links) == ["cuda_ipc", "tcp"]
    # a second router pod sees the same links, one of them with older counts: counted once
    other = observe.Snapshot(0.0, None, None, None, None, 0.0, 0.0, None, kv_links=(
        observe.KvLink("http://p0", "http://d0", "cuda_ipc", False, 7, 0, 3e9),))
    assert observe.kv_summary([snap, other]) == {
        "links": 2, "backends": {"cuda_ipc": 1, "tcp": 1}, "fallbacks": 1,
        "transfers": 14, "failures": 1, "bytesPerSecond": 4_000_000_000,
    }


def test_links_of_departed_workers_disappear_from_the_metrics():
    m = RouterMetrics()
    m.observe_kv_links([KvLink("http://p0", "http://d0", "shm", False, 1, 0, 1.0)])
    m.observe_kv_links([])
    assert observe.parse(m.exposition().decode(), at=0.0).kv_links == ()
    assert observe.kv_summary([]) is None


def test_observed_status_carries_the_summary_and_deletes_it_when_unknown():
    win = observe.Window(seconds=30, finished=0, requests_per_s=0, ttft_p50_ms=None,
                         ttft_p90_ms=None, tpot_p50_ms=None, tpot_p90_ms=None, attainment=None,
                         prompt_tokens_per_s=None, concurrent_seqs=0)
    summary = {"links": 1, "backends": {"tcp": 1}}
    assert slo_loop.observed_status(win, 0.0, summary)["observed"]["kvTransfer"] == summary
    assert slo_loop.observed_status(win, 0.0)["observed"]["kvTransfer"] is None
