"""Which backend two ends pick (kvtransfer/negotiate.py, pure), and the negotiating "auto"
backend between real sockets on 127.0.0.1: the pick is logged and exported, an explicit request
is honoured, and one that cannot be met falls back to tcp with a warning. The contract every
backend passes (auto included) is tests/test_kvtransfer_contract.py."""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from prometheus_client import REGISTRY
from splitserve.kvtransfer import KVSpec, TransferError, create_receiver, create_sender
from splitserve.kvtransfer import nixl as nixl_backend
from splitserve.kvtransfer.auto import usable_backends
from splitserve.kvtransfer.base import FailureReason
from splitserve.kvtransfer.metrics import peer_report
from splitserve.kvtransfer.negotiate import PREFERENCE, Offer, choose, host_identity, offered

ALL = ("tcp", "shm", "cuda_ipc", "nixl")


def offer(*backends: str, host: str = "h1", gpu: bool = False, requested: str = "auto",
          slow: tuple[str, ...] = ()) -> Offer:
    return Offer(offered(requested, backends), host, gpu, requested, slow)


@pytest.mark.parametrize("mine,peer,backend,why", [
    (offer(*ALL, gpu=True), offer(*ALL, gpu=True), "cuda_ipc", "same host, both on GPU"),
    (offer(*ALL, gpu=True), offer(*ALL, gpu=False), "shm", "same host"),
    (offer(*ALL, gpu=True), offer(*ALL, host="h2", gpu=True), "nixl", "nixl installed on both ends"),
    (offer(*ALL, host="h2", slow=("nixl",)), offer(*ALL), "tcp", "no faster backend"),
    (offer(*ALL, host="h2"), offer(*ALL, slow=("nixl",)), "tcp", "no faster backend"),
    (offer("shm", "cuda_ipc", gpu=True), offer(*ALL, gpu=True), "cuda_ipc", "same host"),
    (offer("shm"), offer(*ALL), "shm", "same host"),
    (offer("shm"), offer("shm", host="h2"), "tcp", "no faster backend"),
    (offer(), offer(*ALL, gpu=True), "tcp", "no faster backend"),
])
def test_auto_picks_the_fastest_backend_both_ends_can_use(mine, peer, backend, why):
    choice = choose(mine, peer)
    assert (choice.backend, choice.fallback) == (backend, False)
    assert why in choice.reason
    assert choose(peer, mine).backend == backend  # both ends reach the same answer


@pytest.mark.parametrize("requested", ["tcp", "shm", "nixl", "cuda_ipc"])
def test_an_explicit_request_is_honoured_where_both_ends_can(requested):
    mine, peer = offer(*ALL, gpu=True, requested=requested), offer(*ALL, gpu=True)
    choice = choose(mine, peer)
    assert (choice.backend, choice.fallback) == (requested, False)
    assert choose(peer, mine) == choice


@pytest.mark.parametrize("mine,peer,why", [
    (offer(*ALL, gpu=True, requested="nixl"), offer("shm", gpu=True), "the peer lacks it"),
    (offer(*ALL, gpu=True, requested="cuda_ipc"), offer(*ALL, gpu=True, host="h2"),
     "different hosts"),
    (offer(*ALL, gpu=True, requested="cuda_ipc"), offer(*ALL), "not both ends are on a GPU"),
    (offer("shm", requested="nixl"), offer(*ALL), "not available on this end"),
    (offer(*ALL, requested="shm"), offer(*ALL, requested="nixl"), "different backends"),
])
def test_a_request_that_cannot_be_met_falls_back_to_tcp_and_says_why(mine, peer, why):
    choice = choose(mine, peer)
    assert (choice.backend, choice.fallback) == ("tcp", True)
    assert why in choice.reason
    assert choose(peer, mine).backend == "tcp"


def test_choice_is_symmetric_over_every_combination():
    subsets = [s for n in range(len(ALL) + 1) for s in itertools.combinations(ALL, n)]
    ends = [offer(*s, host=h, gpu=g, requested=r) for s in subsets[::3] for h in ("a", "b")
            for g in (False, True) for r in ("auto", "nixl", "shm")]
    for a, b in itertools.product(ends, repeat=2):
        assert choose(a, b).backend == choose(b, a).backend
        assert choose(a, b).backend in set(a.backends) & set(b.backends)


