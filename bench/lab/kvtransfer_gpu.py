"""KV transfer benchmark on GPUs: the cuda_ipc backend against a plain device copy, in one run.

Payload: the KV of a ``--tokens``-token prompt (default 4096) of a Llama-3-8B-shaped model (32
layers, 8 KV heads, head dim 128, bf16: 128 KiB per token, 512 MiB at 4096 tokens), generated
on the GPU from a seed in both processes. Measured in the same run, best of ``--repeats``:

- ``device copy``: the same layer tensors copied into one preallocated buffer on cuda:0 (the
  ceiling for moving these bytes once on that GPU);
- ``scatter only``: the receiver's own work in one process, ``index_copy_`` of every layer into a
  paged cache (block size 16, shuffled blocks);
- ``cuda_ipc``: a real prefill process (child) ``sender.send(...)``\\s its GPU layers to a
  receiver in this process; the sender scatters every layer straight into the receiver's paged
  cache on cuda:0 (shared once over CUDA IPC). The time is the sender's ``send()`` (connect,
  handshake and grant, every layer, the final stream sync, until the receiver's DONE); the data
  is checked after every run; ``(1st)`` is the first transfer, which also opens the receiver's
  cache handle in the sender process (later transfers reuse the mapping);
- ``cuda_ipc 1 process``: the same with the sender in this process (one CUDA context, the
  cache written directly): the protocol's cost without two processes sharing one GPU;
- with two GPUs, ``peer copy`` cuda:0 -> cuda:1 and ``cuda_ipc -> cuda:1`` the same way.

Prints one table with GB/s and the ratio to the device copy (``vs peer copy`` for cross-GPU).
``python -m splitserve.bench.lab.kvtransfer_gpu [--tokens 4096] [--repeats 5] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from splitserve.bench.lab.child import LineChild
from splitserve.kvtransfer import KVSpec, create_receiver, create_sender
from splitserve.kvtransfer.layout import gather_layer, token_slots

LAYERS, HEADS, DIM, BLOCK = 32, 8, 128, 16
DTYPE = "bfloat16"

# The prefill side: builds the same layers from the same seed, sends on each "rid endpoint" line.
CHILD = r"""
import json, sys, torch
from splitserve.kvtransfer import KVSpec, create_sender
spec = KVSpec(**json.loads(sys.argv[1]))
tokens = int(sys.argv[2])
from splitserve.bench.lab.kvtransfer_gpu import make_kv
kv = make_kv(tokens, "cuda:0")
torch.cuda.synchronize()
print("READY", flush=True)
with create_sender("cuda_ipc", spec, device="cuda:0") as tx:
    for line in sys.stdin:
        rid, endpoint = line.split()
        res = tx.send(rid, endpoint, iter(kv), 1, num_tokens=tokens)
        print(json.dumps({"seconds": res.seconds, "bytes": res.bytes}), flush=True)
"""


def make_kv(tokens: int, device: str) -> list[torch.Tensor]:
    """Prefill-shaped layers (2, T, H, D), identical in every process on the same GPU type."""
    gen = torch.Generator(device).manual_seed(0)
    return [torch.randn(2, tokens, HEADS, DIM, device=device, generator=gen).to(torch.bfloat16)
            for _ in range(LAYERS)]


def timed(fn: Callable[[], None], devices: list[str]) -> float:
    """Wall seconds of ``fn`` with every device idle before and after."""
    for dev in devices:
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    fn()
    for dev in devices:
        torch.cuda.synchronize(dev)
    return time.perf_counter() - start


def device_copy(kv: list[torch.Tensor], dst: torch.Tensor) -> None:
    """Every layer's bytes into consecutive slices of ``dst`` (one copy kernel / DMA each)."""
    n = kv[0].numel() * kv[0].element_size()
    for i, tensor in enumerate(kv):
        dst[i * n : (i + 1) * n].copy_(tensor.reshape(-1).view(torch.uint8), non_blocking=True)


