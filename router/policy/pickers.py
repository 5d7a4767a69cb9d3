"""Pickers: which of the scored candidates of one role gets the request."""

from __future__ import annotations

import itertools

from splitserve.router.policy.base import Picker
from splitserve.router.policy.plugins import register
from splitserve.router.workers import WorkerState


@register
class RoundRobinPicker(Picker):
    """Ignores scores: cycles through candidates (by URL order, so it is stable as sets change)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, scored: list[tuple[WorkerState, float]]) -> WorkerState:
        ordered = sorted(scored, key=lambda ws: ws[0].url)
        return ordered[next(self._counter) % len(ordered)][0]


@register
class MaxScorePicker(Picker):
    """Highest score; ties (within 1e-9) are broken round robin so equal workers share work."""

    name = "max_score"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, scored: list[tuple[WorkerState, float]]) -> WorkerState:
        best = max(s for _, s in scored)
        top = sorted((w for w, s in scored if s >= best - 1e-9), key=lambda w: w.url)
        return top[next(self._counter) % len(top)]
