"""Goodput as pair scorers: send each request to the (prefill, decode) pair most likely to meet
both its TTFT and TPOT targets, or say that none can.

Predictions, from each worker's last ``/load`` plus what this router sent it since, the profiled
latency model and the transfers this router measured:

- TTFT(p, d) = prefill time of everything queued on p plus this prompt (minus the prefix p
  probably caches) + KV transfer of the prompt from p to d (``transfer.py``: the model's price,
  corrected by what the pair measured). With no prefill pool, the decode worker computes the
  prompt itself and its queue is empty by assumption.
- TPOT(d) = decode step time at the batch d would have with this request (running + waiting +
  assigned + 1) and that batch's total context.

The picker (``slo_slack``) takes the pair with the largest worst-case relative slack
min(1 - TTFT/target, 1 - TPOT/target); if every pair misses a target, ``SloUnattainable`` names
which (the dispatcher queues the request for a bounded time, then sheds it with 429).
"""

from __future__ import annotations

from typing import Any

from splitserve.router.policy.base import (
    PairPicker,
    PairPredictions,
    PairScorer,
    PolicyContext,
    RouteRequest,
    SloUnattainable,
)
from splitserve.router.policy.latency import LatencyModel
from splitserve.router.policy.plugins import register
from splitserve.router.policy.prefix import PrefixIndex
from splitserve.router.policy.transfer import TransferEstimator
from splitserve.router.workers import WorkerState


class _SloSlack(PairScorer):
    def score(self, req: RouteRequest, predicted_ms: float) -> float:
        return min(1.0, max(0.0, self.slack(req, predicted_ms)))


@register
class TtftSlack(_SloSlack):
    """Slack of the predicted time to first token: prefill queue and prompt on p, then the
    measured transfer from p to d."""

    name = "ttft_slack"
    slo = "ttft"

    def __init__(self, model: LatencyModel, prefix: PrefixIndex, transfers: TransferEstimator) -> None:
        self.model, self.prefix, self.transfers = model, prefix, transfers

    @classmethod
    def create(cls, ctx: PolicyContext, **args: Any) -> TtftSlack:
        return cls(ctx.model, ctx.prefix, ctx.transfers, **args)

    def prefill_ms(self, req: RouteRequest, p: WorkerState | None) -> float:
        if p is None:
            return self.model.prefill_ms(req.num_prompt_tokens)
        load = p.load
        queued = p.assigned_tokens_since_poll + (load.queued_prompt_tokens if load else 0)
        bs = load.block_size if load else req.block_size
        cached = self.prefix.matched_blocks(req.block_hashes, p.url) * bs
        own = max(1, req.num_prompt_tokens - cached)
        return self.model.prefill_ms(queued + own, own * cached)

    def predict_ms(self, req: RouteRequest, prefills: list[WorkerState | None],
                   decodes: list[WorkerState]) -> list[list[float]]:
        prior = self.transfers.prior_ms(req.num_prompt_tokens)
        urls = [d.url for d in decodes]
        rows = []
        for p in prefills:
            own = self.prefill_ms(req, p)
            if p is None:
                rows.append([own] * len(decodes))
            else:
                rows.append([own + t for t in self.transfers.estimates_ms(p.url, urls, prior)])
        return rows


@register
class TpotSlack(_SloSlack):
    """Slack of the predicted time per output token on d, with this request in its batch."""

    name = "tpot_slack"
    slo = "tpot"

    def __init__(self, model: LatencyModel) -> None:
        self.model = model

    @classmethod
    def create(cls, ctx: PolicyContext, **args: Any) -> TpotSlack:
        return cls(ctx.model, **args)

    def step_ms(self, req: RouteRequest, d: WorkerState) -> float:
        load = d.load
        batch = 1 + d.assigned_since_poll + (load.running + load.waiting if load else 0)
        context = (
            d.assigned_tokens_since_poll
            + (load.used_tokens if load else 0)
            + req.num_prompt_tokens
            + req.max_tokens // 2
        )
        return self.model.decode_step_ms(batch, context)

    def predict_ms(self, req: RouteRequest, prefills: list[WorkerState | None],
                   decodes: list[WorkerState]) -> list[list[float]]:
        row = [self.step_ms(req, d) for d in decodes]
        return [row] * len(prefills)  # the same row for every prefill (read only)