def test_offer_round_trips_and_a_malformed_one_is_refused():
    mine = offer("shm", "nixl", gpu=True, requested="nixl")
    assert Offer.from_dict(mine.to_dict()) == mine
    assert mine.backends == tuple(b for b in PREFERENCE if b in ("shm", "nixl", "tcp"))
    for bad in ({}, {"backends": "tcp", "host": "h", "gpu": False},
                {"backends": [], "host": 3, "gpu": False}, {"backends": [], "host": "h"}):
        with pytest.raises(ValueError):
            Offer.from_dict(bad)


def test_a_withdrawn_backend_leaves_the_offer_but_tcp_never_does():
    mine = offer(*ALL, gpu=True)
    assert mine.without("nixl").backends == ("cuda_ipc", "shm", "tcp")
    assert mine.without("tcp") == mine
    assert choose(mine.without("cuda_ipc"), offer(*ALL, gpu=True)).backend == "shm"
    assert offer(*ALL, slow=("nixl",)).without("nixl").slow == ()


def test_this_process_has_one_host_identity():
    assert host_identity() == host_identity() and host_identity().count("/") == 2


# --------------------------------------------------------------------------- real sockets
LAYERS, HEADS, DIM = 3, 2, 8


def spec(backend: str) -> KVSpec:
    return KVSpec("tiny@gen1", "float32", LAYERS, HEADS, DIM, 4, backend=backend)


def round_trip(tx, rx, request_id: str) -> None:
    fut = rx.expect(request_id, 5, [0, 1], timeout=10)
    kv = [torch.full(spec("tcp").layer_shape(5), float(i)) for i in range(LAYERS)]
    tx.send(request_id, rx.endpoint, kv, 7)
    assert fut.result(timeout=5).first_token == 7


def info(side: str, peer: str, backend: str, fallback: str) -> float | None:
    return REGISTRY.get_sample_value("splitserve_kv_backend_info", {
        "side": side, "peer": peer, "backend": backend, "fallback": fallback})


def test_auto_pair_negotiates_once_logs_and_exports_the_choice(caplog):
    caplog.set_level(logging.INFO, logger="splitserve.kvtransfer")
    cache = torch.zeros(LAYERS, 2, 8, 4, HEADS, DIM)
    with create_receiver("auto", spec("auto"), cache) as rx, create_sender("auto", spec("auto")) as tx:
        expected = choose(tx.offer, rx.offer()).backend
        assert expected == "shm"  # same host, no GPU
        for i in range(3):
            round_trip(tx, rx, f"r{i}")
        chosen = [r for r in caplog.records if "kv backend" in r.getMessage()]
    assert len(chosen) == 2  # once per end, not per transfer
    assert all(r.levelno == logging.INFO and f"kv backend {expected} chosen" in r.getMessage()
               and "peer offered" in r.getMessage() for r in chosen)
    assert info("send", rx.endpoint, expected, "false") == 1
    assert info("receive", "127.0.0.1", expected, "false") == 1
    report = {(r["side"], r["peer"]): r for r in peer_report()}  # what a worker's /load shows
    sent = report[("send", rx.endpoint)]
    assert (sent["backend"], sent["transfers"], sent["failures"]) == (expected, 3, 0)
    assert sent["bytes"] == 3 * LAYERS * spec("tcp").layer_nbytes(5) and sent["bytes_per_s"] > 0
    assert report[("receive", "127.0.0.1")]["backend"] == expected


def test_explicit_request_the_peer_cannot_meet_falls_back_to_tcp_with_a_warning(caplog):
    caplog.set_level(logging.INFO, logger="splitserve.kvtransfer")
    cache = torch.zeros(LAYERS, 2, 8, 4, HEADS, DIM)
    with create_receiver("auto", spec("auto"), cache) as rx, \
            create_sender("auto", spec("auto"), requested="cuda_ipc") as tx:
        round_trip(tx, rx, "fb")
        assert tx.choice(rx.endpoint).backend == "tcp"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "kv backend tcp" in r.getMessage()]
    assert len(warnings) == 2 and all("cuda_ipc was requested but" in r.getMessage() for r in warnings)
    assert info("send", rx.endpoint, "tcp", "true") == 1


