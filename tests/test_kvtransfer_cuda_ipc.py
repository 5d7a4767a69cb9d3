"""The cuda_ipc KV-transfer backend between two real processes on one host (needs CUDA).

The sender runs in a child ``python -c`` process and writes straight into the receiver's paged
GPU cache (shared with it through a CUDA IPC handle); the receiver lives in the test process.
Checked: bit-exact data on cuda:0 -> cuda:0 and, with two GPUs, cuda:0 -> cuda:1 (a peer copy);
the same-process path (one CUDA context); a handshake mismatch named on both sides; a sender
killed mid-transfer failing the receiver at once; a cancel acknowledged by a sender whose
sending thread is busy elsewhere. Without CUDA these skip; the CPU tests check the backend
refuses to start there and the sender-process exit check the receiver relies on.

Works under ``pytest --noconftest`` and, where pytest is missing, as a plain script:
``python tests/test_kvtransfer_cuda_ipc.py``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import torch
from splitserve.kvtransfer import KVSpec, TransferError, create_receiver, create_sender
from splitserve.kvtransfer.cuda_ipc import _pid_namespace, _read_stat, exit_state
from splitserve.kvtransfer.layout import gather_layer, token_slots

try:
    import pytest
except ImportError:  # the plain-script runner at the bottom needs no pytest
    pytest = None

HAS_CUDA = torch.cuda.is_available()
TWO_GPUS = HAS_CUDA and torch.cuda.device_count() >= 2
LAYERS, HEADS, DIM, TOKENS = 4, 8, 128, 300

# The child: a prefill-side sender; layers made from a seed so both sides know the data.
SENDER = r"""
import json, sys, time, torch
from splitserve.kvtransfer import KVSpec, TransferError, create_sender
args = json.loads(sys.argv[1])
spec = KVSpec(**args["spec"])
dev = torch.device(args["device"])
def kv():
    for layer in range(spec.num_layers):
        if args["mode"] == "pause" and layer == 1:
            print("PAUSED", flush=True)
            time.sleep(60)
        gen = torch.Generator().manual_seed(args["seed"] + layer)
        yield torch.randn(spec.layer_shape(args["tokens"]), generator=gen).to(
            getattr(torch, spec.dtype)).to(dev)
try:
    with create_sender("cuda_ipc", spec, device=dev) as tx:
        res = tx.send(args["rid"], args["endpoint"], kv(), 7, num_tokens=args["tokens"])
    print(json.dumps({"ok": True, "bytes": res.bytes}), flush=True)
except TransferError as err:
    print(json.dumps({"ok": False, "reason": err.reason.value, "error": str(err)}), flush=True)
