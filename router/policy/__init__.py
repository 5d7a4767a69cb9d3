"""Routing policies: ``build_policy(name)`` turns a policy name into its configured plugins."""

from __future__ import annotations

from splitserve.router.policy.base import (
    Decision,
    NoCandidate,
    Policy,
    RouteRequest,
    SloUnattainable,
    StagedPolicy,
)
from splitserve.router.policy.latency import LatencyModel
from splitserve.router.policy.prefix import PrefixIndex

__all__ = [
    "Decision",
    "LatencyModel",
    "NoCandidate",
    "Policy",
    "RouteRequest",
    "SloUnattainable",
    "build_policy",
]


class PrefixAwarePolicy(StagedPolicy):
    """Prefill by prefix hit (plus a little load, to break ties and avoid piling on one worker),
    decode by load; remembers where each prompt's blocks went."""

    def __init__(self, prefill, decode, index: PrefixIndex) -> None:  # noqa: ANN001
        super().__init__("prefix_aware", prefill, decode)
        self.index = index

    def on_routed(self, req: RouteRequest, decision: Decision) -> None:
        if decision.prefill is not None:
            self.index.record(req.block_hashes, decision.prefill.url)


def build_policy(name: str, latency_model: LatencyModel | None = None) -> Policy:
    from splitserve.router.policy.base import MaxScorePicker, RoundRobinPicker, Stage
    from splitserve.router.policy.filters import HasKVEndpoint, HasRoom, Healthy
    from splitserve.router.policy.goodput import GoodputPolicy
    from splitserve.router.policy.scorers import (
        DecodeLoadScorer,
        PrefillQueueScorer,
        PrefixHitScorer,
    )

    def decode_filters() -> list:
        return [Healthy(), HasKVEndpoint(), HasRoom()]

    if name == "round_robin":
        return StagedPolicy(
            name,
            Stage("prefill", [Healthy()], [], RoundRobinPicker()),
            Stage("decode", decode_filters(), [], RoundRobinPicker()),
        )
    if name == "least_loaded":
        return StagedPolicy(
            name,
            Stage("prefill", [Healthy()], [(PrefillQueueScorer(), 1.0)], MaxScorePicker()),
            Stage("decode", decode_filters(), [(DecodeLoadScorer(), 1.0)], MaxScorePicker()),
        )
    if name == "prefix_aware":
        index = PrefixIndex()
        return PrefixAwarePolicy(
            Stage(
                "prefill",
                [Healthy()],
                [(PrefixHitScorer(index), 1.0), (PrefillQueueScorer(), 0.3)],
                MaxScorePicker(),
            ),
            Stage("decode", decode_filters(), [(DecodeLoadScorer(), 1.0)], MaxScorePicker()),
            index,
        )
    if name == "goodput":
        return GoodputPolicy(latency_model or LatencyModel())
    raise ValueError(f"unknown policy {name!r} (round_robin, least_loaded, prefix_aware, goodput)")
