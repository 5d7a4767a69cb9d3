"""KV connections prove the shared secret, both ways, before any KV moves.

Real sockets on 127.0.0.1 and the real TCP and shm backends: a sender without the secret, or with
a wrong one, is refused and the receiver's blocks are untouched (the transfer stays open for the
real sender); a decode impostor (no secret, a wrong secret, or a bare socket that just says
ACCEPT) never receives a layer or a first token. Both ends count and name each refusal.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch
from prometheus_client import REGISTRY
from splitserve.kvtransfer import TransferError, create_receiver, create_sender
from splitserve.kvtransfer.wire import FrameType, recv_frame, send_frame
from splitserve.trust import InternalSecret
from test_kvtransfer_contract import failure, layers, make_cache, make_spec, send_in_thread

pytestmark = pytest.mark.timeout(60)

SECRET = InternalSecret("a-secret-of-this-deployment-0123456789")
OTHER = InternalSecret("some-other-deployment-secret-9876543210")


@pytest.fixture(params=["tcp", "shm", "auto"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def settled(read, want: float, timeout: float = 2.0) -> float:
    """``read()`` once it equals ``want`` (the other end counts on its own thread), else its
    last value."""
    deadline = time.monotonic() + timeout
    while (got := read()) != want and time.monotonic() < deadline:
        time.sleep(0.01)
    return got


def auth_failures(side: str, backend: str) -> float:
    return REGISTRY.get_sample_value(
        "splitserve_kv_auth_failures_total", {"side": side, "backend": backend}) or 0.0


def receiver(spec, secret, **kw):
    return create_receiver(spec.backend, spec, make_cache(spec), host="127.0.0.1", port=0,
                           secret=secret, **kw)


@pytest.mark.parametrize("sender_secret", [None, OTHER], ids=["no-secret", "wrong-secret"])
def test_sender_without_the_secret_is_refused_and_blocks_stay_untouched(backend, sender_secret):
    spec = make_spec(backend)
    rx = receiver(spec, SECRET)
    before = rx.kv_cache.clone()
    fut = rx.expect("r1", 8, [0, 1], timeout=20)
    refused_rx, refused_tx = auth_failures("receive", backend), auth_failures("send", backend)
    try:
        with create_sender(backend, spec, secret=sender_secret) as bad, pytest.raises(TransferError) as info:
            bad.send("r1", rx.endpoint, layers(spec, 8, seed=1), 666)
        assert info.value.reason == "unauthenticated"
        assert "secret" in str(info.value)
        assert torch.equal(rx.kv_cache, before)  # not one byte landed
        assert not fut.done()  # the impostor could neither fill nor fail the real transfer
        assert settled(lambda: auth_failures("receive", backend), refused_rx + 1) == refused_rx + 1
        if sender_secret is not None:  # it verified the receiver's proof and failed it too
            assert auth_failures("send", backend) == refused_tx + 1
        kv = layers(spec, 8, seed=2)
        with create_sender(backend, spec, secret=SECRET) as good:
            result = good.send("r1", rx.endpoint, kv, 7)
        assert result.first_token == 7 and fut.result(timeout=5).first_token == 7
        assert not torch.equal(rx.kv_cache, before)
    finally:
        rx.close()


@pytest.mark.parametrize("receiver_secret", [None, OTHER], ids=["no-secret", "wrong-secret"])
def test_decode_impostor_without_the_secret_never_receives_kv(backend, receiver_secret):
    spec = make_spec(backend)
    rx = receiver(spec, receiver_secret)
    before = rx.kv_cache.clone()
    fut = rx.expect("r2", 8, [0, 1], timeout=20)
    pulled: list[int] = []

    def kv():
        for i, layer in enumerate(layers(spec, 8)):
            pulled.append(i)
            yield layer

    refused = auth_failures("send", backend)
    try:
        with create_sender(backend, spec, secret=SECRET) as tx, pytest.raises(TransferError) as info:
            tx.send("r2", rx.endpoint, kv(), 5, num_tokens=8)
        assert info.value.reason == "unauthenticated"
        assert pulled == []  # no layer was even computed for it, let alone sent
        assert torch.equal(rx.kv_cache, before)
        if receiver_secret is None:  # a decode worker left without a secret fails fast, saying why
            assert failure(fut).reason == "unauthenticated"
        else:  # one holding another secret cannot tell the sender from an attacker: no effect
            assert not fut.done()
        assert auth_failures("send", backend) == refused + 1
    finally:
        rx.close()


def test_a_bare_socket_that_says_accept_gets_no_layer_and_no_first_token():
    """An impostor that speaks the wire format but skips the challenge."""
    spec = make_spec("tcp")
    server = socket.create_server(("127.0.0.1", 0))
    seen: list[FrameType] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            seen.append(recv_frame(conn).type)
            send_frame(conn, FrameType.ACCEPT)
            conn.settimeout(2)
            try:
                while True:
                    frame = recv_frame(conn)
                    seen.append(frame.type)
                    conn.recv(frame.payload_len) if frame.payload_len else None
            except (OSError, TransferError):
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with create_sender("tcp", spec, secret=SECRET) as tx, pytest.raises(TransferError) as info:
        tx.send("r3", f"127.0.0.1:{server.getsockname()[1]}", layers(spec, 4), 9)
    thread.join(5)
    server.close()
    assert info.value.reason == "unauthenticated"
    assert seen == [FrameType.HELLO, FrameType.ERROR]  # no LAYER, no END (first token)


def test_every_stream_of_a_multi_stream_transfer_authenticates():
    spec = make_spec("tcp", num_layers=4)
    rx = receiver(spec, SECRET)
    try:
        fut = rx.expect("r4", 8, [0, 1], timeout=20)
        kv = layers(spec, 8)
        with create_sender("tcp", spec, secret=SECRET, streams=2, min_stream_bytes=1) as tx:
            done = send_in_thread(tx, "r4", rx.endpoint, kv, 3)
            assert done.result(timeout=10).first_token == 3
        assert fut.result(timeout=5).first_token == 3
    finally:
        rx.close()


def test_a_join_without_proof_cannot_attach_to_an_authenticated_transfer():
    spec = make_spec("tcp")
    rx = receiver(spec, SECRET)
    try:
        host, port = rx.endpoint.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            send_frame(sock, FrameType.JOIN, {"request_id": "r5", "stream": 1})
            frame = recv_frame(sock)
        assert frame.type == FrameType.ERROR and frame.meta["reason"] == "unauthenticated"
    finally:
        rx.close()
