"""The KV transfer contract, run against every registered backend.

Real sockets on 127.0.0.1 (port 0), a real subprocess for "the prefill process dies mid-stream".
Each test checks both sides: what the sender raises and how the receiver's future fails, and how
fast (the point of the design is fast, certain failure).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from prometheus_client import REGISTRY
from splitserve.kvtransfer import (
    KVSpec,
    SampledToken,
    TransferError,
    TransferState,
    available_backends,
    create_receiver,
    create_sender,
)
from splitserve.kvtransfer.layout import gather_layer, token_slots
from splitserve.kvtransfer.wire import FrameType, expect_frame, send_frame

pytestmark = pytest.mark.timeout(60)

LAYERS, HEADS, DIM = 3, 2, 8
# nixl on the CPU: host memory over UCX's TCP transport on loopback (the test netns has only lo);
# set before any agent exists, inherited by the peer processes below
os.environ.setdefault("UCX_TLS", "tcp")
os.environ.setdefault("UCX_NET_DEVICES", "lo")


@pytest.fixture(params=available_backends())
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "cuda_ipc" and not torch.cuda.is_available():
        pytest.skip("cuda_ipc needs CUDA (torch.cuda.is_available() is False)")
    if request.param == "nixl":
        from splitserve.kvtransfer.nixl import probe

        why_not = probe(False)  # what auto asks before it offers nixl
        if why_not is not None:
            pytest.skip(f"nixl cannot run here: {why_not}")
    return request.param


def make_spec(backend: str, *, dtype: str = "float32", block_size: int = 4, **kw) -> KVSpec:
    fields = dict(model_fingerprint="tiny-model@gen1", dtype=dtype, num_layers=LAYERS,
                  num_kv_heads=HEADS, head_dim=DIM, block_size=block_size, backend=backend)
    fields.update(kw)
    return KVSpec(**fields)


def make_cache(spec: KVSpec, num_blocks: int = 16, fill: float = -7.0) -> torch.Tensor:
    shape = (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return torch.full(shape, fill, dtype=getattr(torch, spec.dtype))


def layers(spec: KVSpec, num_tokens: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(spec.layer_shape(num_tokens), generator=gen).to(getattr(torch, spec.dtype))
            for _ in range(spec.num_layers)]


@pytest.fixture
def receiver_factory():
    made = []

    def make(spec: KVSpec, cache: torch.Tensor | None = None, **kw):
        rx = create_receiver(spec.backend, spec, make_cache(spec) if cache is None else cache,
                             host="127.0.0.1", port=0, **kw)
        made.append(rx)
        return rx

    yield make
    for rx in made:
        rx.close()


def send_in_thread(sender, *args, **kw) -> concurrent.futures.Future:
    """Run sender.send in a fresh thread; the Future carries its result or exception."""
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            fut.set_result(sender.send(*args, **kw))
        except BaseException as exc:  # handed to the test through the future
            fut.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return fut


def failure(fut: concurrent.futures.Future, timeout: float = 5.0) -> TransferError:
    with pytest.raises(TransferError) as info:
        fut.result(timeout=timeout)
    return info.value


def gated(items: list[torch.Tensor], gate_after: int, gate: threading.Event,
          reached: threading.Event | None = None) -> Iterator[torch.Tensor]:
    """Yield ``items``, pausing before item ``gate_after`` until ``gate`` is set."""
    for i, item in enumerate(items):
        if i == gate_after:
            if reached is not None:
                reached.set()
            gate.wait(10)
        yield item


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("num_tokens", [1, 13, 32])
@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
def test_round_trip_translates_block_layout(backend, receiver_factory, dtype, num_tokens, staged):
    # Prefill uses block size 16 and its own numbering; decode uses block size 4, scattered blocks.
    p_spec, d_spec = make_spec(backend, dtype=dtype, block_size=16), make_spec(backend, dtype=dtype)
    p_cache = make_cache(p_spec, num_blocks=8)
    p_table = [6, 1][: -(-num_tokens // 16)]
    p_slots = token_slots(p_table, num_tokens, 16, 8)
    want = layers(p_spec, num_tokens, seed=num_tokens)
    for layer, data in enumerate(want):
        p_cache[layer].view(2, -1, HEADS, DIM)[:, p_slots] = data
    d_cache = make_cache(d_spec, num_blocks=16)
    d_table = [15, 3, 9, 0, 12, 7, 5, 1, 2]
    rx = receiver_factory(d_spec, d_cache, staged=staged)
    fut = rx.expect("req-1", num_tokens, d_table, timeout=10)
    kv = (gather_layer(p_cache, layer, p_slots) for layer in range(LAYERS))
    with create_sender(backend, p_spec) as tx:
        sent = tx.send("req-1", rx.endpoint, kv, first_token=lambda: 42, meta={"trace": "t1"})
    got = fut.result(timeout=5)
    assert got.state == sent.state == TransferState.DONE
    assert (got.first_token, got.num_tokens, got.meta) == (42, num_tokens, {"trace": "t1"})
    assert got.bytes == sent.bytes == d_spec.layer_nbytes(num_tokens) * LAYERS
    d_slots = token_slots(d_table, num_tokens, 4, 16)
    for layer in range(LAYERS):
        assert torch.equal(gather_layer(d_cache, layer, d_slots), want[layer])
    untouched = torch.ones(16 * 4, dtype=torch.bool)
    untouched[d_slots] = False
    assert bool((d_cache.view(LAYERS, 2, 64, HEADS, DIM)[:, :, untouched] == -7.0).all())
    assert rx.stats()["pending"] == 0


def test_handshake_before_first_layer_with_num_tokens(backend, receiver_factory):
    spec = make_spec(backend)
    rx = receiver_factory(spec)
    fut = rx.expect("r", 5, [0, 1], timeout=10)
    with create_sender(backend, spec) as tx:
        tx.send("r", rx.endpoint, iter(layers(spec, 5)), 7, num_tokens=5)
    assert fut.result(timeout=5).first_token == 7


@pytest.mark.parametrize("logprobs", [None, {"token_id": 7, "logprob": -0.25, "top": [[7, -0.25], [3, -1.5]]}])
def test_the_first_tokens_logprobs_travel_in_end(backend, receiver_factory, logprobs):
    spec = make_spec(backend)
    rx = receiver_factory(spec)
    fut = rx.expect("r", 5, [0, 1], timeout=10)
    with create_sender(backend, spec) as tx:
        sent = tx.send("r", rx.endpoint, iter(layers(spec, 5)), lambda: SampledToken(7, logprobs), num_tokens=5)
    got = fut.result(timeout=5)
    assert (got.first_token, got.first_logprobs) == (sent.first_token, sent.first_logprobs) == (7, logprobs)


def test_malformed_first_token_logprobs_are_refused_on_both_sides(backend, receiver_factory):
    spec = make_spec(backend)
    rx = receiver_factory(spec)
    fut = rx.expect("r", 5, [0, 1], timeout=10)
    with create_sender(backend, spec) as tx:
        err = failure(send_in_thread(tx, "r", rx.endpoint, iter(layers(spec, 5)),
                                     SampledToken(7, {"token_id": 7, "logprob": "high", "top": []}), num_tokens=5))
    assert err.reason == "invalid_input"
    assert failure(fut).reason == "invalid_input"


def test_concurrent_transfers_share_one_receiver(backend, receiver_factory):
    spec = make_spec(backend)
    rx = receiver_factory(spec, make_cache(spec, num_blocks=40))
    futs = [rx.expect(f"r{i}", 9, [3 * i, 3 * i + 1, 3 * i + 2], timeout=10) for i in range(8)]
    with create_sender(backend, spec) as tx, concurrent.futures.ThreadPoolExecutor(8) as pool:
        sends = [pool.submit(tx.send, f"r{i}", rx.endpoint, layers(spec, 9, seed=i), i)
                 for i in range(8)]
        assert [s.result(timeout=10).first_token for s in sends] == list(range(8))
    assert [f.result(timeout=5).first_token for f in futs] == list(range(8))


def test_sender_arriving_before_expect_waits(backend, receiver_factory):
    spec = make_spec(backend)
    rx = receiver_factory(spec)
    with create_sender(backend, spec) as tx:
        sending = send_in_thread(tx, "early", rx.endpoint, layers(spec, 6), 3)
        time.sleep(0.3)
        assert not sending.done()
        fut = rx.expect("early", 6, [4, 5], timeout=10)
        assert sending.result(timeout=5).state == TransferState.DONE
    assert fut.result(timeout=5).first_token == 3


def test_sender_for_unknown_request_is_refused_after_bounded_wait(backend, receiver_factory):
    spec = make_spec(backend)
    rx = receiver_factory(spec, registration_wait=0.2)
    with create_sender(backend, spec) as tx:
        start = time.monotonic()
        with pytest.raises(TransferError) as info:
            tx.send("nobody", rx.endpoint, layers(spec, 4), 1)
    assert info.value.reason == "unknown_request"
    assert time.monotonic() - start < 2.0


# --------------------------------------------------------------------------- handshake
@pytest.mark.parametrize("field,value", [
    ("model_fingerprint", "other-model@gen2"), ("dtype", "float16"), ("num_layers", LAYERS + 1),
    ("num_kv_heads", HEADS * 2), ("head_dim", DIM // 2),
])
def test_handshake_mismatch_names_the_field_on_both_sides(backend, receiver_factory, field, value):
    rx = receiver_factory(make_spec(backend))
    fut = rx.expect("mm", 4, [0], timeout=10)
    bad = make_spec(backend, **{field: value})
    with create_sender(backend, bad) as tx, pytest.raises(TransferError) as info:
        tx.send("mm", rx.endpoint, layers(bad, 4), 1)
    assert info.value.reason == "handshake_mismatch" and field in str(info.value)
    err = failure(fut, timeout=1)
    assert err.reason == "handshake_mismatch" and field in str(err)


def test_mismatch_before_expect_fails_the_later_expect_at_once(backend, receiver_factory):
    rx = receiver_factory(make_spec(backend))
    bad = make_spec(backend, head_dim=4)
    with create_sender(backend, bad) as tx, pytest.raises(TransferError):
        tx.send("mm2", rx.endpoint, layers(bad, 4), 1)
    err = failure(rx.expect("mm2", 4, [0], timeout=10), timeout=0.5)
    assert err.reason == "handshake_mismatch" and "head_dim" in str(err)


def test_token_count_mismatch_is_refused(backend, receiver_factory):
    spec = make_spec(backend)
    rx = receiver_factory(spec)
    fut = rx.expect("n", 8, [0, 1], timeout=10)
    with create_sender(backend, spec) as tx, pytest.raises(TransferError) as info:
        tx.send("n", rx.endpoint, layers(spec, 5), 1)
    assert info.value.reason == "handshake_mismatch" and "num_tokens" in str(info.value)
    assert failure(fut, timeout=1).reason == "handshake_mismatch"


# --------------------------------------------------------------------------- faults
def test_dropped_connection_mid_layer_fails_fast(backend, receiver_factory):
    spec = make_spec(backend)
    rx = receiver_factory(spec)
    fut = rx.expect("drop", 8, [0, 1], timeout=30)
    sock = socket.create_connection(tuple(rx.endpoint.rsplit(":", 1)), timeout=5)
    wire_spec = make_spec("tcp") if backend == "auto" else spec  # HELLO names a real backend
    hello = {"request_id": "drop", "spec": wire_spec.to_dict(), "num_tokens": 8, "meta": {}}
    sink = None
    if backend in ("shm", "cuda_ipc", "nixl"):  # the receiver needs a segment, GPU ring, agent
        sink = create_sender(backend, spec).open_sink(spec.layer_nbytes(8))
        hello.update(sink.hello_fields())
    send_frame(sock, FrameType.HELLO, hello)
    expect_frame(sock, FrameType.ACCEPT)
    if sink is not None:
        sink.close()
    sock.sendall(b"SSKV\x01")  # the start of a frame header, then the connection drops
    start = time.monotonic()
    sock.close()
    err = failure(fut, timeout=2)
    assert err.reason == "connection_lost"
    assert time.monotonic() - start < 1.0


def test_nobody_arrives_times_out(backend, receiver_factory):
    rx = receiver_factory(make_spec(backend))
    start = time.monotonic()
    err = failure(rx.expect("late", 4, [0], timeout=0.3), timeout=2)
    assert err.reason == "timeout" and 0.25 < time.monotonic() - start < 1.0


def test_stalled_sender_times_out_and_stops_writing(backend, receiver_factory):
    spec = make_spec(backend)
    cache = make_cache(spec)
    rx = receiver_factory(spec, cache)
    fut = rx.expect("stall", 8, [0, 1], timeout=0.5)
    gate, reached = threading.Event(), threading.Event()
    with create_sender(backend, spec) as tx:
        sending = send_in_thread(tx, "stall", rx.endpoint, gated(layers(spec, 8), 1, gate, reached), 1)
        assert reached.wait(5)
        assert failure(fut, timeout=2).reason == "timeout"
        snapshot = cache.clone()
        gate.set()  # the sender wakes up and tries to carry on
        assert failure(sending).reason in ("timeout", "connection_lost")
    assert torch.equal(cache, snapshot)  # nothing written after the future failed


def test_cancel_pending_and_late_sender_is_refused(backend, receiver_factory):
    spec = make_spec(backend)
    rx = receiver_factory(spec)
    fut = rx.expect("c", 4, [0], timeout=10)
    assert rx.cancel("c") is True
    assert failure(fut, timeout=0.5).reason == "cancelled"
    with create_sender(backend, spec) as tx, pytest.raises(TransferError) as info:
        start = time.monotonic()
        tx.send("c", rx.endpoint, layers(spec, 4), 1)
    assert info.value.reason == "cancelled" and time.monotonic() - start < 1.0


def test_cancel_mid_transfer(backend, receiver_factory):
    spec = make_spec(backend)
    rx = receiver_factory(spec)
    fut = rx.expect("cm", 8, [0, 1], timeout=10)
    gate, reached = threading.Event(), threading.Event()
    with create_sender(backend, spec) as tx:
        sending = send_in_thread(tx, "cm", rx.endpoint, gated(layers(spec, 8), 2, gate, reached), 1)
        assert reached.wait(5)
        time.sleep(0.05)
        start = time.monotonic()
        rx.cancel("cm")
        assert failure(fut, timeout=1).reason == "cancelled"
        assert time.monotonic() - start < 0.5
        gate.set()
        assert failure(sending).reason in ("cancelled", "connection_lost")


def test_reject_no_space_fails_sender_at_once(backend, receiver_factory):
    spec = make_spec(backend)
    rx = receiver_factory(spec)
    rx.reject("full", "no_space", "decode is out of KV blocks")
    with create_sender(backend, spec) as tx, pytest.raises(TransferError) as info:
        tx.send("full", rx.endpoint, layers(spec, 4), 1)
    assert info.value.reason == "no_space" and "out of KV blocks" in str(info.value)


def test_receiver_close_fails_pending_and_streaming(backend, receiver_factory):
    spec = make_spec(backend)
    rx = receiver_factory(spec)
    idle = rx.expect("idle", 4, [0], timeout=10)
    busy = rx.expect("busy", 8, [1, 2], timeout=10)
    gate, reached = threading.Event(), threading.Event()
    with create_sender(backend, spec) as tx:
        sending = send_in_thread(tx, "busy", rx.endpoint, gated(layers(spec, 8), 1, gate, reached), 1)
        assert reached.wait(5)
        rx.close()
        assert failure(idle, timeout=1).reason == "closed"
        assert failure(busy, timeout=1).reason == "closed"
        gate.set()
        assert failure(sending).reason in ("closed", "connection_lost")
        with pytest.raises(TransferError) as info:  # nobody listens any more
            tx.send("after", rx.endpoint, layers(spec, 4), 1)
        assert info.value.reason == "connection_lost"
    assert failure(rx.expect("x", 4, [0])).reason == "closed"


def test_sender_side_errors_reach_the_receiver(backend, receiver_factory):
    spec = make_spec(backend)
    rx = receiver_factory(spec)

    def broken():
        yield torch.zeros(spec.layer_shape(4))
        raise RuntimeError("prefill forward failed")

    fut = rx.expect("abort", 4, [0], timeout=10)
    fut_short = rx.expect("short", 4, [1], timeout=10)
    with create_sender(backend, spec) as tx:
        with pytest.raises(TransferError) as info:
            tx.send("abort", rx.endpoint, broken(), 1)
        assert info.value.reason == "aborted" and isinstance(info.value.__cause__, RuntimeError)
        with pytest.raises(TransferError) as info:
            tx.send("short", rx.endpoint, layers(spec, 4)[:2], 1)
        assert info.value.reason == "invalid_input"
        with pytest.raises(TransferError) as info:
            tx.send("shape", rx.endpoint, [torch.zeros(2, 4, HEADS, DIM + 1)] * LAYERS, 1)
        assert info.value.reason == "invalid_input" and "shape" in str(info.value)
    assert failure(fut, timeout=1).reason == "aborted"
    assert failure(fut_short, timeout=1).reason == "invalid_input"


def test_slow_receiver_bounds_sender_buffering(backend):
    """A receiver that accepts and then never reads: the sender pulls only a few layers, then
    times out; it does not drain the iterator into memory."""
    spec = make_spec(backend, num_layers=64, num_kv_heads=8, head_dim=128)
    server = socket.create_server(("127.0.0.1", 0))
    pulled = []

    def serve() -> None:
        conn, _ = server.accept()
        if backend == "auto":  # answer the offer; the HELLO comes on the next connection
            with conn:
                offer = expect_frame(conn, FrameType.OFFER).meta
                send_frame(conn, FrameType.OFFER, offer)  # the same abilities: no GPU path
            conn, _ = server.accept()
        with conn:
            expect_frame(conn, FrameType.HELLO)
            send_frame(conn, FrameType.ACCEPT)
            time.sleep(3)

    threading.Thread(target=serve, daemon=True).start()

    def kv():
        for i in range(spec.num_layers):
            pulled.append(i)
            yield torch.zeros(spec.layer_shape(2048))  # 8 MiB per layer

    endpoint = f"127.0.0.1:{server.getsockname()[1]}"
    with create_sender(backend, spec, io_timeout=0.5) as tx, pytest.raises(TransferError) as info:
        tx.send("slow", endpoint, kv(), 1)
    server.close()
    assert info.value.reason in ("timeout", "connection_lost")
    assert len(pulled) <= 4


# --------------------------------------------------------------------------- leaks
def failing_after_one(kv: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    yield kv[0]
    raise RuntimeError("out of memory in layer 1")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_thousand_failed_transfers_leak_nothing(backend, receiver_factory):
    spec = make_spec(backend)
    bad = make_spec(backend, model_fingerprint="old-gen")
    rx = receiver_factory(spec, registration_wait=0.2)
    tx, bad_tx = create_sender(backend, spec), create_sender(backend, bad)
    kv, bad_kv = layers(spec, 4), layers(bad, 4)
    warm = rx.expect("warm", 4, [0], timeout=10)  # the receiver's spare thread; auto's
    tx.send("warm", rx.endpoint, kv, 1)                # offers and backend senders
    warm.result(timeout=2)
    with pytest.raises(TransferError):
        bad_tx.send("warm-bad", rx.endpoint, bad_kv, 1)
    threads, fds = threading.active_count(), _open_fds()
    for i in range(1000):
        rid = f"f{i}"
        kind = i % 4
        fut = rx.expect(rid, 4, [i % 16], timeout=10)
        if kind == 0:  # handshake mismatch
            with pytest.raises(TransferError):
                bad_tx.send(rid, rx.endpoint, bad_kv, 1)
        elif kind == 1:  # decode gives up (no space) before the sender arrives
            rx.reject(rid, "no_space")
            with pytest.raises(TransferError):
                tx.send(rid, rx.endpoint, kv, 1)
        elif kind == 2:  # cancel with no sender at all
            rx.cancel(rid)
        else:  # the sender's own compute fails after one layer
            with pytest.raises(TransferError):
                tx.send(rid, rx.endpoint, failing_after_one(kv), 1)
        with pytest.raises(TransferError):
            fut.result(timeout=2)
    tx.close()
    bad_tx.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stats = rx.stats()
        if (stats == {"pending": 0, "connections": 0, "handlers": 0, "tombstones": 0}
                and threading.active_count() <= threads and _open_fds() <= fds):
            break
        time.sleep(0.1)
    assert rx.stats() == {"pending": 0, "connections": 0, "handlers": 0, "tombstones": 0}
    assert threading.active_count() <= threads
    assert _open_fds() <= fds
    if os.path.isdir("/dev/shm"):  # our shm segments are unlinked (other programs' may come and go)
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"splitserve-kv-{os.getpid()}-")]


def test_metrics_count_bytes_outcomes_and_reasons(backend, receiver_factory):
    spec = make_spec(backend)

    def value(name: str, **labels) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    rx = receiver_factory(spec)
    carrier = backend  # what moved the bytes; a failure before any sender is the receiver's
    if backend == "auto":
        from splitserve.kvtransfer.auto import local_offer
        from splitserve.kvtransfer.negotiate import choose

        carrier = choose(local_offer("auto", torch.cuda.is_available()), rx.offer()).backend
    before = {
        "bytes": value("splitserve_kv_bytes_total", side="receive", backend=carrier),
        "ok": value("splitserve_kv_transfers_total", side="send", backend=carrier, outcome="ok"),
        "timeout": value("splitserve_kv_failures_total", side="receive", backend=backend,
                         reason="timeout"),
        "hist": value("splitserve_kv_transfer_seconds_count", side="receive", backend=carrier),
    }
    fut = rx.expect("m", 5, [0, 1], timeout=10)
    with create_sender(spec.backend, spec) as tx:
        tx.send("m", rx.endpoint, layers(spec, 5), 1)
    fut.result(timeout=5)
    failure(rx.expect("m2", 4, [2], timeout=0.1))
    assert value("splitserve_kv_bytes_total", side="receive", backend=carrier) - before["bytes"] \
        == spec.layer_nbytes(5) * LAYERS
    assert value("splitserve_kv_transfers_total", side="send", backend=carrier, outcome="ok") \
        == before["ok"] + 1
    assert value("splitserve_kv_failures_total", side="receive", backend=backend,
                 reason="timeout") == before["timeout"] + 1
    assert value("splitserve_kv_transfer_seconds_count", side="receive", backend=carrier) \
        == before["hist"] + 1


# A real prefill process (torch imported, real sender) that dies mid-stream. Importing torch
# takes seconds here, so the processes are started when this module starts and wait on stdin.
PEER_SCRIPT = r"""
import json, sys, time, torch
from splitserve.kvtransfer import KVSpec, create_sender
job = json.loads(sys.stdin.readline())
spec = KVSpec(**job["spec"])
def kv():
    for layer in range(spec.num_layers):
        if layer == 2:
            print("mid-stream", flush=True)
            time.sleep(60)
        yield torch.ones(spec.layer_shape(8), dtype=getattr(torch, spec.dtype))