@pytest.mark.parametrize("backend", ["tcp", "shm"])
def test_auto_and_explicit_ends_interoperate(backend):
    """An old explicit receiver answers offers with its own backend; an explicit sender's HELLO
    is served by an auto receiver."""
    cache = torch.zeros(LAYERS, 2, 8, 4, HEADS, DIM)
    with create_receiver(backend, spec(backend), cache) as rx, create_sender("auto", spec("auto")) as tx:
        round_trip(tx, rx, "old-rx")
        assert tx.choice(rx.endpoint).backend == backend
    with create_receiver("auto", spec("auto"), cache) as rx, create_sender(backend, spec(backend)) as tx:
        round_trip(tx, rx, "old-tx")


def test_auto_receiver_refuses_a_backend_it_does_not_offer():
    cache = torch.zeros(LAYERS, 2, 8, 4, HEADS, DIM)
    with create_receiver("auto", spec("auto"), cache) as rx:
        fut = rx.expect("x", 5, [0, 1], timeout=10)
        wrong = KVSpec("tiny@gen1", "float32", LAYERS, HEADS, DIM, 4, backend="auto")
        with create_sender("tcp", spec("tcp")) as tx:  # a well-formed HELLO naming "auto"
            tx._spec_dict = wrong.to_dict()
            with pytest.raises(TransferError) as err:
                tx.send("x", rx.endpoint, [torch.zeros(2, 5, HEADS, DIM)] * LAYERS, 1)
        assert err.value.reason == "handshake_mismatch" and err.value.field == "backend"
        assert fut.exception(timeout=2).reason == "handshake_mismatch"


def test_unknown_requested_backend_is_an_error():
    with pytest.raises(ValueError, match="carrier-pigeon"):
        create_sender("auto", spec("auto"), requested="carrier-pigeon")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuda_ipc needs CUDA")
def test_auto_pair_on_one_gpu_host_picks_cuda_ipc():
    cache = torch.zeros(LAYERS, 2, 8, 4, HEADS, DIM, device="cuda")
    with create_receiver("auto", spec("auto"), cache) as rx, create_sender("auto", spec("auto")) as tx:
        fut = rx.expect("gpu", 5, [0, 1], timeout=10)
        kv = [torch.full(spec("tcp").layer_shape(5), float(i), device="cuda") for i in range(LAYERS)]
        tx.send("gpu", rx.endpoint, kv, 7)
        assert fut.result(timeout=10).first_token == 7
        assert tx.choice(rx.endpoint).backend == "cuda_ipc"
        assert cache[2, 0, 0, 0].eq(2.0).all()  # layer 2's K, first token, landed in block 0


def test_a_slow_backend_is_still_honoured_when_asked_for():
    mine = offer(*ALL, host="h2", requested="nixl", slow=("nixl",))
    assert choose(mine, offer(*ALL)).backend == "nixl"
    assert Offer.from_dict(mine.to_dict()) == mine
    assert Offer.from_dict({"backends": ["tcp"], "host": "h", "gpu": False}).slow == ()  # older peer


@pytest.mark.parametrize("tls,rdma,fast", [
    ("tcp", True, False), ("tcp,sm", True, False), ("rc,tcp", True, True), ("rc,tcp", False, False),
    ("cuda_ipc,cuda_copy,tcp", True, False), ("", False, False), ("", True, True),
    ("all", False, False), ("all", True, True), ("^ib", True, True),
])
def test_nixl_is_fast_only_with_a_transport_faster_than_tcp(tmp_path, tls, rdma, fast):
    from splitserve.kvtransfer.negotiate import nixl_has_fast_path

    if rdma:
        (tmp_path / "uverbs0").touch()
    env = {"UCX_TLS": tls} if tls else {}
    assert nixl_has_fast_path(env, str(tmp_path)) is fast


