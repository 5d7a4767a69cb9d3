"""Latency model: predicted prefill time, decode step time and KV transfer time.

Loaded from the JSON that ``splitserve profile`` writes (or written by hand). Format, all times
in milliseconds; each section gives either coefficients or measured points to fit::

    {
      "prefill":  {"base_ms": 5, "per_token_ms": 0.05, "per_token2_ms": 0.0,
                   "per_cached_pair_ms": 0.0},
      "decode":   {"base_ms": 8, "per_seq_ms": 0.3, "per_context_token_ms": 0.0005},
      "transfer": {"base_ms": 1, "per_token_ms": 0.01},
      "mixed":    {"base_ms": 6, "per_token_ms": 0.05, "per_token2_ms": 0.0,
                   "per_row_ms": 0.02, "per_context_token_ms": 0.0006},
      "overhead": {"request_ms": [9.5, 12, 20], "split_request_ms": [20, 24, 30]},
      "spread":   {"step_ratio": [0.97, 0.99, 1.0, 1.02, 1.1]},
      "sharing":  {"slowdown": 0.4},
      "meta": {...anything, e.g. hardware and model...}
    }

    or "prefill": {"points": [[tokens, ms] or [tokens, cached_tokens, ms], ...]},
       "decode": {"points": [[batch, context_tokens, ms], ...]},
       "transfer": {"points": [[tokens, ms], ...]},
       "mixed": {"points": [[chunk_tokens, decode_rows, decode_context_tokens, ms], ...]}

prefill_ms(t, p) = base + per_token*t + per_token2*t^2 + per_cached_pair*p (t = tokens computed
in the batch; p = pairs of (computed token, cached prefix token it attends to): a prompt of n new
tokens after a prefix-cache hit of c tokens adds n*c). Prefill points with a cached prefix fit
per_cached_pair; without any, it is taken as 2*per_token2 (attention over c cached tokens costs
n*c, over its own n tokens causally about n^2/2);
decode_step_ms(b, c) = base + per_seq*b + per_context_token*c (c = total context in the batch);
transfer_ms(t) = base + per_token*t;
mixed_ms(t, r, c) = base + per_token*t + per_token2*t^2 + per_row*r + per_context_token*c: a
chunked-prefill step computing t prompt tokens (one chunk) alongside r decode rows holding c
context tokens in all (optional: without it the simulator composes a mixed step from the
prefill and decode curves); ``max_tokens``, the largest chunk it was measured at (from the points).

The optional ``overhead`` and ``spread`` sections (absent: none) are what the simulator adds to
the step costs, each a list of equally likely values (a number is a list of one) from which it
draws: ``request_ms``, a request's fixed cost outside the engine steps (HTTP in and out,
tokenising, routing, the worker admitting it); ``split_request_ms``, the same for a request
served by a prefill and a decode worker (the prefill hop, the KV connection, the decode worker
activating it; absent: ``request_ms``, plus ``handoff_ms`` when the KV has landed, the older
form, for models written before); ``request_per_inflight_ms`` and ``split_request_per_inflight_ms``
(a number, or one per value of the overhead they go with, quantile by quantile), what each
request already in flight (per decode or colocated worker) adds to a new request's overhead on
that path; ``step_ratio``, a step's
time over the model's prediction for it. ``sharing.slowdown`` (default 1) is how much two
workers on one GPU slow each other while both have a step in flight: each runs at
1 / (1 + slowdown * (k - 1)) of its speed with k steps in flight (1: the GPU time-sliced evenly).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

_SECTIONS = {
    "prefill": ("base_ms", "per_token_ms", "per_token2_ms", "per_cached_pair_ms"),
    "decode": ("base_ms", "per_seq_ms", "per_context_token_ms"),
    "transfer": ("base_ms", "per_token_ms"),
    "mixed": ("base_ms", "per_token_ms", "per_token2_ms", "per_row_ms", "per_context_token_ms"),
}
# sections of equally likely values: section -> {key: LatencyModel field}
_DRAWN = {
    "overhead": {"request_ms": "overhead_request_ms", "split_request_ms": "overhead_split_request_ms",
                 "handoff_ms": "overhead_handoff_ms",
                 "request_per_inflight_ms": "overhead_request_per_inflight_ms",
                 "split_request_per_inflight_ms": "overhead_split_request_per_inflight_ms"},
    "spread": {"step_ratio": "step_ratio"},
}
# single numbers in those sections (or one of their own): section -> {key: LatencyModel field}
_SCALARS = {
    "sharing": {"slowdown": "sharing_slowdown"},
}


def _values(section: str, key: str, value: Any) -> tuple[float, ...]:
    values = tuple(float(v) for v in (value if isinstance(value, list) else [value]))
    if not values:
        raise ValueError(f"latency model {section}.{key} is an empty list")
    return values


def _fit(section: str, points: list[list[float]]) -> dict[str, float]:
    """Least-squares coefficients (clipped at 0) for a section's measured points."""
    import numpy as np  # here: only fitting measured points needs it, not the router's hot path

    if section == "prefill":  # [tokens, ms] rows are [tokens, 0 cached, ms]
        points = [[row[0], 0.0, row[1]] if len(row) == 2 else row for row in points]
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2 or len(pts) < 2:
        raise ValueError(f"latency model {section}.points needs at least 2 rows")
    if section == "prefill":
        if pts.shape[1] != 3:
            raise ValueError("latency model prefill.points rows are [tokens, ms] or [tokens, cached, ms]")
        x, cached, y = pts[:, 0], pts[:, 1], pts[:, 2]
        columns = [np.ones_like(x), x, x * x]
        if cached.any():
            columns.append(x * cached)
        coef = np.linalg.lstsq(np.stack(columns, 1), y, rcond=None)[0].clip(min=0.0)
        if not cached.any():
            coef = np.append(coef, 2 * coef[2])
        return dict(zip(_SECTIONS[section], (float(c) for c in coef), strict=True))
    elif section == "decode":
        if pts.shape[1] != 3:
            raise ValueError("latency model decode.points rows are [batch, context_tokens, ms]")
        y = pts[:, 2]
        design = np.stack([np.ones(len(pts)), pts[:, 0], pts[:, 1]], 1)
    elif section == "mixed":
        if pts.shape[1] != 4:
            raise ValueError("latency model mixed.points rows are [chunk_tokens, decode_rows, context_tokens, ms]")
        t, y = pts[:, 0], pts[:, 3]
        design = np.stack([np.ones(len(pts)), t, t * t, pts[:, 1], pts[:, 2]], 1)
    else:
        x, y = pts[:, 0], pts[:, 1]
        design = np.stack([np.ones_like(x), x], 1)
    coef = np.linalg.lstsq(design, y, rcond=None)[0].clip(min=0.0)
    return dict(zip(_SECTIONS[section], (float(c) for c in coef), strict=True))


