"""Warm-up: run a few throwaway requests before a worker reports itself healthy.

Triton compiles a kernel the first time it meets a new specialisation of its integer arguments
(a count equal to 1, divisible by 16, or neither), and each compile takes a second or more on a
GPU. Without a warm-up those seconds land on the first real requests: on an H200 the first
minute of a goodput run missed its TTFT target on up to 40% of requests for that reason alone.
The decode step's kernels compile when its CUDA graphs are captured; this covers the prefill
path: single and packed prompts whose token counts hit each specialisation, a prompt that reuses
a cached prefix, and the decode steps after them (with chunked prefill, the mixed batches too).

Costs milliseconds on the CPU; on a GPU, the compiles (once per machine: Triton caches them on
disk, so a restart is fast).
"""

from __future__ import annotations

import logging
import time

from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling import SamplingParams
from splitserve.engine.sequence import Sequence

log = logging.getLogger(__name__)


def warmup_batches(block_size: int, max_prompt: int) -> list[list[int]]:
    """Prompt lengths of each throwaway batch: 1 token, a block, a block + 1, packed pairs whose
    sum is and is not a multiple of 16, all clipped to what the context allows."""
    b = block_size
    batches = [[1], [b], [b + 1], [b, b], [b + 1, b - 1], [b + 1, b], [2 * b + 1, 3]]
    return [[max(1, min(n, max_prompt)) for n in batch] for batch in batches]


def warm_up(engine: LLMEngine) -> float:
    """Run the throwaway requests to completion; returns the seconds it took. Leaves no
    sequence behind (the prefix-cache entries they leave are reusable free blocks)."""
    started = time.perf_counter()
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    vocab = engine.runner.model_config.vocab_size
    max_prompt = engine.max_model_len - params.max_tokens
    prefix = [(7 * i + 3) % vocab for i in range(2 * engine.runner.block_size)]
    for n, lengths in enumerate(warmup_batches(engine.runner.block_size, max_prompt)):
        seqs = [
            Sequence(f"warmup-{n}-{i}", [(31 * n + 17 * i + t) % vocab for t in range(length)], params)
            for i, length in enumerate(lengths)
        ]
        _run(engine, seqs)
    if len(prefix) + 5 <= max_prompt:  # a second prompt finds the first one's blocks cached
        _run(engine, [Sequence("warmup-prefix-a", prefix + [1, 2, 3], params)])
        _run(engine, [Sequence("warmup-prefix-b", prefix + [4, 5, 6, 7, 8], params)])
    seconds = time.perf_counter() - started
    log.info("warm-up: compiled and ran the prefill/decode paths in %.1f s", seconds)
    return seconds


def _run(engine: LLMEngine, seqs: list[Sequence]) -> None:
    for seq in seqs:
        engine.add(seq)
    while engine.has_work():
        engine.step()
