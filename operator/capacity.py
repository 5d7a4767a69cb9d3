"""Per-replica capacity at the SLO targets: what the planner divides the measured load by.

Sources, in order: the InferenceService's own ``spec.autoscaling`` numbers (the user said so),
then the profiled latency model (``splitserve profile`` writes it; the router's goodput policy
reads the same JSON) mounted into the operator at ``SPLITSERVE_LATENCY_MODEL``, then defaults.
Each capacity says where it came from, so the scaling Event can tell a guess from a measurement.

From a latency model:
- prefill: a prompt may wait for the batch in progress and then run in its own, so a batch must
  take at most half the TTFT target; the largest such batch of T tokens gives
  T / prefill_ms(T) tokens per second.
- decode: the largest batch b whose step time, at ``context_tokens`` of context per sequence,
  stays within the TPOT target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from splitserve.operator.planner import Capacity
from splitserve.router.policy.latency import LatencyModel

DEFAULT_PREFILL_TOKENS_PER_S = 4000.0
DEFAULT_DECODE_SEQS = 16.0
DEFAULT_CONTEXT_TOKENS = 1024.0
MAX_PREFILL_BATCH_TOKENS = 1 << 20  # search bound: no real prefill batch is larger


@dataclass(frozen=True)
class SourcedCapacity:
    capacity: Capacity
    source: str  # "spec", "latency model", "default", or a mix per pool


def prefill_tokens_per_s(model: LatencyModel, ttft_ms: float) -> float:
    """Tokens per second one replica prefills with each batch within half the TTFT target."""
    budget = ttft_ms / 2.0
    if model.prefill_ms(1) > budget:
        return 1000.0 / model.prefill_ms(1)  # even one token misses: report what one does
    lo, hi = 1, MAX_PREFILL_BATCH_TOKENS
    while lo < hi:  # largest T with prefill_ms(T) <= budget (prefill_ms grows with T)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if model.prefill_ms(mid) <= budget else (lo, mid - 1)
    return lo * 1000.0 / model.prefill_ms(lo)


def decode_seqs(model: LatencyModel, tpot_ms: float, context_tokens: float) -> float:
    """Sequences one replica runs with each step within the TPOT target (at least 1)."""
    per_seq = model.decode_per_seq_ms + model.decode_per_context_token_ms * context_tokens
    room = tpot_ms - model.decode_base_ms
    if per_seq <= 0:
        return float(MAX_PREFILL_BATCH_TOKENS) if room >= 0 else 1.0
    return max(1.0, float(int(room / per_seq)))


def for_spec(
    spec: dict[str, Any],
    model: LatencyModel | None,
    context_tokens: float = DEFAULT_CONTEXT_TOKENS,
) -> SourcedCapacity:
    """Capacity for a (defaulted) spec: explicit spec numbers, else the model, else defaults."""
    auto, slo = spec["autoscaling"], spec["slo"]
    if auto.get("prefillTokensPerSecond"):
        prefill, p_src = float(auto["prefillTokensPerSecond"]), "spec"
    elif model is not None:
        prefill, p_src = prefill_tokens_per_s(model, float(slo["ttftMs"])), "latency model"
    else:
        prefill, p_src = DEFAULT_PREFILL_TOKENS_PER_S, "default"
    if auto.get("decodeSequencesPerReplica"):
        decode, d_src = float(auto["decodeSequencesPerReplica"]), "spec"
    elif model is not None:
        decode, d_src = decode_seqs(model, float(slo["tpotMs"]), context_tokens), "latency model"
    else:
        decode, d_src = DEFAULT_DECODE_SEQS, "default"
    source = p_src if p_src == d_src else f"prefill {p_src}, decode {d_src}"
    return SourcedCapacity(Capacity(prefill, decode), source)
