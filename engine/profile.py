"""Measure this hardware's latency model: prefill time vs batched prompt tokens (and vs the
prefix-cache hit in front of them), decode step time vs batch size and context, KV transfer time
vs tokens.

The router's goodput policy and the planner predict TTFT and TPOT from these points (the JSON
format is ``splitserve.router.policy.latency``'s). Each point is the median of a few timed steps
of the real engine, on random prompts that share no prefix, except where a point measures a hit.

Mixed steps (the colocated engine's chunked prefill: a prompt chunk computed in the same pass
as every running sequence's next token) are timed on their own, chunk size by decode batch by
context: the simulator prices them from these points rather than from the prefill and decode
curves, which the attention over the decode rows' contexts in the prefill path does not follow.

The spread of step times (``spread.step_ratio``, which the simulator draws from) comes from one
decode batch stepped many times and one prompt prefilled many times: each step's time over the
median of its kind, pooled, as 19 quantiles (5% to 95%).
"""

from __future__ import annotations

import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from splitserve.engine.engine import EngineConfig, LLMEngine, StepStats
from splitserve.engine.sampling import SamplingParams
from splitserve.engine.sequence import Sequence

REPEATS = 3


def _powers(start: int, stop: int) -> list[int]:
    out, n = [], start
    while n <= stop:
        out.append(n)
        n *= 2
    return out