"""


def make_spec(**kw: object) -> KVSpec:
    fields = dict(model_fingerprint="tiny@gen1", dtype="bfloat16", num_layers=LAYERS,
                  num_kv_heads=HEADS, head_dim=DIM, block_size=16, backend="cuda_ipc")
    fields.update(kw)
    return KVSpec(**fields)


def expected_layers(spec: KVSpec, tokens: int, seed: int) -> list[torch.Tensor]:
    return [torch.randn(spec.layer_shape(tokens), generator=torch.Generator().manual_seed(seed + i))
            .to(getattr(torch, spec.dtype)) for i in range(spec.num_layers)]


def start_sender(spec: KVSpec, endpoint: str, rid: str, *, mode: str = "ok",
                 device: str = "cuda:0", seed: int = 0) -> subprocess.Popen:
    args = {"spec": spec.to_dict(), "endpoint": endpoint, "rid": rid, "mode": mode,
            "device": device, "seed": seed, "tokens": TOKENS}
    return subprocess.Popen([sys.executable, "-c", SENDER, json.dumps(args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def child_result(proc: subprocess.Popen, timeout: float = 60.0) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        raise AssertionError(f"sender printed no result (rc {proc.returncode}): {err[-2000:]}")
    return json.loads(lines[-1])


def expect_failure(fut, timeout: float) -> TransferError:
    try:
        fut.result(timeout=timeout)
    except TransferError as err:
        return err
    raise AssertionError("the transfer should have failed")


def paged_cache(spec: KVSpec, device: str, num_blocks: int = 64) -> torch.Tensor:
    shape = (spec.num_layers, 2, num_blocks, spec.block_size, HEADS, DIM)
    return torch.full(shape, -7.0, dtype=getattr(torch, spec.dtype), device=device)


def check_round_trip(cache_device: str) -> None:
    """Sender (child, cuda:0, block size 16) -> receiver (here, ``cache_device``, block size 8,
    shuffled blocks): every byte arrives; blocks outside the table are untouched."""
    d_spec = make_spec(block_size=8)
    cache = paged_cache(d_spec, cache_device)
    table = torch.randperm(cache.shape[2])[: -(-TOKENS // 8)].tolist()
    with create_receiver("cuda_ipc", d_spec, cache) as rx:
        fut = rx.expect("rt", TOKENS, table, timeout=60)
        proc = start_sender(make_spec(), rx.endpoint, "rt", seed=3)
        res = fut.result(timeout=90)
        out = child_result(proc)
    assert out == {"ok": True, "bytes": res.bytes}, out
    assert res.first_token == 7 and res.num_tokens == TOKENS
    slots = token_slots(table, TOKENS, 8, cache.shape[2]).to(cache.device)
    for layer, want in enumerate(expected_layers(d_spec, TOKENS, 3)):
        got = gather_layer(cache, layer, slots).cpu()
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"layer {layer}"
    untouched = torch.ones(cache.shape[2], dtype=torch.bool)
    untouched[table] = False
    assert bool((cache[:, :, untouched.to(cache.device)] == -7.0).all())


def check_same_process(layer_device: str) -> None:
    """Sender and receiver in this process: the sender writes the receiver's tensor directly."""
    d_spec = make_spec(block_size=8)
    cache = paged_cache(d_spec, "cuda:0")
    table = torch.randperm(cache.shape[2])[: -(-TOKENS // 8)].tolist()
    want = expected_layers(d_spec, TOKENS, 5)
    with create_receiver("cuda_ipc", d_spec, cache) as rx, \
            create_sender("cuda_ipc", make_spec(), device="cuda:0") as tx:
        for rid in ("local-1", "local-2"):  # the second reuses everything
            fut = rx.expect(rid, TOKENS, table, timeout=30)
            sent = tx.send(rid, rx.endpoint, [t.to(layer_device) for t in want], 9)
            assert fut.result(timeout=30).bytes == sent.bytes
    slots = token_slots(table, TOKENS, 8, cache.shape[2]).to(cache.device)
    for layer in range(LAYERS):
        assert torch.equal(gather_layer(cache, layer, slots).cpu(), want[layer]), f"layer {layer}"


def check_cancel_acknowledged_while_sender_busy() -> None:
    """The child's sending thread sleeps in its layer iterator; its watcher still stops the
    writes and acknowledges, so the cancel completes at once."""
    spec = make_spec()
    with create_receiver("cuda_ipc", spec, paged_cache(spec, "cuda:0")) as rx:
        fut = rx.expect("busy", TOKENS, list(range(19)), timeout=60)
        proc = start_sender(spec, rx.endpoint, "busy", mode="pause")
        try:
            assert proc.stdout.readline().strip() == "PAUSED"
            time.sleep(0.2)
            start = time.monotonic()
            assert rx.cancel("busy")
            err = expect_failure(fut, 5)
            assert err.reason == "cancelled" and time.monotonic() - start < 1.0, err
            assert proc.poll() is None  # the sender is alive: this was its acknowledgement
        finally:
            proc.kill()
            proc.wait(10)


def check_handshake_mismatch() -> None:
    with create_receiver("cuda_ipc", make_spec(), paged_cache(make_spec(), "cuda:0")) as rx:
        fut = rx.expect("mm", TOKENS, list(range(19)), timeout=30)
        proc = start_sender(make_spec(head_dim=64), rx.endpoint, "mm")
        err = expect_failure(fut, 30)
        out = child_result(proc)
    assert err.reason == "handshake_mismatch" and "head_dim" in str(err), err
    assert out["reason"] == "handshake_mismatch" and "head_dim" in out["error"], out


def check_sender_killed_mid_transfer() -> None:
    spec = make_spec()
    with create_receiver("cuda_ipc", spec, paged_cache(spec, "cuda:0")) as rx:
        fut = rx.expect("kill", TOKENS, list(range(19)), timeout=60)
        proc = start_sender(spec, rx.endpoint, "kill", mode="pause")
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
        try:
            assert lines.get(timeout=60).strip() == "PAUSED"  # layer 0 is written
            time.sleep(0.3)
            assert not fut.done()
            start = time.monotonic()
            os.kill(proc.pid, signal.SIGKILL)
            err = expect_failure(fut, 5)
            assert time.monotonic() - start < 2.0
        finally:
            proc.kill()
            proc.wait(10)
        assert err.reason == "connection_lost", err
        # the receiver serves the next transfer normally (a new process maps the cache again)
        fut = rx.expect("after", TOKENS, list(range(19)), timeout=60)
        proc = start_sender(spec, rx.endpoint, "after")
        fut.result(timeout=90)
        assert child_result(proc)["ok"]
        assert rx.stats()["pending"] == 0


def check_no_cuda_refused() -> None:
    for make in (lambda: create_sender("cuda_ipc", make_spec()),
                 lambda: create_receiver("cuda_ipc", make_spec(), paged_cache(make_spec(), "cpu"))):
        try:
            make()
        except TransferError as err:
            assert err.reason == "backend_unavailable" and "CUDA" in str(err), err
        else:
            raise AssertionError("cuda_ipc must refuse to start without CUDA")


def check_exit_state() -> None:
    """The receiver's view of a sender process: running, then gone once it exited (zombie or
    reaped); a process of another PID namespace is unseen."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ident = {"pid": proc.pid, "ns": _pid_namespace(),
                 "start": _read_stat(f"/proc/{proc.pid}/stat")[2]}
        assert exit_state(ident) == "running"
        assert exit_state({**ident, "ns": "pid:[1]"}) == "unseen"
        assert exit_state({**ident, "start": ident["start"] + 1}) == "gone"  # a reused pid
        proc.kill()
        deadline = time.monotonic() + 10
        while exit_state(ident) != "gone" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert exit_state(ident) == "gone"  # a zombie: its GPU context is released
    finally:
        proc.kill()
        proc.wait(10)
    assert exit_state(ident) == "gone"  # reaped


if pytest is not None:
    needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="cuda_ipc needs CUDA "
                                    "(torch.cuda.is_available() is False)")
    pytestmark = pytest.mark.timeout(180)

    @needs_cuda
    def test_round_trip_same_gpu_bit_exact() -> None:
        check_round_trip("cuda:0")

    @pytest.mark.skipif(not TWO_GPUS, reason="peer copy needs 2 GPUs")
    def test_round_trip_to_another_gpu_bit_exact() -> None:
        check_round_trip("cuda:1")

    @needs_cuda
    @pytest.mark.parametrize("layer_device", ["cuda:0", "cpu"])
    def test_same_process_writes_the_cache_directly(layer_device: str) -> None:
        check_same_process(layer_device)

    @needs_cuda
    def test_cancel_is_acknowledged_while_the_sender_is_busy() -> None:
        check_cancel_acknowledged_while_sender_busy()

    @pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
    def test_sender_exit_state_from_proc() -> None:
        check_exit_state()

    @needs_cuda
    def test_handshake_mismatch_names_the_field_on_both_sides() -> None:
        check_handshake_mismatch()

    @needs_cuda
    def test_sender_killed_mid_transfer_fails_fast() -> None:
        check_sender_killed_mid_transfer()

    @pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only refusal")
    def test_without_cuda_the_backend_refuses_to_start() -> None:
        check_no_cuda_refused()


def main() -> int:
    """Plain runner for hosts without pytest."""
    checks = [("no cuda refused", check_no_cuda_refused, not HAS_CUDA),
              ("round trip cuda:0", lambda: check_round_trip("cuda:0"), HAS_CUDA),
              ("round trip cuda:0 -> cuda:1", lambda: check_round_trip("cuda:1"), TWO_GPUS),
              ("same process, GPU layers", lambda: check_same_process("cuda:0"), HAS_CUDA),
              ("same process, CPU layers", lambda: check_same_process("cpu"), HAS_CUDA),
              ("cancel while sender busy", check_cancel_acknowledged_while_sender_busy, HAS_CUDA),
              ("sender exit state", check_exit_state, os.path.isdir("/proc/self/task")),
              ("handshake mismatch", check_handshake_mismatch, HAS_CUDA),
              ("sender killed", check_sender_killed_mid_transfer, HAS_CUDA)]
    failed = 0
    for name, check, enabled in checks:
        if not enabled:
            print(f"SKIP {name}")
            continue
        start = time.monotonic()
        try:
            check()
            print(f"PASS {name} ({time.monotonic() - start:.2f}s)")
        except Exception as exc:  # report every check, then fail
            failed += 1
            print(f"FAIL {name}: {exc!r}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
