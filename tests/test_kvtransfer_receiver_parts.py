"""The socket receiver's parts, each alone: the transfer table (what expect() announced, refusals
remembered, claims, timeouts, close) and the connection threads (accept, serve, watchdog, stop).
The receiver as a whole runs the contract suite (test_kvtransfer_contract.py)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch
from splitserve.kvtransfer import FailureReason, TransferError, TransferState
from splitserve.kvtransfer.connection_threads import ConnectionThreads
from splitserve.kvtransfer.layout import PagedWriter
from splitserve.kvtransfer.transfer_table import TransferTable

CACHE = torch.zeros(2, 2, 8, 4, 2, 4)  # layers, k/v, blocks, block size, heads, head dim


def table(registration_wait: float = 1.0) -> TransferTable:
    return TransferTable("tcp", registration_wait)


def expect(t: TransferTable, request_id: str, num_tokens: int = 3, timeout: float = 10.0):
    return t.expect(request_id, num_tokens, PagedWriter(CACHE, [0], num_tokens), timeout)


def reason(future) -> FailureReason:
    with pytest.raises(TransferError) as info:
        future.result(timeout=1)
    return info.value.reason


def test_a_refusal_before_expect_fails_the_expect_at_once():
    t = table()
    assert t.reject("r", TransferError(FailureReason.NO_SPACE, "full", request_id="r")) is False
    assert t.stats()["tombstones"] == 1
    assert reason(expect(t, "r")) == FailureReason.NO_SPACE
    assert t.stats() == {"pending": 0, "connections": 0, "handlers": 0, "tombstones": 0}


def test_a_sender_waits_for_expect_and_claims_the_transfer():
    t = table()
    a, b = socket.socketpair()
    threading.Timer(0.1, expect, (t, "r")).start()
    entry = t.claim("r", 3, a)
    assert entry.state == TransferState.TRANSFERRING and entry.conn is a
    with pytest.raises(TransferError, match="another sender"):
        t.claim("r", 3, b)
    a.close(), b.close()


def test_a_claim_with_other_lengths_fails_both_sides_naming_the_field():
    t = table()
    future = expect(t, "r", num_tokens=3)
    with pytest.raises(TransferError) as info:
        t.claim("r", 4, socket.socket())
    assert info.value.field == "num_tokens"
    assert reason(future) == FailureReason.HANDSHAKE_MISMATCH


def test_nobody_expects_it_within_the_registration_wait():
    with pytest.raises(TransferError) as info:
        table(registration_wait=0.05).claim("r", 3, socket.socket())
    assert info.value.reason == FailureReason.UNKNOWN_REQUEST


def test_expire_fails_what_is_past_its_deadline_only():
    t = table()
    late, on_time = expect(t, "late", timeout=0.01), expect(t, "on-time", timeout=10)
    time.sleep(0.02)
    t.expire()
    assert reason(late) == FailureReason.TIMEOUT
    assert not on_time.done() and t.stats()["pending"] == 1


def test_close_fails_every_transfer_once_and_refuses_later_ones():
    t = table()
    future = expect(t, "r")
    assert t.close(TransferError(FailureReason.CLOSED, "closed")) is True
    assert t.close(TransferError(FailureReason.CLOSED, "closed")) is False
    assert reason(future) == FailureReason.CLOSED
    assert reason(expect(t, "later")) == FailureReason.CLOSED
    assert t.open_connection(socket.socket()) is False


def test_connection_threads_serve_each_connection_run_the_watchdog_and_stop():
    served, watchdog = [], threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve(conn: socket.socket) -> None:
        served.append(conn.recv(1))
        conn.close()

    threads = ConnectionThreads(listener, "test-recv", serve, watchdog.set,
                                idle_s=0.1, watchdog_period_s=0.01)
    for byte in (b"a", b"b", b"c"):
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(byte)
            conn.recv(1)  # the server closed it: served
    assert sorted(served) == [b"a", b"b", b"c"]
    assert watchdog.wait(1)
    threads.close(wait_s=5)
    assert not [t for t in threading.enumerate() if t.name == "test-recv"]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)