class Profiler:
    def __init__(self, engine: LLMEngine, seed: int = 0) -> None:
        self.engine = engine
        self.rng = random.Random(seed)
        self._last: StepStats | None = None
        engine.step_observers.append(self._record)

    def _record(self, stats: StepStats) -> None:
        self._last = stats

    def _prompt(self, n: int) -> list[int]:
        vocab = self.engine.runner.model_config.vocab_size
        return [self.rng.randrange(vocab) for _ in range(n)]

    def _timed_step(self) -> float:
        self.engine.step()
        return self._last.seconds * 1e3

    def _drain(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.engine.abort(seq)
        self.engine.flush()  # their blocks are free once no queued step can write them

    def _timed_prefill(self, prompt: list[int]) -> tuple[float, int]:
        """One prefill of ``prompt`` alone: (ms, prompt tokens its prefix-cache hit covered)."""
        seq = Sequence("profile", prompt, SamplingParams(max_tokens=1, temperature=0), prefill_only=True)
        self.engine.add(seq)
        ms = self._timed_step()
        self.engine.release(seq)
        return ms, seq.num_cached_tokens

    def warm_up(self, sizes: list[int], seconds: float = 2.0) -> None:
        """Untimed steps before any timed one: every prompt size once (its kernels compiled and
        tuned), then prefills for ``seconds`` so a GPU that was idle has raised its clocks. On
        an H200 the first points of a cold GPU came out 2-3x slow (16-64 tokens ~50 ms, 256
        tokens 19 ms), which bent the prefill fit for the short prompts that chat sends."""
        for n in sizes:
            self._timed_prefill(self._prompt(n))
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            self._timed_prefill(self._prompt(sizes[len(sizes) // 2]))

    def prefill_points(self, sizes: list[int]) -> Iterator[list[float]]:
        for n in sizes:
            times = [self._timed_prefill(self._prompt(n))[0] for _ in range(REPEATS)]
            yield [n, statistics.median(times)]

    def prefix_points(self, cached_sizes: list[int], new_sizes: list[int]) -> Iterator[list[float]]:
        """[new tokens, cached tokens, ms]: a prompt whose first tokens hit the prefix cache (a
        first prompt leaves them there; each timed one adds different new tokens after them)."""
        for c in cached_sizes:
            prefix = self._prompt(c)
            self._timed_prefill(prefix + self._prompt(1))  # leaves the prefix's blocks cached
            for n in new_sizes:
                runs = [self._timed_prefill(prefix + self._prompt(n)) for _ in range(REPEATS)]
                cached = min(hit for _, hit in runs)
                yield [len(prefix) + n - cached, cached, statistics.median(ms for ms, _ in runs)]

    def decode_points(self, batches: list[int], contexts: list[int]) -> Iterator[list[float]]:
        params = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
        for batch in batches:
            for ctx in contexts:
                seqs = [Sequence("profile", self._prompt(ctx), params) for _ in range(batch)]
                needed = batch * (ctx // self.engine.blocks.block_size + 2)
                if needed > self.engine.blocks.num_free_blocks:
                    continue
                for seq in seqs:
                    self.engine.add(seq)
                while self.engine.scheduler.waiting:
                    self.engine.step()
                times = [self._timed_step() for _ in range(REPEATS + 1)][1:]
                self._drain(seqs)
                yield [batch, batch * ctx, statistics.median(times)]


    @contextmanager
    def _chunked_prefill(self) -> Iterator[None]:
        """The engine schedules as a colocated worker (``--chunked-prefill``) meanwhile."""
        engine = self.engine
        saved = engine.config
        engine.config = replace(saved, scheduler=replace(saved.scheduler, chunked_prefill=True))
        engine.scheduler.config = engine.config.scheduler
        try:
            yield
        finally:
            engine.flush()
            engine.config = saved
            engine.scheduler.config = saved.scheduler

    def mixed_points(self, chunks: list[int], batches: list[int], contexts: list[int]) -> Iterator[list[float]]:
        """[chunk tokens, decode rows, their context tokens, ms]: one step that computes a new
        prompt of ``chunk`` tokens alongside ``batch`` running sequences of ``context`` tokens."""
        params = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
        budget = self.engine.config.scheduler.max_num_batched_tokens
        with self._chunked_prefill():
            for batch in batches:
                for ctx in contexts:
                    fits = [n for n in chunks if n + batch <= budget]
                    needed = batch * (ctx // self.engine.blocks.block_size + 2 + REPEATS * len(fits))
                    needed += max(fits, default=0) // self.engine.blocks.block_size + 2
                    if not fits or needed > self.engine.blocks.num_free_blocks:
                        continue
                    seqs = [Sequence("profile", self._prompt(ctx), params) for _ in range(batch)]
                    for seq in seqs:
                        self.engine.add(seq)
                    while any(s.num_output_tokens == 0 for s in seqs):
                        self.engine.step()
                    self.engine.flush()
                    for n in fits:
                        times = []
                        for _ in range(REPEATS):
                            prompt = Sequence("profile", self._prompt(n), SamplingParams(max_tokens=1, temperature=0))
                            self.engine.add(prompt)
                            self.engine.step()  # a mixed step stays in flight (overlap): wait for it
                            self.engine.flush()
                            times.append(self._last.seconds * 1e3)
                            self._drain([prompt])
                        yield [n, batch, batch * ctx, statistics.median(times)]
                    self._drain(seqs)

    def spread_ratios(self, batch: int, context: int, prompt: int, repeats: int = 40) -> list[float]:
        """Each step's time over the median of its kind: ``repeats`` decode steps of ``batch``
        sequences of ``context`` tokens, and ``repeats // 2`` prefills of ``prompt`` tokens."""
        params = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
        seqs = [Sequence("profile", self._prompt(context), params) for _ in range(batch)]
        for seq in seqs:
            self.engine.add(seq)
        while self.engine.scheduler.waiting:
            self.engine.step()
        decode = [self._timed_step() for _ in range(repeats + 1)][1:]
        self._drain(seqs)
        prefill = [self._timed_prefill(self._prompt(prompt))[0] for _ in range(max(repeats // 2, 2))]
        return [t / statistics.median(times) for times in (decode, prefill) for t in times]


def transfer_points(engine: LLMEngine, sizes: list[int], backend: str = "tcp") -> Iterator[list[float]]:
    """Loopback KV transfer of ``n`` prompt tokens through the real connector."""
    import time
    import uuid

    from splitserve.engine.kv_spec import kv_spec
    from splitserve.kvtransfer import create_receiver, create_sender
    from splitserve.kvtransfer.layout import iter_cache_layers

    spec = kv_spec(engine, backend, "profile")
    runner = engine.runner
    receiver = create_receiver(backend, spec, runner.kv_cache, host="127.0.0.1", port=0)
    sender = create_sender(backend, spec)
    try:
        for n in sizes:
            blocks = list(range(-(-n // runner.block_size)))
            times = []
            for _ in range(REPEATS):
                rid = uuid.uuid4().hex
                fut = receiver.expect(rid, n, blocks, timeout=60)
                layers = iter_cache_layers(runner.kv_cache, blocks, n)
                started = time.perf_counter()
                sender.send(rid, receiver.endpoint, layers, 0, {})
                fut.result(timeout=60)
                times.append((time.perf_counter() - started) * 1e3)
            yield [n, statistics.median(times)]
    finally:
        sender.close()
        receiver.close()


def transfer_backend(kv_backend: str, device: torch.device) -> str:
    """The backend the transfer curve is measured over: the workers' own, and for ``auto``
    what two workers on one host negotiate (cuda_ipc between GPU caches, else tcp; the split's
    TTFT on an H200 followed cuda_ipc's 4 ms for 4,096 tokens, not TCP's 205 ms)."""
    if kv_backend != "auto":
        return kv_backend
    return "cuda_ipc" if device.type == "cuda" else "tcp"


def profile(config: EngineConfig, progress: Callable[[str], None] = lambda _: None, with_transfer: bool = True,
            kv_backend: str = "tcp") -> dict:
    """Run every measurement and return the latency-model JSON document."""
    engine = LLMEngine(config)
    prof = Profiler(engine)
    top = min(engine.max_model_len - 1, config.scheduler.max_num_batched_tokens)
    sizes = _powers(16, top)
    batches = _powers(1, min(64, config.scheduler.max_num_seqs))
    contexts = [c for c in (64, 256, 1024, 4096) if c < engine.max_model_len]
    doc: dict = {"prefill": {"points": []}, "decode": {"points": []}}
    progress("warming up (every prompt size once, then prefills for 2 s)")
    prof.warm_up(sizes, seconds=2.0 if engine.runner.device.type == "cuda" else 0.0)
    for point in prof.prefill_points(sizes):
        doc["prefill"]["points"].append(point)
        progress(f"prefill {point[0]:>6} tokens: {point[1]:8.2f} ms")
    cached_sizes = [c for c in (256, 1024) if 2 * c < top]
    for point in prof.prefix_points(cached_sizes, [n for n in (16, 128, 512) if n <= top // 2]):
        doc["prefill"]["points"].append(point)
        progress(f"prefill {point[0]:>6} tokens after a {point[1]}-token prefix hit: {point[2]:8.2f} ms")
    for point in prof.decode_points(batches, contexts):
        doc["decode"]["points"].append(point)
        progress(f"decode batch {point[0]:>3}, context {point[1]:>7}: {point[2]:8.2f} ms")
    mixed_batches = [b for b in (4, 16, 64) if b < config.scheduler.max_num_seqs]
    mixed_contexts = [c for c in (64, 256, 1024) if c < engine.max_model_len // 2]
    mixed_chunks = [n for n in (64, 256, 1024, 4096) if n < top]
    points = list(prof.mixed_points(mixed_chunks, mixed_batches, mixed_contexts))
    if len(points) >= 5:  # enough for the mixed fit's five coefficients
        doc["mixed"] = {"points": points}
        for point in points:
            progress(f"mixed: {point[0]:>5}-token chunk + {point[1]:>3} decode rows "
                     f"({point[2]:>6} context): {point[3]:8.2f} ms")
    batch, context = min(8, config.scheduler.max_num_seqs), min(256, top // 2)
    if batch * (context // engine.blocks.block_size + 2) <= engine.blocks.num_free_blocks:
        ratios = prof.spread_ratios(batch, context, min(256, top))
        doc["spread"] = {"step_ratio": [round(q, 4) for q in statistics.quantiles(ratios, n=20)]}
        progress(f"step time / median: p10 {doc['spread']['step_ratio'][1]:.3f}, "
                 f"p90 {doc['spread']['step_ratio'][17]:.3f} ({len(ratios)} steps)")
    if with_transfer:
        backend = transfer_backend(kv_backend, engine.runner.device)
        doc["transfer"] = {"points": []}
        doc.setdefault("meta", {})["transfer_backend"] = backend
        for point in transfer_points(engine, sizes, backend):
            doc["transfer"]["points"].append(point)
            progress(f"transfer ({backend}) {point[0]:>6} tokens: {point[1]:8.2f} ms")
    runner = engine.runner
    doc["meta"] = doc.get("meta", {}) | {
        "model": config.runner.model_dir,
        "device": torch.cuda.get_device_name(runner.device) if runner.device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(runner.dtype).removeprefix("torch."),
        "block_size": runner.block_size,
        # the worker shape that was profiled: `splitserve sim` simulates workers of this size
        "num_kv_blocks": engine.blocks.num_blocks,
        "max_model_len": engine.max_model_len,
        "torch": torch.__version__,
    }
    return doc
