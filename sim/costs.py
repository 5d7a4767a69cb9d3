"""What one engine step costs, from the profiled latency model (``splitserve profile``).

The latency model has three curves: a prefill batch (tokens computed, and how many cached
tokens they attend to), a decode step (batch size, total context) and a KV transfer (prompt
tokens). A step is costed from the sequences the scheduler put in it, before it runs:

- decode step (every sequence computes one token): ``decode_step_ms(batch, total context)``,
  exactly the quantity ``profile`` measured;
- prefill step, whole prompts or chunks (the colocated engine's mixed steps carry decode rows
  too): one forward pass over all computed tokens, so ``prefill base + per_token x tokens``
  once for the batch; attention is per sequence: ``per_token2 x n^2`` over a chunk's own n
  tokens, ``per_cached_pair x n x p`` over the p tokens computed before it (a prefix-cache hit
  or earlier chunks), and a decode row's attention as in a decode step
  (``per_context_token x its context``);
- a mixed step (prompt chunks and decode rows, the colocated engine's) where the model has a
  profiled ``mixed`` section: the chunks as a prefill step, plus the decode rows' measured extra
  (``_mixed_ms``); without one, the composition above, which the H200 validation found too
  cheap for the slowest mixed steps (the colocated TPOT p90 at 12 req/s, 6.5 ms simulated
  against 8.4 measured).
"""

from __future__ import annotations

from collections.abc import Iterable

from splitserve.engine.sequence import Sequence
from splitserve.router.policy.latency import LatencyModel


def step_ms(model: LatencyModel, seqs: Iterable[Sequence], is_prefill: bool) -> float:
    """The cost of a step over ``seqs`` (their ``num_scheduled_tokens`` set by the scheduler,
    ``num_computed_tokens`` still as before the step)."""
    seqs = list(seqs)
    if not is_prefill:
        return model.decode_step_ms(len(seqs), sum([len(s.token_ids) for s in seqs]))
    if model.mixed_base_ms is not None:
        rows = [s for s in seqs if _decode_row(s)]
        if rows:
            return _mixed_ms(model, seqs, rows)
    ms = model.prefill_base_ms
    for seq in seqs:
        n, before = seq.num_scheduled_tokens, seq.num_computed_tokens
        ms += model.prefill_per_token_ms * n
        if _decode_row(seq):
            ms += model.decode_per_context_token_ms * len(seq)  # a decode row of a mixed step
        else:
            ms += model.prefill_per_token2_ms * n * n + model.prefill_per_cached_pair_ms * n * before
    return ms


def _decode_row(seq: Sequence) -> bool:
    """Computes one token of an answer (not a one-token prompt chunk)."""
    return seq.num_scheduled_tokens == 1 and seq.num_uncomputed_tokens == 1 and seq.num_output_tokens > 0


def _mixed_ms(model: LatencyModel, seqs: list[Sequence], rows: list[Sequence]) -> float:
    """A mixed step over a profiled ``mixed`` section: its prompt chunks as a prefill step of
    them (the prefill curve, profiled to the largest prompts), plus what the decode ``rows``
    add to a step of that many chunk tokens, measured: ``mixed_ms - prefill_ms`` there, at
    least 0, taken at the largest chunk profiled when the step's is larger (the mixed fit of
    64-1,024-token chunks, flat in this range on a launch-bound GPU, priced an 8k-token chunk
    at a fifth of its prefill)."""
    ms = model.prefill_base_ms
    tokens = 0
    for seq in seqs:
        if not _decode_row(seq):
            n = seq.num_scheduled_tokens
            tokens += n
            ms += (model.prefill_per_token_ms * n + model.prefill_per_token2_ms * n * n
                   + model.prefill_per_cached_pair_ms * n * seq.num_computed_tokens)
    at = min(tokens, model.mixed_max_tokens) if model.mixed_max_tokens else tokens
    extra = model.mixed_ms(at, len(rows), sum([len(s) for s in rows])) - model.prefill_ms(at)
    return ms + max(0.0, extra)


def transfer_done_ms(model: LatencyModel, tokens: int, started_ms: float, computed_ms: float) -> float:
    """When a prompt's KV has landed on the decode worker. The prefill worker sends each layer
    as soon as it is computed, so the wire time overlaps the step that computes the prompt: the
    transfer ends at the later of the step's end plus the fixed per-transfer cost and the step's
    start plus the whole transfer."""
    return max(computed_ms + model.transfer_base_ms, started_ms + model.transfer_ms(tokens))