@register
class PairTransfer(PairScorer):
    """Shorter KV transfer for the pair (as measured) is better: 1 / (1 + ms / scale_ms). No
    target of its own; weight it to prefer close pairs among those that meet the targets."""

    name = "pair_transfer"

    def __init__(self, transfers: TransferEstimator, scale_ms: float = 50.0) -> None:
        if not scale_ms > 0:
            raise ValueError(f"pair_transfer scale_ms must be > 0, got {scale_ms}")
        self.transfers, self.scale = transfers, scale_ms

    @classmethod
    def create(cls, ctx: PolicyContext, **args: Any) -> PairTransfer:
        return cls(ctx.transfers, **args)

    def predict_ms(self, req: RouteRequest, prefills: list[WorkerState | None],
                   decodes: list[WorkerState]) -> list[list[float]]:
        prior = self.transfers.prior_ms(req.num_prompt_tokens)
        urls = [d.url for d in decodes]
        return [[0.0] * len(urls) if p is None else self.transfers.estimates_ms(p.url, urls, prior) for p in prefills]

    def score(self, req: RouteRequest, predicted_ms: float) -> float:
        return 1.0 / (1.0 + predicted_ms / self.scale)


@register
class SloSlackPicker(PairPicker):
    """The pair whose worst weighted slack over the ``slo`` scorers (plus the weighted scores of
    the others) is largest, among pairs that meet every target; the first such pair in (prefill
    URL, decode URL) order on ties. None meets them: SloUnattainable, naming the targets that
    even the best pair of each scorer misses."""

    name = "slo_slack"

    def pick(self, req: RouteRequest, predictions: list[PairPredictions], shape: tuple[int, int]) -> tuple[int, int]:
        slos = [(s, w, m) for s, w, m in predictions if s.slo]
        others = [(s, w, m) for s, w, m in predictions if not s.slo]
        unweighted = all(w == 1.0 for _, w, _ in slos)
        targets = [req.target_ms(s.slo) for s, _, _ in slos]
        best, best_value = None, float("-inf")
        for i in range(shape[0]):  # row by row: this runs for every request, over every pair
            slacks = [[1.0 - v / t for v in m[i]] for (_, _, m), t in zip(slos, targets, strict=True)]
            worst = _elementwise_min(slacks) if slacks else [0.0] * shape[1]
            value = worst if unweighted else _elementwise_min(
                [[w * x for x in row] for row, (_, w, _) in zip(slacks, slos, strict=True)])
            if others:
                value = [v + sum(w * s.score(req, m[i][j]) for s, w, m in others) for j, v in enumerate(value)]
            for j, v in enumerate(value):
                if v > best_value and worst[j] >= 0:
                    best, best_value = (i, j), v
        if best is None:
            raise self._unattainable(req, slos)
        return best

    @staticmethod
    def _unattainable(req: RouteRequest, slos: list[PairPredictions]) -> SloUnattainable:
        lowest = [(s.slo, min(min(row) for row in m)) for s, _, m in slos]
        misses = [slo for slo, v in lowest if v > req.target_ms(slo)]
        reason = "slo_" + "_".join(misses or [slo for slo, _ in lowest])
        best = ", ".join(f"{slo.upper()} {v:.1f} ms vs target {req.target_ms(slo):.1f} ms" for slo, v in lowest)
        return SloUnattainable(reason, f"no worker pair can meet the latency targets now (best predicted {best})")


def _elementwise_min(rows: list[list[float]]) -> list[float]:
    return rows[0] if len(rows) == 1 else list(map(min, *rows))
