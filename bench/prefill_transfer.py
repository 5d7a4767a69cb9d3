"""Prefill with layer-wise KV streaming: how much the transfer adds to time to first token.

One process, one GPU: a prefill engine (Llama-3-8B shape, random weights, bf16) computes a prompt
while its KV streams layer by layer over the TCP backend (loopback) into a second paged cache (the
decode side's), exactly as the prefill worker does. Reported per prompt length: prefill alone,
prefill + streamed transfer until the receiver has the last layer, and the added fraction; the
received KV is checked to equal the source. Usage: python -m splitserve.bench.prefill_transfer
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import queue
import random
import tempfile
import time
import uuid
from pathlib import Path

import torch
from splitserve.bench.engine import LLAMA3_8B, make_engine
from splitserve.kvtransfer.layout import iter_cache_layers


def run_once(engine, receiver, sender, n: int, rng: random.Random, stream: bool):
    from splitserve.engine.sampling import SamplingParams
    from splitserve.engine.sequence import Sequence

    vocab = engine.runner.model_config.vocab_size
    seq = Sequence("p", [rng.randrange(vocab) for _ in range(n)], SamplingParams(max_tokens=1, temperature=0),
                   prefill_only=True)
    layers: queue.Queue = queue.Queue()
    num_layers = engine.runner.model_config.num_layers
    dest_blocks = list(range(-(-n // 16)))
    rid = uuid.uuid4().hex
    fut = send = None
    if stream:
        seq.on_layer_kv = lambda layer, kv: layers.put(kv)
        fut = receiver.expect(rid, n, dest_blocks, timeout=120)
        pool = concurrent.futures.ThreadPoolExecutor(1)
        send = pool.submit(sender.send, rid, receiver.endpoint, (layers.get() for _ in range(num_layers)),
                           lambda: 0, {}, num_tokens=n)
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.add(seq)
    engine.step()
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - start
    total_s = prefill_s
    ok = None
    if stream:
        send.result(timeout=120)
        fut.result(timeout=120)
        total_s = time.perf_counter() - start
        src = torch.stack(list(iter_cache_layers(engine.runner.kv_cache, seq.block_table, n)))
        got = torch.stack(list(iter_cache_layers(receiver.kv_cache, dest_blocks, n)))
        ok = bool(torch.equal(src, got))
    engine.release(seq)
    return prefill_s, total_s, ok


def main() -> None:
    from splitserve.engine.handshake import kv_spec
    from splitserve.kvtransfer import create_receiver, create_sender

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    tmp = tempfile.mkdtemp()
    (Path(tmp) / "config.json").write_text(json.dumps(LLAMA3_8B))
    engine = make_engine(tmp, 1, max(lengths) + 16, 2 * (max(lengths) // 16 + 2))
    spec = kv_spec(engine, "tcp", "bench")
    src_shape = engine.runner.kv_cache.shape
    dest = torch.zeros(src_shape[0], 2, max(lengths) // 16 + 2, *src_shape[3:], dtype=engine.runner.dtype, device="cuda")
    receiver = create_receiver("tcp", spec, dest, host="127.0.0.1", port=0, staged=True)
    sender = create_sender("tcp", spec)
    rng = random.Random(0)
    rows = []
    try:
        for n in lengths:
            run_once(engine, receiver, sender, n, rng, stream=False)  # warm up
            alone = min(run_once(engine, receiver, sender, n, rng, stream=False)[0] for _ in range(3))
            streamed = [run_once(engine, receiver, sender, n, rng, stream=True) for _ in range(3)]
            total = min(t for _, t, _ in streamed)
            mib = n * engine.runner.bytes_per_block / engine.runner.block_size / 2**20
            rows.append({"tokens": n, "kv_mib": mib, "prefill_ms": alone * 1e3, "prefill_plus_transfer_ms": total * 1e3,
                         "added_fraction": total / alone - 1, "kv_equal": all(ok for _, _, ok in streamed)})
    finally:
        sender.close()
        receiver.close()
    print(f"device: {torch.cuda.get_device_name()}  backend tcp (loopback, staged through host memory)")
    print(f"{'tokens':>6} {'KV MiB':>7} {'prefill ms':>11} {'+transfer ms':>13} {'added':>7} {'KV equal':>8}")
    for r in rows:
        print(f"{r['tokens']:>6} {r['kv_mib']:>7.0f} {r['prefill_ms']:>11.1f} {r['prefill_plus_transfer_ms']:>13.1f} "
              f"{100 * r['added_fraction']:>6.0f}% {str(r['kv_equal']):>8}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
