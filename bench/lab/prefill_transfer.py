"""Prefill with layer-wise KV streaming: how much the transfer adds to time to first token.

One GPU, two processes: this process runs a prefill engine (Llama-3-8B shape, random weights,
bf16) and computes a prompt while its KV streams layer by layer to a decode-side receiver in a
child process (its paged cache on the same GPU), exactly as the prefill worker does: the sender
handshakes before the forward pass and gets layer i right after layer i's attention wrote it.
Reported per backend and prompt length: prefill alone, prefill + streamed transfer until the
receiver has every layer (the sender's DONE), and the added fraction; the received KV is
checked against the source by per-layer digests. Usage::

    python -m splitserve.bench.lab.prefill_transfer --backend tcp,cuda_ipc --lengths 1024,4096
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import queue
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from splitserve.bench.engine import LLAMA3_8B, make_engine
from splitserve.bench.lab.child import LineChild
from splitserve.kvtransfer.layout import gather_layer, token_slots

BLOCK = 16

# The decode side: a receiver on cuda:0 in its own process; one JSON job per stdin line.
CHILD = r"""
import json, sys
from splitserve.bench.lab.prefill_transfer import serve_receiver
serve_receiver(json.loads(sys.argv[1]), int(sys.argv[2]))
"""


def kv_digest(cache: torch.Tensor, blocks: list[int], num_tokens: int) -> list[int]:
    """One position-weighted integer sum of the raw bits per layer: equal digests mean equal
    bytes in order (with overwhelming probability), without shipping the KV between processes."""
    slots = token_slots(blocks, num_tokens, cache.shape[3], cache.shape[2]).to(cache.device)
    out = []
    for layer in range(cache.shape[0]):
        bits = gather_layer(cache, layer, slots).reshape(-1).view(torch.int16).to(torch.int64)
        weights = torch.arange(bits.numel(), device=bits.device) % 8191 + 1
        out.append(int((bits * weights).sum()))
    return out


def serve_receiver(spec_fields: dict[str, Any], num_blocks: int) -> None:
    """The child's loop: expect each job's request, report when registered, then its digest."""
    from splitserve.kvtransfer import KVSpec, TransferError, create_receiver

    spec = KVSpec.from_dict(spec_fields)
    cache = torch.zeros(spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads,
                        spec.head_dim, dtype=getattr(torch, spec.dtype), device="cuda")
    with create_receiver(spec.backend, spec, cache, host="127.0.0.1", port=0) as rx:
        print(json.dumps({"endpoint": rx.endpoint}), flush=True)
        for line in sys.stdin:
            job = json.loads(line)
            blocks = list(range(-(-job["tokens"] // spec.block_size)))
            fut = rx.expect(job["rid"], job["tokens"], blocks, timeout=120)
            print(json.dumps({"expected": job["rid"]}), flush=True)
            try:
                fut.result(timeout=150)
            except TransferError as err:
                print(json.dumps({"error": str(err)}), flush=True)
                continue
            print(json.dumps({"digest": kv_digest(cache, blocks, job["tokens"])}), flush=True)


class ReceiverProcess:
    """The decode side in a child process (its own CUDA context on the same GPU)."""

    def __init__(self, spec: Any, num_blocks: int) -> None:
        self.child = LineChild(CHILD, json.dumps(spec.to_dict()), str(num_blocks), what="receiver")
        self.endpoint = self._read()["endpoint"]

    def expect(self, rid: str, num_tokens: int) -> None:
        self.child.send(json.dumps({"rid": rid, "tokens": num_tokens}))
        self._read()

    def digest(self) -> list[int]:
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"receiver: {reply['error']}")
        return reply["digest"]

    def close(self) -> None:
        self.child.close()

    def _read(self) -> dict[str, Any]:
        return json.loads(self.child.read())


def run_once(engine, receiver: ReceiverProcess | None, sender, n: int, rng: random.Random
             ) -> tuple[float, float, bool | None]:
    """(prefill seconds, prefill + transfer seconds, KV equal) for one prompt of ``n`` tokens;
    without a receiver, prefill alone."""
    from splitserve.engine.sampling import SamplingParams
    from splitserve.engine.sequence import Sequence

    vocab = engine.runner.model_config.vocab_size
    seq = Sequence("p", [rng.randrange(vocab) for _ in range(n)],
                   SamplingParams(max_tokens=1, temperature=0), prefill_only=True)
    layers: queue.Queue = queue.Queue()
    num_layers = engine.runner.model_config.num_layers
    send = None
    if receiver is not None:
        rid = uuid.uuid4().hex
        receiver.expect(rid, n)
        seq.on_layer_kv = lambda layer, kv: layers.put(kv)
        pool = concurrent.futures.ThreadPoolExecutor(1)
        send = pool.submit(sender.send, rid, receiver.endpoint,
                           (layers.get() for _ in range(num_layers)), lambda: 0, {},
                           num_tokens=n)
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.add(seq)
    engine.step()
    torch.cuda.synchronize()
    prefill_s = total_s = time.perf_counter() - start
    ok = None
    if send is not None:
        send.result(timeout=150)  # DONE: the receiver has every layer
        total_s = time.perf_counter() - start
        pool.shutdown()
        ok = receiver.digest() == kv_digest(engine.runner.kv_cache, seq.block_table, n)
    engine.release(seq)
    return prefill_s, total_s, ok


def measure(engine, backend: str, lengths: list[int], repeats: int) -> list[dict[str, Any]]:
    from splitserve.engine.kv_spec import kv_spec
    from splitserve.kvtransfer import create_sender

    spec = kv_spec(engine, backend, "bench")
    receiver = ReceiverProcess(spec, -(-max(lengths) // spec.block_size) + 1)
    sender = create_sender(backend, spec)
    rng = random.Random(0)
    rows = []
    try:
        for n in lengths:
            run_once(engine, None, sender, n, rng)  # warm up (kernels, allocator)
            run_once(engine, receiver, sender, n, rng)  # and the connection's first use
            alone = min(run_once(engine, None, sender, n, rng)[0] for _ in range(repeats))
            streamed = [run_once(engine, receiver, sender, n, rng) for _ in range(repeats)]
            total = min(t for _, t, _ in streamed)
            mib = n * engine.runner.bytes_per_block / engine.runner.block_size / 2**20
            rows.append({"backend": backend, "tokens": n, "kv_mib": mib,
                         "prefill_ms": alone * 1e3, "prefill_plus_transfer_ms": total * 1e3,
                         "added_fraction": total / alone - 1,
                         "kv_equal": all(ok for _, _, ok in streamed)})
    finally:
        sender.close()
        receiver.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="tcp",
                    help="comma-separated KV backends (tcp, cuda_ipc; default tcp)")
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--repeats", type=int, default=3, help="best of N (default 3)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("prefill_transfer: no CUDA device; nothing to measure", file=sys.stderr)
        return 2
    lengths = [int(x) for x in args.lengths.split(",")]
    tmp = tempfile.mkdtemp()
    (Path(tmp) / "config.json").write_text(json.dumps(LLAMA3_8B))
    engine = make_engine(tmp, 1, max(lengths) + BLOCK, 2 * (max(lengths) // BLOCK + 2))
    rows = [row for backend in args.backend.split(",")
            for row in measure(engine, backend, lengths, args.repeats)]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; receiver in a "
          f"child process, its cache on the same GPU; best of {args.repeats}")
    print(f"{'backend':>9} {'tokens':>6} {'KV MiB':>7} {'prefill ms':>11} {'+transfer ms':>13} "
          f"{'added':>7} {'KV equal':>8}")
    for r in rows:
        print(f"{r['backend']:>9} {r['tokens']:>6} {r['kv_mib']:>7.0f} {r['prefill_ms']:>11.1f} "
              f"{r['prefill_plus_transfer_ms']:>13.1f} {100 * r['added_fraction']:>6.1f}% "
              f"{str(r['kv_equal']):>8}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
