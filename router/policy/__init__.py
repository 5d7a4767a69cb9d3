"""Routing policies: filters -> weighted scorers -> picker per role (or a pair stage), built from
a configuration (``spec.py``) whose names come from the plugin registry (``plugins.py``); the
named presets are in ``presets.py``. ``build_policy(name_or_spec)`` makes one.

The names below load their modules on first use, so reading the presets (the router's command
line, its configuration, the CRD) imports no plugin.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from splitserve.router.policy.base import Policy
    from splitserve.router.policy.latency import LatencyModel
    from splitserve.router.policy.spec import PolicySpec

_WHERE = {
    "Decision": "base",
    "NoCandidate": "base",
    "Policy": "base",
    "RouteRequest": "base",
    "Shortage": "base",
    "SloUnattainable": "base",
    "StagedPolicy": "base",
    "Unservable": "base",
    "LatencyModel": "latency",
    "POLICIES": "presets",
    "PolicySpec": "spec",
}

__all__ = [*_WHERE, "build_policy"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def build_policy(name: str | PolicySpec, latency_model: LatencyModel | None = None) -> Policy:
    """A fresh policy from a preset's name (``POLICIES``) or a configuration."""
    from splitserve.router.policy.spec import build

    return build(name, latency_model)
