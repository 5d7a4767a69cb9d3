"""Prometheus metrics of a worker's engine (prefix ``splitserve_``), defined once."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram
from splitserve.engine.engine import LLMEngine, StepStats

STEP_SECONDS = Histogram(
    "splitserve_engine_step_seconds",
    "Duration of one engine step",
    ["role", "phase"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12),
)
STEP_TOKENS = Counter("splitserve_engine_tokens_total", "Tokens computed by engine steps", ["role", "phase"])
RUNNING = Gauge("splitserve_engine_running_sequences", "Sequences in the running batch", ["role"])
WAITING = Gauge("splitserve_engine_waiting_sequences", "Sequences queued for prefill", ["role"])
KV_BLOCKS_FREE = Gauge("splitserve_kv_blocks_free", "Free KV-cache blocks", ["role"])
KV_BLOCKS_USED = Gauge("splitserve_kv_blocks_used", "KV-cache blocks in use", ["role"])
REQUESTS = Counter("splitserve_worker_requests_total", "Requests handled by the worker", ["role", "outcome"])


def observe_engine(engine: LLMEngine, role: str) -> None:
    """Export step timings of ``engine`` under ``role``, and its queue and cache gauges read at
    scrape time: an idle worker reports its idle state, not the last step's (a gauge set only on
    steps froze at its busy values, and blocks freed between steps never showed)."""

    def observe(stats: StepStats) -> None:
        phase = "prefill" if stats.is_prefill else "decode"
        STEP_SECONDS.labels(role, phase).observe(stats.seconds)
        STEP_TOKENS.labels(role, phase).inc(stats.num_tokens)

    # Reads from the scraping thread: each is one len() of a container the engine thread owns.
    RUNNING.labels(role).set_function(lambda: len(engine.scheduler.running))
    WAITING.labels(role).set_function(lambda: len(engine.scheduler.waiting))
    KV_BLOCKS_FREE.labels(role).set_function(lambda: engine.blocks.num_free_blocks)
    KV_BLOCKS_USED.labels(role).set_function(lambda: engine.blocks.num_blocks - engine.blocks.num_free_blocks)
    engine.step_observers.append(observe)
