"""NIXL backend benchmark: bytes per second of ``nixl`` against ``tcp`` and against a plain NIXL
WRITE of the same bytes (the ceiling: what NIXL itself moves with nothing of ours around it).

Payload as ``bench/lab/kvtransfer.py``: the KV of a ``--tokens``-token prompt of a Llama-3-8B-shaped
model (32 layers, 8 KV heads, head dim 128, bf16: 128 KiB per token). One sender and one receiver
per backend, made once and warmed up with one transfer (connection setup, registration), then
``--repeats`` transfers, alternating paths so background load hits all alike; best and median:

- ``tcp``, ``nixl``: ``sender.send(...)`` of prefill-shaped layer tensors until the receiver's
  future resolved, the data scattered into a paged cache (block size 16, shuffled blocks) and
  checked after the first transfer;
- ``nixl plain WRITE``: one NIXL WRITE of the whole payload from one registered buffer into one
  registered buffer of another agent, until the target holds its notification.

CPU (default): host memory, UCX over TCP on loopback (``--ucx-tls tcp``), both ends in this
process. GPU: ``--device cuda --devices 0,1`` puts the sender's layers and staging on GPU 0 and
the receiver's cache on GPU 1, UCX_TLS ``cuda_ipc,cuda_copy,tcp`` (tcp still carries
notifications); the ``tcp`` path then stages through host memory as it does in production.

``python -m splitserve.bench.lab.kvtransfer_nixl [--tokens 2048] [--repeats 5] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time

import torch

DEFAULT_TLS = {"cpu": "tcp", "cuda": "cuda_ipc,cuda_copy,tcp"}


def _payload(tokens: int, device: torch.device) -> list[torch.Tensor]:
    from splitserve.bench.lab.kvtransfer import DIM, HEADS, LAYERS

    torch.manual_seed(0)
    return [torch.randn(2, tokens, HEADS, DIM).to(torch.bfloat16).to(device) for _ in range(LAYERS)]


class BackendPath:
    """A long-lived sender and receiver of one backend; :meth:`once` times one transfer."""

    def __init__(self, backend: str, tokens: int, kv: list[torch.Tensor], tx_device: torch.device,
                 rx_device: torch.device) -> None:
        from splitserve.bench.lab.kvtransfer import BLOCK, DIM, DTYPE, HEADS, LAYERS
        from splitserve.kvtransfer import KVSpec, create_receiver, create_sender

        spec = KVSpec("bench", DTYPE, LAYERS, HEADS, DIM, BLOCK, backend=backend)
        self.blocks = -(-tokens // BLOCK)
        cache = torch.zeros(LAYERS, 2, self.blocks, BLOCK, HEADS, DIM, dtype=torch.bfloat16,
                            device=rx_device)
        self.cache, self.kv, self.tokens, self.block = cache, kv, tokens, BLOCK
        self.table = torch.randperm(self.blocks).tolist()
        self.rx = create_receiver(backend, spec, cache)
        extra = {"device": tx_device} if backend == "nixl" else {}
        self.tx = create_sender(backend, spec, **extra)
        self.count = 0
        self.once()
        self.check()

    def once(self) -> float:
        self.count += 1
        rid = f"r{self.count}"
        fut = self.rx.expect(rid, self.tokens, self.table, timeout=120)
        start = time.perf_counter()
        self.tx.send(rid, self.rx.endpoint, iter(self.kv), 1, num_tokens=self.tokens)
        fut.result(timeout=120)
        return time.perf_counter() - start

    def check(self) -> None:
        from splitserve.kvtransfer.layout import gather_layer, token_slots

        slots = token_slots(self.table, self.tokens, self.block, self.blocks)
        for layer in (0, len(self.kv) - 1):
            got = gather_layer(self.cache, layer, slots).to(self.kv[layer].device)
            if not torch.equal(got, self.kv[layer]):
                raise RuntimeError(f"layer {layer} arrived corrupted")

    def close(self) -> None:
        self.tx.close()
        self.rx.close()


class PlainWrite:
    """The ceiling: one NIXL WRITE of the payload between two agents of this process."""

    def __init__(self, nbytes: int, tx_device: torch.device, rx_device: torch.device) -> None:
        from splitserve.kvtransfer.nixl import make_agent

        self.src_agent, self.dst_agent = make_agent("bench-tx"), make_agent("bench-rx")
        self.src = torch.ones(nbytes, dtype=torch.uint8, device=tx_device)
        self.dst = torch.zeros(nbytes, dtype=torch.uint8, device=rx_device)
        self.regs = [self.src_agent.register_memory(self.src),
                     self.dst_agent.register_memory(self.dst)]
        self.remote = self.src_agent.add_remote_agent(self.dst_agent.get_agent_metadata())
        self.count = 0
        self.once()

    def once(self) -> float:
        self.count += 1
        tag = f"plain:{self.count}".encode()
        arrived = threading.Event()

        def target() -> None:  # the target progresses (UCX over TCP lands bytes there)
            while not arrived.is_set():
                for messages in self.dst_agent.get_new_notifs().values():
                    if tag in messages:
                        arrived.set()

        progress = threading.Thread(target=target, daemon=True)
        progress.start()
        start = time.perf_counter()
        xfer = self.src_agent.initialize_xfer("WRITE", self.src_agent.get_xfer_descs(self.src),
                                              self.src_agent.get_xfer_descs(self.dst),
                                              self.remote, tag)
        state = self.src_agent.transfer(xfer)
        while state == "PROC":
            state = self.src_agent.check_xfer_state(xfer)
        if state != "DONE" or not arrived.wait(120):
            raise RuntimeError(f"plain NIXL WRITE failed ({state})")
        seconds = time.perf_counter() - start
        progress.join()
        self.src_agent.release_xfer_handle(xfer)
        return seconds

    def close(self) -> None:
        self.src_agent.remove_remote_agent(self.remote)
        self.src_agent.deregister_memory(self.regs[0])
        self.dst_agent.deregister_memory(self.regs[1])


def run(tokens: int, repeats: int, device: str, devices: tuple[int, int]) -> list[dict]:
    """Best and median seconds per path (paths alternate within each repeat)."""
    if device == "cuda":
        tx_dev, rx_dev = (torch.device("cuda", i) for i in devices)
    else:
        tx_dev = rx_dev = torch.device("cpu")
    kv = _payload(tokens, tx_dev)
    total = sum(t.numel() * t.element_size() for t in kv)
    paths = {"tcp": BackendPath("tcp", tokens, kv, tx_dev, rx_dev),
             "nixl": BackendPath("nixl", tokens, kv, tx_dev, rx_dev),
             "nixl plain WRITE": PlainWrite(total, tx_dev, rx_dev)}
    times: dict[str, list[float]] = {name: [] for name in paths}
    try:
        for _ in range(repeats):
            for name, path in paths.items():
                times[name].append(path.once())
    finally:
        for path in paths.values():
            path.close()
    ceiling = min(times["nixl plain WRITE"])
    return [{"path": name, "bytes": total, "best_s": min(t), "median_s": statistics.median(t),
             "gb_per_s": total / min(t) / 1e9, "median_gb_per_s": total / statistics.median(t) / 1e9,
             "vs_plain_nixl": ceiling / min(t)} for name, t in times.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="prompt tokens (default 2048)")
    parser.add_argument("--repeats", type=int, default=5, help="timed transfers per path")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--devices", default="0,1", help="cuda: sender GPU, receiver GPU")
    parser.add_argument("--ucx-tls", help="UCX_TLS (default: tcp on cpu, "
                        "cuda_ipc,cuda_copy,tcp on cuda); an existing UCX_TLS wins")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    os.environ.setdefault("UCX_TLS", args.ucx_tls or DEFAULT_TLS[args.device])
    a, _, b = args.devices.partition(",")
    rows = run(args.tokens, args.repeats, args.device, (int(a), int(b or a)))
    print(f"{args.tokens} tokens, {rows[0]['bytes'] / 2**20:.0f} MiB, {args.device}, "
          f"UCX_TLS={os.environ['UCX_TLS']}, {os.cpu_count()} CPUs ({platform.machine()})")
    print(f"{'path':<18} {'best GB/s':>10} {'median GB/s':>12} {'vs plain NIXL':>14}")
    for row in rows:
        print(f"{row['path']:<18} {row['gb_per_s']:>10.2f} {row['median_gb_per_s']:>12.2f} "
              f"{row['vs_plain_nixl']:>14.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": args.device, "ucx_tls": os.environ["UCX_TLS"], "rows": rows},
                      fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
