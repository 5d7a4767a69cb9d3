"""Engine decode-step speed against the memory-bandwidth roofline and HF transformers.

Run on a GPU (bf16, Llama-3-8B shape with random weights: 32 layers, 32 query heads, 8 KV heads,
head dim 128). In one run it measures:
  * the device copy bandwidth (bytes read + written per second of a 2 GiB copy),
  * our decode step at each batch size, and its roofline: (weight bytes + KV bytes read) / bandwidth,
  * generate throughput (tokens/s) of our engine and of ``transformers`` ``generate`` on the same
    shape, batch, prompt and output lengths.
"step ms" is the engine's step with the host's work overlapped (the next step queued before the
previous step's tokens reach the host), "sync ms" the same step without overlap.
"roof %" counts every weight byte as the issue defines the roofline; "read roof %" counts the
bytes a step reads (the embedding table only for the batch's rows). "decode tok/s" is batch / step
time; HF's is the extra tokens of a 128-token generate over a 1-token one per extra second, so the
two decode columns compare decoding alone, without the prompt's prefill.
Usage: python bench/engine.py [--batches 1,32] [--prompt-len 512] [--new-tokens 128] [--no-hf]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
}


def copy_bandwidth(nbytes: int = 2 * 2**30, iters: int = 20) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * nbytes * iters / (time.perf_counter() - start)


def make_engine(model_dir: str, max_seqs: int, max_len: int, blocks: int):
    from splitserve.engine.config import RunnerConfig, SchedulerConfig
    from splitserve.engine.engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(
        RunnerConfig(model_dir, dtype="bfloat16", random_weights=True, num_kv_blocks=blocks,
                     max_model_len=max_len, max_num_seqs=max_seqs),
        SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max_seqs * max_len),
    ))


def decode_step_ms(engine, batch: int, prompt_len: int, steps: int, rng: random.Random) -> float:
    from splitserve.engine.sampling import SamplingParams
    from splitserve.engine.sequence import Sequence

    vocab = engine.runner.model_config.vocab_size
    params = SamplingParams(max_tokens=10**6, temperature=0, ignore_eos=True)
    seqs = [Sequence(f"b{i}", [rng.randrange(vocab) for _ in range(prompt_len)], params) for i in range(batch)]
    for s in seqs:
        engine.add(s)
    while engine.scheduler.waiting:
        engine.step()
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3 / steps
    for s in seqs:
        engine.abort(s)
    engine.flush()
    return ms


def graph_replay_ms(engine, batch: int, iters: int = 50) -> float:
    """GPU time of the captured decode step alone (no scheduling, input building or sampling):
    the gap to ``decode_step_ms`` is host overhead."""
    graphs = engine.runner.graphs
    bs = graphs.bucket(batch)
    graphs.graphs[bs].replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        graphs.graphs[bs].replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / iters


def engine_generate_tps(engine, batch: int, prompt_len: int, new_tokens: int, rng: random.Random) -> float:
    from splitserve.engine.sampling import SamplingParams

    vocab = engine.runner.model_config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.generate(prompts, params)
    torch.cuda.synchronize()
    return batch * new_tokens / (time.perf_counter() - start)


def hf_generate_tps(
    cfg: dict, batch: int, prompt_len: int, new_tokens: int, rng: random.Random
) -> tuple[float, float]:
    """HF ``generate`` tokens/s (prompt included in the time), and its decode-only tokens/s:
    the extra tokens of a ``new_tokens`` run over a 1-token run, per extra second."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")})
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.tensor([[rng.randrange(cfg["vocab_size"]) for _ in range(prompt_len)] for _ in range(batch)], device="cuda")
    model.generate(ids[:, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm up

    def timed(model, n: int) -> float:
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    full, first = timed(model, new_tokens), timed(model, 1)
    del model
    torch.cuda.empty_cache()
    return batch * new_tokens / full, batch * (new_tokens - 1) / (full - first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    rng = random.Random(0)
    batches = [int(b) for b in args.batches.split(",")]
    bw = copy_bandwidth()
    tmp = tempfile.mkdtemp()
    (Path(tmp) / "config.json").write_text(json.dumps(LLAMA3_8B))
    max_len = args.prompt_len + max(args.new_tokens, args.steps) + 64
    blocks = max(batches) * (-(-max_len // 16) + 1) + 64
    engine = make_engine(tmp, max(batches), max_len, blocks)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    kv_per_token = engine.runner.bytes_per_block // engine.runner.block_size
    # A decode step reads every weight once except the embedding table, of which it reads only
    # the batch's rows (unless the LM head shares it): the "read" roofline counts those bytes.
    model = engine.runner.model
    unread = 0 if model.lm_head.weight is model.embed_tokens.weight else (
        model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size())
    rows = []
    for b in batches:
        # the same step with the host waiting for each step's tokens before queuing the next:
        # the gap to the overlapped step is the host time that overlap hides
        engine.overlap = False
        sync_ms = decode_step_ms(engine, b, args.prompt_len, args.steps, rng)
        engine.overlap = True
        ms = decode_step_ms(engine, b, args.prompt_len, args.steps, rng)
        replay_ms = graph_replay_ms(engine, b)
        ctx = args.prompt_len + 3 + args.steps // 2
        roof_ms = (weight_bytes + b * ctx * kv_per_token) / bw * 1e3
        read_ms = roof_ms - unread / bw * 1e3
        ours_tps = engine_generate_tps(engine, b, args.prompt_len, args.new_tokens, rng)
        rows.append({"batch": b, "step_ms": ms, "sync_step_ms": sync_ms, "graph_replay_ms": replay_ms, "roofline_ms": roof_ms,
                     "roofline_fraction": roof_ms / ms, "read_roofline_ms": read_ms,
                     "read_roofline_fraction": read_ms / ms,
                     "ours_generate_tps": ours_tps, "ours_decode_tps": b / ms * 1e3})
    del engine
    torch.cuda.empty_cache()
    if not args.no_hf:
        for row in rows:
            row["hf_generate_tps"], row["hf_decode_tps"] = hf_generate_tps(
                LLAMA3_8B, row["batch"], args.prompt_len, args.new_tokens, rng)
            row["speedup_vs_hf"] = row["ours_generate_tps"] / row["hf_generate_tps"]
            row["decode_speedup_vs_hf"] = row["ours_decode_tps"] / row["hf_decode_tps"]
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth: {bw / 1e12:.2f} TB/s  "
          f"weights: {weight_bytes / 2**30:.1f} GiB  prompt {args.prompt_len}, new tokens {args.new_tokens}")
    print(f"{'batch':>5} {'step ms':>8} {'sync ms':>8} {'replay ms':>9} {'roof ms':>8} {'roof %':>7} "
          f"{'read roof %':>11} {'gen tok/s':>10} {'HF gen':>8} {'vs HF':>6} "
          f"{'decode tok/s':>12} {'HF decode':>9} {'vs HF':>6}")
    nan = float("nan")
    for r in rows:
        print(f"{r['batch']:>5} {r['step_ms']:>8.2f} {r['sync_step_ms']:>8.2f} {r['graph_replay_ms']:>9.2f} "
              f"{r['roofline_ms']:>8.2f} {100 * r['roofline_fraction']:>6.1f}% "
              f"{100 * r['read_roofline_fraction']:>10.1f}% {r['ours_generate_tps']:>10.1f} "
              f"{r.get('hf_generate_tps', nan):>8.1f} {r.get('speedup_vs_hf', nan):>5.1f}x "
              f"{r['ours_decode_tps']:>12.1f} {r.get('hf_decode_tps', nan):>9.1f} "
              f"{r.get('decode_speedup_vs_hf', nan):>5.1f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_bw": bw, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
