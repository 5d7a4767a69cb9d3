"""Sampling parameters: what a request asks of the sampler, as it travels router -> workers.

The router builds them from an OpenAI request; prefill and decode workers read them back with
``from_json``, which refuses, naming the field, every value the engine could not run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

MAX_LOGPROBS = 20  # most alternatives per token a request may ask logprobs for
MAX_INT64 = 2**63 - 1
# torch.Generator.manual_seed takes a signed or an unsigned 64-bit integer
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1
# Logits are divided by the temperature in float32: below MIN_TEMPERATURE they overflow to inf
# (and the softmax to NaN); above MAX_TEMPERATURE every row is uniform to float32's precision.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-6, 1e6


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    """An integer (not a bool, not a float) in [low, high], or ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value!r}")


def _check_number(name: str, value: Any) -> None:
    """A finite int or float (not a bool), or ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; n: the chosen token's logprob and the top n

    def __post_init__(self) -> None:
        """Refuse, naming the field, every value the engine cannot run: a bad value that got
        through would raise inside a step shared with other requests (a seed beyond 64 bits
        did: "Overflow when unpacking long long")."""
        for name in ("stop", "stop_token_ids"):  # lists from callers are kept as tuples
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_int("max_tokens", self.max_tokens, 1, MAX_INT64)
        _check_number("temperature", self.temperature)
        if self.temperature != 0 and not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(
                f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE:g} and "
                f"{MAX_TEMPERATURE:g}, got {self.temperature!r}"
            )
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        _check_int("top_k", self.top_k, -1, MAX_INT64)
        if self.top_k == 0:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, MIN_SEED, MAX_SEED)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if not isinstance(self.stop, tuple) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        if not isinstance(self.stop_token_ids, tuple):
            raise ValueError("stop_token_ids must be a list of token ids")
        for token in self.stop_token_ids:
            _check_int("stop_token_ids", token, 0, MAX_INT64)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_json(cls, data: Any) -> SamplingParams:
        """From the wire's JSON object; ValueError naming the field for anything the engine
        cannot run, or a field it does not know."""
        if not isinstance(data, dict):
            raise ValueError(f"sampling must be a JSON object, got {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown sampling field(s): {', '.join(sorted(unknown))}")
        values = dict(data)
        for name in ("stop", "stop_token_ids"):
            if name in values:
                raw = values[name]
                if raw is not None and not isinstance(raw, str | list | tuple):
                    raise ValueError(f"{name} must be a list, got {raw!r}")
                values[name] = tuple([raw] if isinstance(raw, str) else (raw or ()))
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": list(self.stop),
            "stop_token_ids": list(self.stop_token_ids),
            "ignore_eos": self.ignore_eos,
            "logprobs": self.logprobs,
        }