create_sender(spec.backend, spec).send("dies", job["endpoint"], kv(), 1)
"""


@pytest.fixture(scope="module", autouse=True)
def peer_processes():
    procs = {
        name: subprocess.Popen([sys.executable, "-c", PEER_SCRIPT], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        for name in available_backends()
    }
    yield procs
    for proc in procs.values():
        proc.kill()
        proc.wait(timeout=10)
        proc.stdin.close()
        proc.stdout.close()


def test_prefill_process_killed_mid_stream_fails_fast(backend, receiver_factory, peer_processes):
    spec = make_spec(backend)
    rx = receiver_factory(spec)
    fut = rx.expect("dies", 8, [0, 1], timeout=60)
    proc = peer_processes[backend]
    proc.stdin.write(json.dumps({"spec": spec.to_dict(), "endpoint": rx.endpoint}) + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "mid-stream"
    assert not fut.done()
    start = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    err = failure(fut, timeout=2)
    assert err.reason == "connection_lost"
    assert time.monotonic() - start < 1.0
    assert rx.stats()["pending"] == 0


# --------------------------------------------------------------------------- parallel streams
def multi_stream_sender(backend: str, spec: KVSpec, streams: int = 3):
    """A sender spreading every transfer over ``streams`` connections (skip if unsupported)."""
    from splitserve.kvtransfer.registry import _load

    if _load(backend, "sender", spec).max_streams < streams:
        pytest.skip(f"{backend} has no parallel streams")
    return create_sender(backend, spec, streams=streams, min_stream_bytes=0)


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
def test_parallel_streams_round_trip(backend, receiver_factory, staged):
    spec = make_spec(backend, num_layers=7, dtype="bfloat16")
    cache = make_cache(spec)
    rx = receiver_factory(spec, cache, staged=staged)
    want = layers(spec, 13)
    with multi_stream_sender(backend, spec) as tx:
        for i in range(3):
            fut = rx.expect(f"ms{i}", 13, [9, 2, 14, 5], timeout=10)
            tx.send(f"ms{i}", rx.endpoint, iter(want), 5, num_tokens=13)
            assert fut.result(timeout=5).first_token == 5
    slots = token_slots([9, 2, 14, 5], 13, 4, 16)
    assert all(torch.equal(gather_layer(cache, layer, slots), want[layer]) for layer in range(7))
    deadline = time.monotonic() + 2  # handler threads close their sockets after DONE
    while rx.stats()["connections"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rx.stats()["connections"] == 0


def test_one_dropped_stream_fails_the_transfer_fast(backend, receiver_factory):
    spec = make_spec(backend, num_layers=9)
    rx = receiver_factory(spec)
    fut = rx.expect("lane", 8, [0, 1], timeout=30)
    gate, reached = threading.Event(), threading.Event()
    with multi_stream_sender(backend, spec) as tx:
        opened = []  # the sender's connections in the order it opened them
        connect = tx._connect
        tx._connect = lambda address: opened.append(connect(address)) or opened[-1]
        sending = send_in_thread(tx, "lane", rx.endpoint, gated(layers(spec, 8), 5, gate, reached),
                                 1, num_tokens=8)
        assert reached.wait(5)
        time.sleep(0.1)
        assert len(opened) == 3
        start = time.monotonic()
        opened[2].shutdown(socket.SHUT_RDWR)  # the last extra stream drops
        assert failure(fut, timeout=2).reason == "connection_lost"
        assert time.monotonic() - start < 1.0
        gate.set()
        failure(sending)
    assert rx.stats()["pending"] == 0


def test_sender_failure_with_parallel_streams_reaches_the_receiver(backend, receiver_factory):
    spec = make_spec(backend, num_layers=9)
    rx = receiver_factory(spec)
    fut = rx.expect("ms-abort", 8, [0, 1], timeout=10)

    def broken():
        yield from layers(spec, 8)[:5]
        raise RuntimeError("prefill forward failed")

    with multi_stream_sender(backend, spec) as tx, pytest.raises(TransferError) as info:
        tx.send("ms-abort", rx.endpoint, broken(), 1, num_tokens=8)
    assert info.value.reason == "aborted"
    assert failure(fut, timeout=1).reason == "aborted"


def test_cancel_and_timeout_with_parallel_streams(backend, receiver_factory):
    spec = make_spec(backend, num_layers=9)
    cache = make_cache(spec)
    rx = receiver_factory(spec, cache)
    with multi_stream_sender(backend, spec) as tx:
        for rid, how in (("ms-cancel", "cancel"), ("ms-timeout", "timeout")):
            fut = rx.expect(rid, 8, [0, 1], timeout=10 if how == "cancel" else 0.5)
            gate, reached = threading.Event(), threading.Event()
            sending = send_in_thread(tx, rid, rx.endpoint, gated(layers(spec, 8), 4, gate, reached),
                                     1, num_tokens=8)
            assert reached.wait(5)
            if how == "cancel":
                time.sleep(0.05)
                rx.cancel(rid)
            assert failure(fut, timeout=2).reason == ("cancelled" if how == "cancel" else "timeout")
            snapshot = cache.clone()
            gate.set()
            failure(sending)
            assert torch.equal(cache, snapshot)
