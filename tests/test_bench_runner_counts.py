"""How many requests a rate sends (bench/runner.py requests_at): the sweep's time budget."""

from __future__ import annotations

import pytest
from splitserve.bench.loadgen import LoadConfig
from splitserve.bench.runner import RunSpec, requests_at


def test_a_duration_gives_each_rate_its_arrivals_within_the_bounds() -> None:
    assert requests_at(4.0, None, 200, 1000) == 200  # no duration: the fixed count
    assert requests_at(4.0, 30.0, 40, 1000) == 120
    assert requests_at(0.5, 30.0, 40, 1000) == 40  # the floor
    assert requests_at(64.0, 30.0, 40, 1000) == 1000  # the ceiling
    # The default split sweep (rates 1..16 req/s, 30 s each): about 30 s per rate, not 200 s at 1 req/s.
    seconds = sum(requests_at(r, 30.0, 40, 1000) / r for r in (1, 2, 4, 6, 8, 12, 16))
    assert seconds < 7 * 30 + 40


def test_run_spec_refuses_a_bad_duration_or_ceiling() -> None:
    load = LoadConfig("http://127.0.0.1:1/v1", "m")
    with pytest.raises(ValueError, match="duration"):
        RunSpec(load=load, workload="chat", rates=[1.0], num_requests=5, duration_s=0.0)
    with pytest.raises(ValueError, match="max_requests"):
        RunSpec(load=load, workload="chat", rates=[1.0], num_requests=50, max_requests=10)
