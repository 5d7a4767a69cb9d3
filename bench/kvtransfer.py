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
``python -m splitserve.bench.kvtransfer [--tokens 2048] [--repeats 3] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import threading
import time

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
            if backend == "cuda_ipc":  # GPU to GPU: bench/kvtransfer_gpu.py
                continue
            timings[backend] = backend_seconds(backend, tokens, kv, f"r{i}")
        for streams in extra_streams:
            timings[f"tcp x{streams}"] = backend_seconds("tcp", tokens, kv, f"s{i}", streams)
        for path, seconds in timings.items():
            best[path] = min(seconds, best.get(path, seconds))
    base = best["socket copy"]
    return [{"path": path, "seconds": seconds, "bytes": total, "gb_per_s": total / seconds / 1e9,
             "vs_socket_copy": base / seconds} for path, seconds in best.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="prompt tokens (default 2048)")
    parser.add_argument("--repeats", type=int, default=3, help="best of N (default 3)")
    parser.add_argument("--streams", type=int, nargs="*", default=[4],
                        help="also run TCP over this many parallel connections (default 4)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.repeats < 1:
        parser.error("--tokens and --repeats must be >= 1")
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