# --------------------------------------------------------------------------- nixl that cannot run
def _nixl_fails(monkeypatch, *roles: str) -> None:
    """nixl passes its probe, but making an agent for ``roles`` fails as UCX did on an H200
    without UCX_TLS (createBackend: NIXL_ERR_BACKEND)."""
    real = nixl_backend.make_agent

    def make_agent(role: str):
        if role in roles:
            raise TransferError(FailureReason.BACKEND_UNAVAILABLE,
                                "NIXL could not create its UCX backend: nixlBackendError('NIXL_ERR_BACKEND')")
        return real(role)

    monkeypatch.setattr(nixl_backend, "probe", lambda gpu: None)
    monkeypatch.setattr(nixl_backend, "make_agent", make_agent)


def test_nixl_is_offered_only_where_its_probe_makes_an_agent(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="splitserve.kvtransfer")
    monkeypatch.setattr(nixl_backend, "_PROBED", {})
    monkeypatch.setattr(nixl_backend, "nixl_api", lambda: pytest.fail("the probe must make an agent"))

    def broken(role: str):
        time.sleep(0.05)  # long enough for the other threads to ask meanwhile
        raise TransferError(FailureReason.BACKEND_UNAVAILABLE, "simulated: no UCX backend")

    monkeypatch.setattr(nixl_backend, "make_agent", broken)
    with ThreadPoolExecutor(4) as pool:  # a prefill's first transfers ask at once
        offers = list(pool.map(lambda _: usable_backends(gpu=False), range(4)))
    assert not any("nixl" in usable for usable in offers)
    probes = [r for r in caplog.records if r.getMessage().startswith("nixl probe")]
    assert len(probes) == 1 and probes[0].levelno == logging.INFO
    assert "not offered" in probes[0].getMessage() and "simulated" in probes[0].getMessage()


@pytest.mark.parametrize("side", ["rx", pytest.param("tx", marks=pytest.mark.skipif(
    nixl_backend.probe(False) is not None, reason="the receiver's half needs a working NIXL"))])
def test_an_end_that_cannot_set_up_nixl_falls_back_with_a_warning(monkeypatch, caplog, side):
    """Both ends offer nixl and the sender asks for it; one end then fails to make its agent:
    it withdraws nixl, the pair negotiates again without it and the transfer succeeds over the
    fallback, tcp, with warnings (the failed setup, then the request that cannot be met)."""
    _nixl_fails(monkeypatch, side)
    caplog.set_level(logging.INFO, logger="splitserve.kvtransfer")
    cache = torch.zeros(LAYERS, 2, 8, 4, HEADS, DIM)
    with create_receiver("auto", spec("auto"), cache) as rx, \
            create_sender("auto", spec("auto"), requested="nixl") as tx:
        assert choose(tx.offer, rx.offer()).backend == "nixl"
        round_trip(tx, rx, f"{side}-0")
        round_trip(tx, rx, f"{side}-1")
        assert tx.choice(rx.endpoint).backend == "tcp"
        assert "nixl" not in (rx.offer() if side == "rx" else tx.offer).backends
    assert cache[2, 0, 0, 0].eq(2.0).all()  # layer 2's K, first token, landed in block 0
    withdrawn = [r for r in caplog.records if "could not be set up" in r.getMessage()]
    assert len(withdrawn) == 1 and withdrawn[0].levelno == logging.WARNING
    assert "NIXL_ERR_BACKEND" in withdrawn[0].getMessage()
    assert any(r.levelno == logging.WARNING and "nixl was requested but" in r.getMessage()
               for r in caplog.records)


PAIR_SCRIPT = """
import logging
import torch
logging.basicConfig(level=logging.INFO)
from splitserve.kvtransfer import KVSpec, create_receiver, create_sender
spec = KVSpec("tiny@gen1", "float32", 3, 2, 8, 4, backend="auto")
with create_receiver("auto", spec, torch.zeros(3, 2, 8, 4, 2, 8)) as rx, \\
        create_sender("auto", spec, requested="nixl") as tx:
    fut = rx.expect("r", 5, [0, 1], timeout=10)
    tx.send("r", rx.endpoint, [torch.ones(2, 5, 2, 8)] * 3, 7)
    print("pair:", fut.result(timeout=10).first_token, tx.choice(rx.endpoint).backend,
          *rx.offer().backends)
"""