@dataclass(frozen=True)
class LatencyModel:
    prefill_base_ms: float = 5.0
    prefill_per_token_ms: float = 0.05
    prefill_per_token2_ms: float = 0.0
    prefill_per_cached_pair_ms: float = 0.0
    decode_base_ms: float = 8.0
    decode_per_seq_ms: float = 0.3
    decode_per_context_token_ms: float = 0.0005
    transfer_base_ms: float = 1.0
    transfer_per_token_ms: float = 0.01
    # a mixed chunked-prefill step; None: not profiled (the simulator composes one, sim/costs.py)
    mixed_base_ms: float | None = None
    mixed_per_token_ms: float = 0.0
    mixed_per_token2_ms: float = 0.0
    mixed_per_row_ms: float = 0.0
    mixed_per_context_token_ms: float = 0.0
    mixed_max_tokens: float | None = None  # the largest chunk profiled: the fit holds up to it
    overhead_request_ms: tuple[float, ...] = ()
    overhead_handoff_ms: tuple[float, ...] = ()
    overhead_split_request_ms: tuple[float, ...] = ()
    # what each request already in flight adds to a new one's overhead (the router's and the
    # workers' Python processes carry every open stream)
    overhead_request_per_inflight_ms: tuple[float, ...] = ()
    overhead_split_request_per_inflight_ms: tuple[float, ...] = ()
    step_ratio: tuple[float, ...] = ()
    sharing_slowdown: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (min(value, default=0) < 0 if isinstance(value, tuple) else value < 0):
                raise ValueError(f"latency model {f.name} must be >= 0, got {value}")
        for base, growth in ((self.overhead_request_ms, self.overhead_request_per_inflight_ms),
                             (self.overhead_split_request_ms, self.overhead_split_request_per_inflight_ms)):
            if len(growth) > 1 and len(growth) != len(base):
                raise ValueError("latency model overhead *_per_inflight_ms needs one value, or one per "
                                 "value of the overhead it goes with")
        if 0 in self.step_ratio:
            raise ValueError("latency model spread.step_ratio values must be > 0")

    def prefill_ms(self, tokens: float, cached_pairs: float = 0.0) -> float:
        """A prefill batch computing ``tokens`` tokens, whose tokens attend to cached prefix
        tokens ``cached_pairs`` times in all (n new tokens after a c-token hit: n*c)."""
        return (
            self.prefill_base_ms
            + self.prefill_per_token_ms * tokens
            + self.prefill_per_token2_ms * tokens**2
            + self.prefill_per_cached_pair_ms * cached_pairs
        )

    def decode_step_ms(self, batch: float, context_tokens: float) -> float:
        return self.decode_base_ms + self.decode_per_seq_ms * batch + self.decode_per_context_token_ms * context_tokens

    def transfer_ms(self, tokens: float) -> float:
        return self.transfer_base_ms + self.transfer_per_token_ms * tokens

    def mixed_ms(self, tokens: float, rows: float, context_tokens: float) -> float:
        """A chunked-prefill step: ``tokens`` prompt tokens with ``rows`` decode rows of
        ``context_tokens`` context in all (needs the ``mixed`` section)."""
        if self.mixed_base_ms is None:
            raise ValueError("this latency model has no mixed section (profile it with `splitserve profile`)")
        return (self.mixed_base_ms + self.mixed_per_token_ms * tokens + self.mixed_per_token2_ms * tokens**2
                + self.mixed_per_row_ms * rows + self.mixed_per_context_token_ms * context_tokens)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyModel:
        unknown = set(data) - set(_SECTIONS) - set(_DRAWN) - set(_SCALARS) - {"meta"}
        if unknown:
            raise ValueError(f"unknown latency model section(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for section in set(_DRAWN) | set(_SCALARS):
            sec = data.get(section) or {}
            drawn, scalars = _DRAWN.get(section, {}), _SCALARS.get(section, {})
            bad = set(sec) - set(drawn) - set(scalars)
            if bad:
                raise ValueError(f"unknown latency model field(s) in {section}: {', '.join(sorted(bad))}")
            values.update({drawn[k]: _values(section, k, v) for k, v in sec.items() if k in drawn})
            values.update({scalars[k]: float(v) for k, v in sec.items() if k in scalars})
        for section, keys in _SECTIONS.items():
            sec = data.get(section)
            if sec is None:
                continue
            coef = _fit(section, sec["points"]) if "points" in sec else dict(sec)
            if section == "mixed" and "points" in sec:
                coef["max_tokens"] = max(float(row[0]) for row in sec["points"])
            bad = set(coef) - set(keys) - ({"max_tokens"} if section == "mixed" else set())
            if bad:
                raise ValueError(f"unknown latency model field(s) in {section}: {', '.join(sorted(bad))}")
            values.update({f"{section}_{k}": float(v) for k, v in coef.items()})
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> LatencyModel:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot load latency model {path}: {exc}") from exc