class IpcPath:
    """A receiver on ``device`` and a sender child on cuda:0, kept for all repeats."""

    def __init__(self, tokens: int, device: str, kv: list[torch.Tensor]) -> None:
        self.tokens, self.kv = tokens, kv
        self.spec = KVSpec("bench", DTYPE, LAYERS, HEADS, DIM, BLOCK, backend="cuda_ipc")
        self.blocks = -(-tokens // BLOCK) * 2
        self.cache = torch.zeros(LAYERS, 2, self.blocks, BLOCK, HEADS, DIM, dtype=torch.bfloat16,
                                 device=device)
        self.rx = create_receiver("cuda_ipc", self.spec, self.cache)
        self.child = LineChild(CHILD, json.dumps(self.spec.to_dict()), str(tokens), what="sender")
        try:
            ready = self.child.read().strip() == "READY"
        except RuntimeError:
            ready = False
        if not ready:
            self.close()
            raise RuntimeError("the sender process did not start")
        self.count = 0

    def seconds(self) -> float:
        self.count += 1
        rid = f"bench-{self.count}"
        table = torch.randperm(self.blocks)[: -(-self.tokens // BLOCK)].tolist()
        fut = self.rx.expect(rid, self.tokens, table, timeout=120)
        self.child.send(f"{rid} {self.rx.endpoint}")
        line = self.child.read()
        fut.result(timeout=120)
        self.verify(table)
        return json.loads(line)["seconds"]

    def verify(self, table: list[int]) -> None:
        """The first and last layers arrived bit-exact in the shuffled blocks."""
        slots = token_slots(table, self.tokens, BLOCK, self.blocks).to(self.cache.device)
        for layer in (0, LAYERS - 1):
            got = gather_layer(self.cache, layer, slots)
            if not torch.equal(got.cpu(), self.kv[layer].cpu()):
                raise RuntimeError(f"cuda_ipc: layer {layer} arrived corrupted")

    def close(self) -> None:
        self.child.close()
        self.rx.close()


class InProcessPath(IpcPath):
    """Sender and receiver in this process (one CUDA context, the ring used directly): the
    protocol's own cost on one GPU, without two processes time-slicing that GPU."""

    def __init__(self, tokens: int, device: str, kv: list[torch.Tensor]) -> None:
        self.tokens, self.kv, self.count = tokens, kv, 0
        self.spec = KVSpec("bench", DTYPE, LAYERS, HEADS, DIM, BLOCK, backend="cuda_ipc")
        self.blocks = -(-tokens // BLOCK) * 2
        self.cache = torch.zeros(LAYERS, 2, self.blocks, BLOCK, HEADS, DIM, dtype=torch.bfloat16,
                                 device=device)
        self.rx = create_receiver("cuda_ipc", self.spec, self.cache)
        self.tx = create_sender("cuda_ipc", self.spec, device="cuda:0")

    def seconds(self) -> float:
        self.count += 1
        rid = f"local-{self.count}"
        table = torch.randperm(self.blocks)[: -(-self.tokens // BLOCK)].tolist()
        fut = self.rx.expect(rid, self.tokens, table, timeout=120)
        result = self.tx.send(rid, self.rx.endpoint, iter(self.kv), 1, num_tokens=self.tokens)
        fut.result(timeout=120)
        self.verify(table)
        return result.seconds

    def close(self) -> None:
        self.tx.close()
        self.rx.close()


def run(tokens: int, repeats: int) -> list[dict]:
    kv = make_kv(tokens, "cuda:0")
    total = sum(t.numel() * t.element_size() for t in kv)
    two = torch.cuda.device_count() >= 2
    dst0 = torch.empty(total, dtype=torch.uint8, device="cuda:0")
    dst1 = torch.empty(total, dtype=torch.uint8, device="cuda:1") if two else None
    blocks = -(-tokens // BLOCK) * 2
    cache = torch.zeros(LAYERS, 2, blocks, BLOCK, HEADS, DIM, dtype=torch.bfloat16, device="cuda:0")
    slots = token_slots(torch.randperm(blocks).tolist(), tokens, BLOCK, blocks).to("cuda:0")

    def scatter() -> None:
        flat = cache.view(LAYERS, 2, blocks * BLOCK, HEADS, DIM)
        for layer, tensor in enumerate(kv):
            flat[layer].index_copy_(1, slots, tensor)

    paths = {"cuda_ipc": IpcPath(tokens, "cuda:0", kv),
             "cuda_ipc 1 process": InProcessPath(tokens, "cuda:0", kv)}
    if two:
        paths["cuda_ipc -> cuda:1"] = IpcPath(tokens, "cuda:1", kv)
    runs: dict[str, list[float]] = {}
    try:
        for i in range(repeats + 1):  # the first round warms up (allocator, IPC, kernels)
            timings = {"device copy": timed(lambda: device_copy(kv, dst0), ["cuda:0"]),
                       "scatter only": timed(scatter, ["cuda:0"])}
            if two:
                timings["peer copy"] = timed(lambda: device_copy(kv, dst1), ["cuda:0", "cuda:1"])
            for name, path in paths.items():
                timings[name] = path.seconds()
            if i:
                for name, seconds in timings.items():
                    runs.setdefault(name, []).append(seconds)
            else:  # a sender's first transfer also allocates and opens its ring
                for name in paths:
                    runs[f"{name} (1st)"] = [timings[name]]
    finally:
        for path in paths.values():
            path.close()
    rows = []
    runs = dict(sorted(runs.items(), key=lambda kv: kv[0].endswith("(1st)")))
    for name, seconds in runs.items():
        base = runs["peer copy" if "cuda:1" in name or name == "peer copy" else "device copy"]
        best = min(seconds)
        rows.append({"path": name, "seconds": best, "median_seconds": statistics.median(seconds),
                     "bytes": total, "gb_per_s": total / best / 1e9,
                     "vs_copy": min(base) / best})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="prompt tokens (default 4096)")
    parser.add_argument("--repeats", type=int, default=5, help="best of N (default 5)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kvtransfer_gpu: no CUDA device; nothing to measure", file=sys.stderr)
        return 2
    rows = run(args.tokens, args.repeats)
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    print(f"# {args.tokens} tokens, {rows[0]['bytes'] / 2**20:.0f} MiB, GPUs: {names}, "
          f"torch {torch.__version__}, best of {args.repeats}")
    print(f"{'path':<22}{'ms':>9}{'median ms':>11}{'GB/s':>9}{'vs copy':>9}")
    for row in rows:
        print(f"{row['path']:<22}{row['seconds'] * 1e3:>9.2f}{row['median_seconds'] * 1e3:>11.2f}"
              f"{row['gb_per_s']:>9.1f}{row['vs_copy']:>9.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"tokens": args.tokens, "gpus": names, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
