"""Goodput policy: send each request to the (prefill, decode) pair most likely to meet both its
TTFT and TPOT targets, or say that none can.

Predictions, from each worker's last ``/load`` plus what this router sent it since, and the
profiled latency model:

- TTFT(p) = prefill time of everything queued on p plus this prompt (minus the prefix p
  probably caches) + KV transfer of the prompt. With no prefill pool, the decode worker computes
  the prompt itself and its queue is empty by assumption.
- TPOT(d) = decode step time at the batch d would have with this request (running + waiting +
  assigned + 1) and that batch's total context.

The pair with the largest worst-case relative slack min(1 - TTFT/target, 1 - TPOT/target) wins;
if every pair misses a target, ``SloUnattainable`` names which (the dispatcher queues the request
for a bounded time, then sheds it with 429).
"""

from __future__ import annotations

import time

from splitserve.router.policy.base import (
    Decision,
    NoCandidate,
    Policy,
    RouteRequest,
    SloUnattainable,
)
from splitserve.router.policy.filters import HasKVEndpoint, HasRoom, Healthy
from splitserve.router.policy.latency import LatencyModel
from splitserve.router.policy.prefix import PrefixIndex
from splitserve.router.workers import WorkerState


class GoodputPolicy(Policy):
    name = "goodput"

    def __init__(self, model: LatencyModel, prefix_index: PrefixIndex | None = None) -> None:
        self.model = model
        self.prefix = prefix_index or PrefixIndex()
        self._healthy, self._room, self._kv = Healthy(), HasRoom(), HasKVEndpoint()

    def predict_ttft_ms(self, req: RouteRequest, p: WorkerState | None) -> float:
        if p is None:
            return self.model.prefill_ms(req.num_prompt_tokens)
        load = p.load
        queued = p.assigned_tokens_since_poll + (load.queued_prompt_tokens if load else 0)
        bs = load.block_size if load else req.block_size
        cached = self.prefix.matched_blocks(req.block_hashes, p.url) * bs
        own = max(1, req.num_prompt_tokens - cached)
        return self.model.prefill_ms(queued + own, own * cached) + self.model.transfer_ms(req.num_prompt_tokens)

    def predict_tpot_ms(self, req: RouteRequest, d: WorkerState) -> float:
        load = d.load
        batch = 1 + d.assigned_since_poll + (load.running + load.waiting if load else 0)
        context = (
            d.assigned_tokens_since_poll
            + (load.used_tokens if load else 0)
            + req.num_prompt_tokens
            + req.max_tokens // 2
        )
        return self.model.decode_step_ms(batch, context)

    def pick(self, req: RouteRequest, prefills: list[WorkerState], decodes: list[WorkerState]) -> Decision:
        t0 = time.perf_counter()
        if not decodes:
            raise NoCandidate("decode", "none registered")
        ds = self._healthy.apply(req, decodes)
        if not ds:
            raise NoCandidate("decode", f"all {len(decodes)} unhealthy")
        ps: list[WorkerState | None] = [None]
        if req.with_prefill:
            if not prefills:
                raise NoCandidate("prefill", "none registered")
            ps = list(self._healthy.apply(req, prefills))
            if not ps:
                raise NoCandidate("prefill", f"all {len(prefills)} unhealthy")
            ds = self._kv.apply(req, ds)
            if not ds:
                raise NoCandidate("decode", "no decode worker reported a kv_endpoint")
        roomy = self._room.apply(req, ds)
        if not roomy:
            raise SloUnattainable("no_kv_room", "every decode worker is out of KV blocks for this prompt")
        t1 = time.perf_counter()
        ttft = {id(p): self.predict_ttft_ms(req, p) for p in ps}
        tpot = {id(d): self.predict_tpot_ms(req, d) for d in roomy}
        best, best_slack = None, float("-inf")
        for p in sorted(ps, key=lambda w: w.url if w else ""):
            for d in sorted(roomy, key=lambda w: w.url):
                slack = min(1 - ttft[id(p)] / req.slo.ttft_ms, 1 - tpot[id(d)] / req.slo.tpot_ms)
                if slack > best_slack:
                    best, best_slack = (p, d), slack
        t2 = time.perf_counter()
        min_ttft, min_tpot = min(ttft.values()), min(tpot.values())
        if best is None or best_slack < 0:
            misses = [n for n, v, t in (("ttft", min_ttft, req.slo.ttft_ms), ("tpot", min_tpot, req.slo.tpot_ms)) if v > t]
            reason = "slo_" + "_".join(misses or ["ttft_tpot"])
            raise SloUnattainable(
                reason,
                f"no worker pair can meet the latency targets now (best predicted TTFT {min_ttft:.0f} ms "
                f"vs target {req.slo.ttft_ms:.0f} ms, TPOT {min_tpot:.1f} ms vs {req.slo.tpot_ms:.1f} ms)",
            )
        p, d = best
        return Decision(
            p,
            d,
            self.name,
            predicted_ttft_ms=ttft[id(p)],
            predicted_tpot_ms=tpot[id(d)],
            timings_us={"filter": (t1 - t0) * 1e6, "predict": (t2 - t1) * 1e6},
        )

    def on_routed(self, req: RouteRequest, decision: Decision) -> None:
        if decision.prefill is not None:
            self.prefix.record(req.block_hashes, decision.prefill.url)
