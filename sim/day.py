"""A day of traffic, time-compressed: a diurnal request rate with bursts, as a request list.

The shape (an assumption: ``../shared/notes/workloads.md`` summarises one-hour Azure traces, not
a day): a trough at 03:00 at ``trough`` x the peak, a smooth rise through the morning to a peak
at 15:00, and ``bursts`` seeded bursts that multiply the rate by 1.4-2x (``burst_max``) for 5-30 minutes (the
Azure code trace swings from 15 to 632 requests a minute). Arrivals are a renewal process of
Gamma gaps with coefficient of variation ``cv`` (the conversation trace's is about 1.09) mapped
through the rate's cumulative intensity, so the rate at each moment is the envelope's; prompt
and output lengths are the bench workload's (``bench/workloads.py``).

Time compression: the day's 24 hours pass in ``86_400 / compress`` simulated seconds while the
rate (requests per simulated second) keeps its real value, so each request's own life
(queueing, prefill, decode) is real-sized; the control loop's clocks (planner tick, windows,
cooldowns, pod start time) are divided by the same factor (``sim/autoscale.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from splitserve.bench.workloads import LengthCaps, get_workload, sample_lengths
from splitserve.sim.cluster import SimRequest

DAY_S = 86_400.0
_BURSTS = 31  # seed stream of the bursts (the bench's streams use small integers too)
_ARRIVALS = 32


@dataclass(frozen=True)
class Burst:
    start_h: float
    hours: float
    factor: float


@dataclass(frozen=True)
class DayShape:
    """The rate over one (real) day, in requests per second."""

    peak_rate: float
    trough: float = 0.25  # the night's rate over the afternoon peak's
    peak_hour: float = 15.0
    bursts: tuple[Burst, ...] = ()

    def __post_init__(self) -> None:
        if not self.peak_rate > 0 or not 0 < self.trough <= 1:
            raise ValueError("peak_rate must be > 0 and trough in (0, 1]")

    @classmethod
    def seeded(cls, peak_rate: float, seed: int, bursts: int = 6, trough: float = 0.25,
               burst_max: float = 2.0) -> DayShape:
        """Bursts at seeded times, 5-30 minutes long, of 1.4x up to ``burst_max`` x the rate."""
        rng = np.random.default_rng([seed, _BURSTS])
        out = tuple(Burst(float(rng.uniform(0, 23.5)), float(rng.uniform(5, 30)) / 60,
                          float(rng.uniform(1.4, max(1.4, burst_max)))) for _ in range(bursts))
        return cls(peak_rate, trough, bursts=tuple(sorted(out, key=lambda b: b.start_h)))

    def base(self, hour: float) -> float:
        """The diurnal envelope without bursts: a raised cosine, flattened at night."""
        s = 0.5 - 0.5 * math.cos(2 * math.pi * (hour - self.peak_hour + 12) / 24)
        return self.peak_rate * (self.trough + (1 - self.trough) * s**1.5)

    def rate(self, hour: float) -> float:
        factor = 1.0
        for b in self.bursts:
            if b.start_h <= hour % 24 < b.start_h + b.hours:
                factor = max(factor, b.factor)
        return self.base(hour) * factor

    def max_rate(self, step_h: float = 1 / 60) -> float:
        return max(self.rate(i * step_h) for i in range(int(24 / step_h)))


def day_requests(shape: DayShape, workload: str, compress: float, seed: int, cv: float = 1.09,
                 caps: LengthCaps | None = None, step_s: float = 1.0) -> list[SimRequest]:
    """The day's requests, arrival times in simulated seconds (see the module docstring)."""
    if not compress >= 1:
        raise ValueError(f"compress must be >= 1, not {compress}")
    span = DAY_S / compress
    grid = np.arange(0.0, span + step_s, step_s)
    rates = np.array([shape.rate(t * compress / 3600) for t in grid])
    cum = np.concatenate([[0.0], np.cumsum((rates[1:] + rates[:-1]) / 2 * step_s)])
    rng = np.random.default_rng([seed, _ARRIVALS])
    k = 1.0 / (cv * cv)
    n_max = int(cum[-1] * 1.2) + 100
    units = np.cumsum(rng.gamma(k, 1.0 / k, size=n_max))
    units = units[units < cum[-1]]
    arrivals = np.interp(units, cum, grid)
    inputs, outputs = sample_lengths(get_workload(workload), max(len(arrivals), 1), seed, caps)
    return [SimRequest(i, float(t), int(inputs[i]), int(outputs[i])) for i, t in enumerate(arrivals)]
