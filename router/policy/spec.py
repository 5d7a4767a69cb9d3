"""A policy as data: which plugins each role uses, with which weights, parsed and validated.

The format (JSON or YAML; ``--policy-config FILE``, or a preset by name)::

    name: my_policy            # its label in metrics and logs
    prefill:                   # each role: filters, weighted scorers, a picker
      filters: [healthy]
      scorers: {prefix_hit: 1.0, prefill_queue: 0.3}
      picker: max_score
    decode:
      filters: [kv_capacity, healthy, kv_endpoint, has_room]
      scorers: [{name: decode_load, weight: 1.0}]
      picker: max_score
    pair:                      # optional: choose the pair together, after each role's filters
      scorers: {ttft_slack: 1.0, tpot_slack: 1.0, pair_transfer: {weight: 0.1, scale_ms: 20}}
      picker: slo_slack
    queue: true                # default; false: no decode worker with KV room now is a 503 at
                               # once, not a wait (bounded, then shed 429) for room to free up

A plugin is a name, ``{name: weight}``, ``{name: {weight: w, ...arguments}}`` or ``{name: ...,
weight: ..., ...arguments}``; the names are those of ``plugins.py``. With a pair stage the roles
only filter. Anything unknown is an error, found when the configuration is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitserve.router.policy import plugins
from splitserve.router.policy.base import PairStage, PolicyContext, Stage, StagedPolicy
from splitserve.router.policy.latency import LatencyModel
from splitserve.router.policy.presets import PRESETS


@dataclass(frozen=True)
class PluginRef:
    name: str
    weight: float = 1.0
    args: tuple[tuple[str, Any], ...] = ()

    def build(self, kind: str, ctx: PolicyContext) -> Any:
        cls = plugins.lookup(kind, self.name)
        try:
            return cls.create(ctx, **dict(self.args))
        except TypeError as exc:
            raise ValueError(f"{kind} {self.name!r}: bad arguments {dict(self.args)}: {exc}") from exc


@dataclass(frozen=True)
class StageSpec:
    filters: tuple[PluginRef, ...] = ()
    scorers: tuple[PluginRef, ...] = ()
    picker: PluginRef | None = None


@dataclass(frozen=True)
class PolicySpec:
    name: str
    prefill: StageSpec = field(default_factory=StageSpec)
    decode: StageSpec = field(default_factory=StageSpec)
    pair: StageSpec | None = None
    queue: bool = True

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError("a policy needs a name")
        if self.pair is None:
            for role, stage in (("prefill", self.prefill), ("decode", self.decode)):
                if stage.picker is None:
                    raise ValueError(f"policy {self.name!r}: {role} needs a picker (or give a pair stage)")
        else:
            if self.pair.picker is None or self.pair.filters:
                raise ValueError(f"policy {self.name!r}: the pair stage has scorers and a picker, no filters")
            if any(s.scorers or s.picker for s in (self.prefill, self.decode)):
                raise ValueError(f"policy {self.name!r}: with a pair stage, prefill and decode only filter")
        self.build(PolicyContext())  # every name and argument is checked now, not at the first request

    @classmethod
    def preset(cls, name: str) -> PolicySpec:
        data = PRESETS.get(name)
        if data is None:
            raise ValueError(f"unknown policy {name!r} ({', '.join(PRESETS)})")
        return cls.from_dict({"name": name, **data})

    @classmethod
    def from_dict(cls, data: Any) -> PolicySpec:
        data = _mapping(data, "policy", {"name", "prefill", "decode", "pair", "queue"})
        queue = data.get("queue", True)
        if not isinstance(queue, bool):
            raise ValueError(f"policy queue must be true or false, got {queue!r}")
        pair = data.get("pair")
        return cls(
            name=data.get("name", ""),
            prefill=_stage(data.get("prefill", {}), "prefill"),
            decode=_stage(data.get("decode", {}), "decode"),
            pair=None if pair is None else _stage(pair, "pair"),
            queue=queue,
        )

    @classmethod
    def load(cls, path: str | Path) -> PolicySpec:
        """A policy configuration from a JSON or YAML file; ValueError naming the file."""
        import yaml  # YAML is a superset of JSON: one parser for both

        try:
            return cls.from_dict(yaml.safe_load(Path(path).read_text()))
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot load policy configuration {path}: {exc}") from exc

    def build(self, ctx: PolicyContext) -> StagedPolicy:
        pair = None
        if self.pair is not None:
            pair = PairStage(_weighted(self.pair, "pair_scorer", ctx), self.pair.picker.build("pair_picker", ctx))
        return StagedPolicy(self.name, _build_stage("prefill", self.prefill, ctx),
                            _build_stage("decode", self.decode, ctx), pair, ctx, self.queue)


def build(spec: PolicySpec | str, latency_model: LatencyModel | None = None) -> StagedPolicy:
    """A fresh policy (its own counters, prefix index and transfer estimates) from a
    configuration or a preset's name."""
    if isinstance(spec, str):
        spec = PolicySpec.preset(spec)
    return spec.build(PolicyContext(latency_model))


def _build_stage(role: str, stage: StageSpec, ctx: PolicyContext) -> Stage:
    filters = [f.build("filter", ctx) for f in stage.filters]
    picker = stage.picker.build("picker", ctx) if stage.picker else None
    return Stage(role, filters, _weighted(stage, "scorer", ctx), picker)


def _weighted(stage: StageSpec, kind: str, ctx: PolicyContext) -> list[tuple[Any, float]]:
    return [(s.build(kind, ctx), s.weight) for s in stage.scorers]


def _mapping(data: Any, what: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a mapping, got {type(data).__name__}")
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"unknown {what} field(s): {', '.join(sorted(map(str, unknown)))}")
    return data


def _stage(data: Any, role: str) -> StageSpec:
    data = _mapping(data, role, {"filters", "scorers", "picker"})
    filters = tuple(_plugins(data.get("filters", []), f"{role}.filters"))
    if any(f.args or f.weight != 1.0 for f in filters):
        raise ValueError(f"{role}.filters take no weight or arguments")
    picker = data.get("picker")
    return StageSpec(filters, tuple(_plugins(data.get("scorers", []), f"{role}.scorers")),
                     None if picker is None else _plugin(picker, f"{role}.picker"))


def _plugins(data: Any, where: str) -> list[PluginRef]:
    if isinstance(data, dict):  # {name: weight} or {name: {weight: ..., args...}}
        return [_plugin({"name": k, **(v if isinstance(v, dict) else {"weight": v})}, where) for k, v in data.items()]
    if not isinstance(data, list):
        raise ValueError(f"{where} must be a list or a mapping, got {type(data).__name__}")
    return [_plugin(item, where) for item in data]


def _plugin(data: Any, where: str) -> PluginRef:
    if isinstance(data, str):
        return PluginRef(data)
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ValueError(f"{where}: a plugin is a name or a mapping with a 'name', got {data!r}")
    args = {k: v for k, v in data.items() if k not in ("name", "weight")}
    weight = data.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight < math.inf:
        raise ValueError(f"{where}: weight of {data['name']!r} must be a finite number >= 0, got {weight!r}")
    return PluginRef(data["name"], float(weight), tuple(sorted(args.items())))