@pytest.mark.skipif(nixl_backend.probe(False) is not None, reason="needs NIXL installed")
def test_nixl_whose_ucx_cannot_start_is_not_offered_and_the_pair_transfers():
    """Real NIXL, asked for a UCX transport that does not exist: UCX backend creation fails
    (as on an H200 without UCX_TLS), the probe says so, neither end offers nixl, and a sender
    that asks for nixl falls back to tcp (before the probe: the receiver failed the transfer)."""
    env = {**os.environ, "UCX_TLS": "no_such_transport", "UCX_NET_DEVICES": "lo"}
    out = subprocess.run([sys.executable, "-c", PAIR_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    pair = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("pair:")]
    assert pair == [["7", "tcp", "shm", "tcp"]], out.stdout[-2000:]  # UCX prints on stdout too
    assert "nixl probe: not usable here" in out.stderr and "NIXL_ERR_BACKEND" in out.stderr


def test_a_backend_that_keeps_failing_to_one_peer_is_avoided_for_it(monkeypatch, caplog):
    """Set up fine, yet it cannot move bytes to that peer (say UCX cannot connect the two
    hosts): after two transfers fail in a row, the pair negotiates without it, with a warning."""
    from splitserve.kvtransfer.registry import backend_class

    shm_sender = backend_class("shm", "sender")
    calls = []

    def broken(self, request_id, *args, **kwargs):
        calls.append(request_id)
        raise TransferError(FailureReason.CONNECTION_LOST, "cannot reach the peer over shm")

    monkeypatch.setattr(shm_sender, "send", broken)
    cache = torch.zeros(LAYERS, 2, 8, 4, HEADS, DIM)
    with create_receiver("auto", spec("auto"), cache) as rx, \
            create_sender("auto", spec("auto"), requested="shm") as tx:
        for attempt in ("a", "b"):
            rx.expect(attempt, 5, [0, 1], timeout=10)
            with pytest.raises(TransferError):
                tx.send(attempt, rx.endpoint, [torch.zeros(spec("tcp").layer_shape(5))] * LAYERS, 7)
            rx.cancel(attempt)
        caplog.set_level(logging.WARNING, logger="splitserve.kvtransfer")
        round_trip(tx, rx, "c")  # over tcp now
    assert calls == ["a", "b"]
    assert tx.choice(rx.endpoint).backend == "tcp"
    assert any("failed 2 transfers in a row" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- a receiver restarts
def _restart(rx, cache, monkeypatch, offers: tuple[str, ...] | None, backend: str = "auto"):
    """Close ``rx`` and start another receiver at its address; ``offers``: what the new
    process can use (say it lost its GPU, or nixl failed), None: the same as before."""
    port = int(rx.endpoint.rsplit(":", 1)[1])
    rx.close()
    if offers is not None:
        monkeypatch.setattr("splitserve.kvtransfer.auto.usable_backends", lambda gpu: list(offers))
    return create_receiver(backend, spec(backend), cache, port=port)


def _failures(side: str = "send") -> float:
    return sum(REGISTRY.get_sample_value("splitserve_kv_failures_total", {
        "side": side, "backend": b, "reason": r.value}) or 0.0
        for b in (*ALL, "auto") for r in FailureReason)


@pytest.mark.parametrize("new_backend,new_offer", [("auto", ("tcp",)), ("tcp", None)])
def test_a_receiver_restarted_with_another_offer_costs_no_transfer(monkeypatch, caplog,
                                                                    new_backend, new_offer):
    """The decode worker restarts at the same address offering less (shm + tcp, then tcp only;
    or an explicit tcp receiver): the sender's cached choice (shm) is stale. Its next transfers,
    handed generators and no num_tokens (layer 0 is read before the handshake), still land: the
    new receiver refuses the stale HELLO without failing the transfer, the sender negotiates
    again and retries, and no failure is counted anywhere."""
    caplog.set_level(logging.INFO, logger="splitserve.kvtransfer")
    cache = torch.zeros(LAYERS, 2, 16, 4, HEADS, DIM)
    rx = create_receiver("auto", spec("auto"), cache)
    with create_sender("auto", spec("auto")) as tx:
        round_trip(tx, rx, "before")
        assert tx.choice(rx.endpoint).backend == "shm"
        endpoint, failures = rx.endpoint, _failures()
        with _restart(rx, cache, monkeypatch, new_offer, new_backend) as rx:
            assert rx.endpoint == endpoint

            def transfer(i: int) -> int:
                fut = rx.expect(f"after-{i}", 5, [2 * i, 2 * i + 1], timeout=10)
                kv = (torch.full(spec("tcp").layer_shape(5), 10.0 * i + layer) for layer in range(LAYERS))
                tx.send(f"after-{i}", endpoint, kv, 7)
                return fut.result(timeout=5).first_token

            with ThreadPoolExecutor(3) as pool:  # transfers in flight at once all meet the restart
                assert list(pool.map(transfer, range(3))) == [7, 7, 7]
            assert tx.choice(endpoint).backend == "tcp"
    for i in range(3):
        assert cache[2, 0, 2 * i, 0].eq(10.0 * i + 2).all()  # layer 2's K landed in its block
    assert _failures() == failures
    assert {(r["peer"], r["failures"]) for r in peer_report() if r["side"] == "send"} >= {(endpoint, 0)}
    retried = [r for r in caplog.records if "negotiating again and retrying" in r.getMessage()]
    assert retried and all(r.levelno == logging.INFO and "restarted" in r.getMessage() for r in retried)
    assert any("kv backend tcp chosen for " + endpoint in r.getMessage() for r in caplog.records)


def test_a_hello_negotiated_with_another_instance_is_refused_and_the_transfer_kept():
    """The receiver's half: the refusal names ``instance`` and leaves the decode side's transfer
    pending (its sender retries); the same request then lands."""
    cache = torch.zeros(LAYERS, 2, 8, 4, HEADS, DIM)
    kv = [torch.ones(spec("tcp").layer_shape(5))] * LAYERS
    with create_receiver("auto", spec("auto"), cache) as rx, create_sender("tcp", spec("tcp")) as tx:
        fut = rx.expect("x", 5, [0, 1], timeout=10)
        with pytest.raises(TransferError) as err:
            tx.send("x", rx.endpoint, kv, 1, negotiated_with="0123456789abcdef")
        assert (err.value.reason, err.value.field) == ("handshake_mismatch", "instance")
        assert not fut.done()
        assert rx.offer().instance == rx.instance and len(rx.instance) == 16
        tx.send("x", rx.endpoint, kv, 1, negotiated_with=rx.instance)
        assert fut.result(timeout=5).first_token == 1


def test_failures_held_against_a_receiver_are_forgotten_when_it_restarts(monkeypatch, caplog):
    """Two transfers fail on shm (say both were in flight when the decode process died): the
    pair avoids shm. The receiver at that address is then a new process: what was held against
    the old one is dropped and the pair uses shm again."""
    from splitserve.kvtransfer.registry import backend_class

    shm_sender = backend_class("shm", "sender")
    real, broken = shm_sender.send, [True]

    def send(self, request_id, *args, **kwargs):
        if broken[0]:
            raise TransferError(FailureReason.CONNECTION_LOST, "the decode process died")
        return real(self, request_id, *args, **kwargs)

    monkeypatch.setattr(shm_sender, "send", send)
    caplog.set_level(logging.INFO, logger="splitserve.kvtransfer")
    cache = torch.zeros(LAYERS, 2, 8, 4, HEADS, DIM)
    rx = create_receiver("auto", spec("auto"), cache)
    with create_sender("auto", spec("auto")) as tx:
        for attempt in ("a", "b"):
            with pytest.raises(TransferError):
                tx.send(attempt, rx.endpoint, [torch.zeros(spec("tcp").layer_shape(5))] * LAYERS, 7)
        assert tx.choice(rx.endpoint).backend == "tcp"  # avoided for this endpoint
        broken[0] = False
        with _restart(rx, cache, monkeypatch, None) as rx:
            round_trip(tx, rx, "c")
            assert tx.choice(rx.endpoint).backend == "shm"
    assert any("is a new instance" in r.getMessage() and "['shm'] again" in r.getMessage()
               for r in caplog.records)


def test_replayable_layers_rewind_only_before_the_second_layer():
    from splitserve.kvtransfer.auto import _Replayable

    layers = _Replayable(iter(range(4)))
    assert next(layers.start()) == 0 and layers.rewindable  # e.g. layer 0 read before the HELLO
    again = layers.start()
    assert list(itertools.islice(again, 2)) == [0, 1] and not layers.rewindable
    assert list(again) == [2, 3]
    untouched = _Replayable([1, 2])  # num_tokens given: the HELLO goes before any layer
    untouched.start()
    assert untouched.rewindable and list(untouched.start()) == [1, 2]


def test_a_sender_forgets_idle_peers_and_negotiates_again(monkeypatch):
    from splitserve.kvtransfer.peers import PeerTable

    now = [0.0]
    cache = torch.zeros(LAYERS, 2, 8, 4, HEADS, DIM)
    with create_receiver("auto", spec("auto"), cache) as rx, create_sender("auto", spec("auto")) as tx:
        tx._peers = PeerTable(4, 60.0, clock=lambda: now[0])
        asked = []
        real = tx._ask
        monkeypatch.setattr(tx, "_ask", lambda *a: asked.append(a[0]) or real(*a))
        round_trip(tx, rx, "a")
        now[0] += 59.0
        round_trip(tx, rx, "b")  # used within the horizon: kept
        now[0] += 61.0
        round_trip(tx, rx, "c")  # idle past it: asked again
        assert asked == [rx.endpoint, rx.endpoint]
        for i in range(6):  # bounded: other peers push the least recently used out
            tx._peers.setdefault(f"127.0.0.1:{i + 1}", dict)
        assert len(tx._peers) == 4 and tx._peers.get(rx.endpoint) is None


RECEIVER_SCRIPT = """
import sys
import time
import torch
from splitserve.kvtransfer import KVSpec, create_receiver
spec = KVSpec("tiny@gen1", "float32", 3, 2, 8, 4, backend="auto")
port, requested, ids = int(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
rx = create_receiver("auto", spec, torch.zeros(3, 2, 16, 4, 2, 8), port=port, requested=requested)
futures = [rx.expect(r, 5, [2 * i, 2 * i + 1], timeout=30) for i, r in enumerate(ids)]
print(rx.endpoint, flush=True)
for r, fut in zip(ids, futures):
    print(r, fut.result().first_token, flush=True)
time.sleep(60)  # serving on (DONE may still be on its way) until the test kills it
"""


def _decode_process(port: int, requested: str, ids: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER_SCRIPT, str(port), requested, ids],
                            stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def test_a_decode_process_killed_and_restarted_with_another_offer_loses_no_later_transfer():
    """A real decode process (shm chosen with it) is killed and a new one starts at the same
    port asking for tcp: the prefill side's next transfers all land, over tcp."""
    old, endpoint = _decode_process(0, "auto", "a")
    try:
        with create_sender("auto", spec("auto")) as tx:
            kv = [torch.ones(spec("tcp").layer_shape(5))] * LAYERS
            tx.send("a", endpoint, kv, 7)
            assert old.stdout.readline().split() == ["a", "7"]
            assert tx.choice(endpoint).backend == "shm"
            old.kill()
            old.wait(10)
            new, again = _decode_process(int(endpoint.rsplit(":", 1)[1]), "tcp", "b,c")
            try:
                assert again == endpoint
                for rid in ("b", "c"):
                    tx.send(rid, endpoint, (layer for layer in kv), 8)
                    assert new.stdout.readline().split() == [rid, "8"]
                assert tx.choice(endpoint).backend == "tcp"
            finally:
                new.kill()
                new.wait(10)
    finally:
        old.kill()
        old.wait(10)
