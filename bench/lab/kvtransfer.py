"""KV transfer benchmark (CPU, loopback): each backend against a plain socket copy, in one run.

Payload: the KV of a ``--tokens``-token prompt of a Llama-3-8B-shaped model (32 layers, 8 KV
heads, head dim 128, bf16: 128 KiB per token). Measured in the same process, same run:
- ``socket copy``: one thread ``sendall``\\s the same layer tensors' bytes to another that
  ``recv_into``\\s one preallocated payload-sized buffer: the ceiling for any TCP transfer here
  (``(hot buffer)``: the same into one reused layer-sized buffer, cache-hot, for reference);
- each registered backend end to end: ``sender.send(...)`` from prefill-shaped layer tensors
  until the receiver's future resolved, data scattered into a paged cache (block size 16,
  shuffled blocks) and verified afterwards.
- ``tcp xN``: the TCP backend with the layers spread over N connections (``--streams``).
Prints one table with GB/s and the ratio to the socket copy (best of ``--repeats``).
``python -m splitserve.bench.lab.kvtransfer [--tokens 2048] [--repeats 3] [--json PATH]``.

``--latency``: the fixed cost instead of the bandwidth, as a decode request's TTFT sees it. The
receiver runs in a second process (the real deployment: two interpreters, two GILs), one
long-lived sender and receiver, ``--transfers`` back-to-back transfers of a ``--latency-tokens``
prompt (default 1 token, 4 KiB per layer) with 1 and 32 layers; per transfer the median, p90 and
min of ``send()`` (which returns after the receiver's DONE, so the decode side has the KV).
``python -m splitserve.bench.lab.kvtransfer --latency [--transfers 300] [--backends tcp,shm]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import statistics
import threading
import time
from multiprocessing.connection import Connection

import torch
from splitserve.kvtransfer import KVSpec, available_backends, create_receiver, create_sender
from splitserve.kvtransfer.layout import gather_layer, token_slots
from splitserve.kvtransfer.wire import tensor_bytes

LAYERS, HEADS, DIM, BLOCK = 32, 8, 128, 16
DTYPE = "bfloat16"


def socket_copy_seconds(kv: list[torch.Tensor], hot: bool = False) -> float:
    """Seconds for a plain loopback socket to move the bytes of ``kv`` (the same tensors the
    backends send) into one preallocated, already-mapped buffer of the payload's size; with
    ``hot``, into one layer-sized buffer reused for every layer (stays in the CPU caches: an
    upper bound no real receiver reaches, shown for reference)."""
    server = socket.create_server(("127.0.0.1", 0))
    total = sum(t.numel() * t.element_size() for t in kv)
    layer = kv[0].numel() * kv[0].element_size()
    dst = memoryview(bytearray(layer if hot else total))  # zero-filled: pages already mapped

    def receive() -> None:
        conn, _ = server.accept()
        with conn:
            left = total
            while left:
                view = dst[: min(left, dst.nbytes)]
                left -= view.nbytes
                while view.nbytes:
                    view = view[conn.recv_into(view):]
            conn.sendall(b"k")

    thread = threading.Thread(target=receive)
    thread.start()
    start = time.perf_counter()
    with socket.create_connection(server.getsockname()) as sock:
        for tensor in kv:
            sock.sendall(tensor_bytes(tensor))
        sock.recv(1)
    seconds = time.perf_counter() - start
    thread.join()
    server.close()
    return seconds


def backend_seconds(
    backend: str, tokens: int, kv: list[torch.Tensor], rid: str, streams: int = 1
) -> float:
    """Seconds for one end-to-end transfer of ``kv`` through ``backend`` (over ``streams``
    connections); checks the data."""
    spec = KVSpec("bench", DTYPE, LAYERS, HEADS, DIM, BLOCK, backend=backend)
    blocks = -(-tokens // BLOCK)
    # zeros, not empty: a decode worker's cache is long-lived, its pages are already mapped
    cache = torch.zeros(LAYERS, 2, blocks, BLOCK, HEADS, DIM, dtype=torch.bfloat16)
    table = torch.randperm(blocks).tolist()
    extra = {"streams": streams, "min_stream_bytes": 0} if streams > 1 else {}
    with create_receiver(backend, spec, cache) as rx, create_sender(backend, spec, **extra) as tx:
        fut = rx.expect(rid, tokens, table, timeout=120)
        start = time.perf_counter()
        tx.send(rid, rx.endpoint, iter(kv), 1, num_tokens=tokens)
        fut.result(timeout=120)
        seconds = time.perf_counter() - start
        slots = token_slots(table, tokens, BLOCK, blocks)
        for layer in (0, LAYERS - 1):
            if not torch.equal(gather_layer(cache, layer, slots), kv[layer]):
                raise RuntimeError(f"{backend}: layer {layer} arrived corrupted")
    return seconds


def run(tokens: int, repeats: int, extra_streams: tuple[int, ...] = ()) -> list[dict]:
    """Best of ``repeats`` for each path; the paths alternate within a repeat, so background
    load on the machine hits all of them alike."""
    torch.manual_seed(0)
    kv = [torch.randn(2, tokens, HEADS, DIM).to(torch.bfloat16) for _ in range(LAYERS)]
    total = sum(t.numel() * t.element_size() for t in kv)
    best: dict[str, float] = {}
    for i in range(repeats):
        timings = {"socket copy": socket_copy_seconds(kv),
                   "(hot buffer)": socket_copy_seconds(kv, hot=True)}
        for backend in available_backends():
            if backend in ("cuda_ipc", "nixl", "auto"):  # bench/lab/kvtransfer_gpu.py,
                continue  # kvtransfer_nixl.py; auto is one of the others after one OFFER
            timings[backend] = backend_seconds(backend, tokens, kv, f"r{i}")
        for streams in extra_streams:
            timings[f"tcp x{streams}"] = backend_seconds("tcp", tokens, kv, f"s{i}", streams)
        for path, seconds in timings.items():
            best[path] = min(seconds, best.get(path, seconds))
    base = best["socket copy"]
    return [{"path": path, "seconds": seconds, "bytes": total, "gb_per_s": total / seconds / 1e9,
             "vs_socket_copy": base / seconds} for path, seconds in best.items()]


LATENCY_WARMUP = 10  # first transfers left out: connection setup, lazy imports, page faults


def _latency_spec(backend: str, layers: int) -> KVSpec:
    return KVSpec("bench", DTYPE, layers, HEADS, DIM, BLOCK, backend=backend)


def _latency_receiver(
    backend: str, layers: int, tokens: int, count: int, pipe: Connection
) -> None:
    """Child process: one receiver expecting ``count`` transfers (all registered up front, so
    the sender never waits for expect()); sends its endpoint, then "ok" or the first error."""
    blocks = -(-tokens // BLOCK)
    cache = torch.zeros(layers, 2, blocks + 1, BLOCK, HEADS, DIM, dtype=torch.bfloat16)
    with create_receiver(backend, _latency_spec(backend, layers), cache) as rx:
        futures = [rx.expect(f"r{i}", tokens, list(range(blocks)), timeout=300)
                   for i in range(count)]
        pipe.send(rx.endpoint)
        try:
            for future in futures:
                future.result(timeout=300)
        except Exception as exc:  # reported to the parent, which raises it
            pipe.send(repr(exc))
            return
    pipe.send("ok")


def latency_seconds(backend: str, layers: int, tokens: int, transfers: int) -> list[float]:
    """Seconds of each of ``transfers`` back-to-back ``send()`` calls to a receiver in another
    process (after ``LATENCY_WARMUP`` transfers that are not counted)."""
    count = transfers + LATENCY_WARMUP
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that has torch threads
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_latency_receiver, args=(backend, layers, tokens, count, child),
                       daemon=True)
    proc.start()
    try:
        if not parent.poll(120):
            raise RuntimeError(f"{backend} receiver process did not start")
        endpoint = parent.recv()
        torch.manual_seed(0)
        kv = [torch.randn(2, tokens, HEADS, DIM).to(torch.bfloat16) for _ in range(layers)]
        times: list[float] = []
        with create_sender(backend, _latency_spec(backend, layers)) as tx:
            for i in range(count):
                start = time.perf_counter()
                tx.send(f"r{i}", endpoint, iter(kv), 1, num_tokens=tokens)
                times.append(time.perf_counter() - start)
        status = parent.recv() if parent.poll(60) else "no answer within 60 s"
        if status != "ok":
            raise RuntimeError(f"{backend} receiver failed: {status}")
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
    return times[LATENCY_WARMUP:]


def run_latency(backends: list[str], tokens: int, transfers: int) -> list[dict]:
    """Per backend and layer count (1, then LAYERS): median, p90 and min ms per transfer."""
    rows = []
    for backend in backends:
        for layers in (1, LAYERS):
            times = sorted(latency_seconds(backend, layers, tokens, transfers))
            rows.append({"backend": backend, "layers": layers, "tokens": tokens,
                         "transfers": len(times),
                         "median_ms": statistics.median(times) * 1e3,
                         "p90_ms": times[int(0.9 * (len(times) - 1))] * 1e3,
                         "min_ms": times[0] * 1e3})
    return rows


def print_latency(rows: list[dict]) -> None:
    tokens = rows[0]["tokens"]
    print(f"KV transfer latency, {tokens}-token prompt ({HEADS} KV heads x {DIM}, bf16: "
          f"{_latency_spec('tcp', 1).layer_nbytes(tokens)} B per layer), receiver in another "
          f"process, {rows[0]['transfers']} back-to-back transfers; {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}")
    print(f"{'backend':<9}{'layers':>7}{'median ms':>11}{'p90 ms':>9}{'min ms':>9}")
    for row in rows:
        print(f"{row['backend']:<9}{row['layers']:>7}{row['median_ms']:>11.3f}"
              f"{row['p90_ms']:>9.3f}{row['min_ms']:>9.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="prompt tokens (default 2048)")
    parser.add_argument("--repeats", type=int, default=3, help="best of N (default 3)")
    parser.add_argument("--streams", type=int, nargs="*", default=[4],
                        help="also run TCP over this many parallel connections (default 4)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--latency", action="store_true",
                        help="measure per-transfer latency (two processes) instead of bandwidth")
    parser.add_argument("--transfers", type=int, default=300,
                        help="--latency: back-to-back transfers per row (default 300)")
    parser.add_argument("--latency-tokens", type=int, default=1,
                        help="--latency: prompt tokens (default 1)")
    parser.add_argument("--backends", default="tcp,shm",
                        help="--latency: comma-separated backends (default tcp,shm)")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.repeats < 1:
        parser.error("--tokens and --repeats must be >= 1")
    if args.latency:
        backends = [b for b in args.backends.split(",") if b]
        unknown = set(backends) - set(available_backends())
        if unknown or args.transfers < 1 or args.latency_tokens < 1:
            parser.error(f"bad --backends {sorted(unknown)} or --transfers/--latency-tokens < 1")
        rows = run_latency(backends, args.latency_tokens, args.transfers)
        print_latency(rows)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"latency": rows}, fh, indent=2)
        return 0
    rows = run(args.tokens, args.repeats, tuple(n for n in args.streams if n > 1))
    mib = rows[0]["bytes"] / 2**20
    print(f"KV of {args.tokens} tokens, Llama-3-8B shape, bf16: {mib:.0f} MiB; "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, best of {args.repeats}")
    print(f"{'path':<14}{'seconds':>10}{'GB/s':>8}{'vs socket copy':>16}")
    for row in rows:
        print(f"{row['path']:<14}{row['seconds']:>10.3f}{row['gb_per_s']:>8.2f}"
              f"{row['vs_socket_copy']:>15.0%}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"tokens": args.tokens, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
