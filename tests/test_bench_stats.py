"""Statistics of the benchmark on synthetic request records (no server involved)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from splitserve.bench.records import RequestRecord
from splitserve.bench.stats import (
    SLO,
    attainment,
    distribution,
    goodput,
    percentile,
    required_scale,
    slo_scale,
    summarize,
)


def rec(i: int, ttft: float | None, tpot: float | None, n_out: int = 11,
        error: str | None = None) -> RequestRecord:
    """A finished request with the given TTFT and a constant inter-token gap ``tpot``."""
    if ttft is None:
        return RequestRecord(i, float(i), 10, n_out, sent_s=float(i), error=error or "boom")
    gaps = [tpot] * (n_out - 1) if tpot is not None else []
    return RequestRecord(
        index=i, scheduled_s=float(i), prompt_tokens=10, max_tokens=n_out, sent_s=float(i),
        ttft_s=ttft, e2e_s=ttft + sum(gaps), itl_s=gaps, output_tokens=n_out,
        finish_reason="length", error=error,
    )


def test_percentile_matches_numpy_linear() -> None:
    rng = np.random.default_rng(0)
    values = list(rng.exponential(1.0, size=101))
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q * 100)))
    assert math.isnan(percentile([], 0.5))
    with pytest.raises(ValueError, match="quantile"):
        percentile([1.0], 1.5)
    d = distribution([1.0, 2.0, 3.0])
    assert d["p50"] == 2.0 and d["mean"] == 2.0 and d["count"] == 3


def test_tpot_is_mean_gap_and_undefined_for_one_token() -> None:
    r = rec(0, 0.1, 0.02, n_out=5)
    assert r.tpot_s == pytest.approx(0.02)
    assert rec(1, 0.1, None, n_out=1).tpot_s is None
    assert rec(2, None, None).tpot_s is None


def test_attainment_counts_failures_as_misses() -> None:
    slo = SLO(ttft_s=0.2, tpot_s=0.05)
    records = [
        rec(0, 0.1, 0.01),   # meets both
        rec(1, 0.3, 0.01),   # TTFT miss
        rec(2, 0.1, 0.10),   # TPOT miss
        rec(3, 0.1, None, n_out=1),  # single token: only TTFT applies -> meets
        rec(4, None, None),  # failed
    ]
    att = attainment(records, slo)
    assert att.both == pytest.approx(2 / 5)
    assert att.ttft == pytest.approx(3 / 5)
    assert att.tpot == pytest.approx(3 / 5)
    with pytest.raises(ValueError):
        attainment([], slo)
    with pytest.raises(ValueError, match="ttft_s"):
        SLO(0, 1)


def test_goodput_interpolates_first_crossing() -> None:
    pts = [(1.0, 1.0), (2.0, 0.95), (4.0, 0.85), (8.0, 0.2)]
    g = goodput(pts)
    # line from (2, .95) to (4, .85) crosses .9 at 3
    assert g.status == "interpolated" and g.rate == pytest.approx(3.0)
    # unsorted input, same answer
    assert goodput(list(reversed(pts))).rate == pytest.approx(3.0)
    # exactly on target at a measured point
    assert goodput([(1.0, 0.9), (2.0, 0.5)]).rate == pytest.approx(1.0)


def test_goodput_ignores_noisy_recovery_and_flags_edges() -> None:
    # attainment dips below the target at 4 and "recovers" at 8: the first crossing counts
    g = goodput([(2.0, 0.95), (4.0, 0.85), (8.0, 0.99)])
    assert g.status == "interpolated" and 2.0 < g.rate < 4.0
    assert goodput([(1.0, 0.99), (2.0, 0.95)]) .status == "above_range"
    assert goodput([(1.0, 0.99), (2.0, 0.95)]).rate == 2.0
    low = goodput([(1.0, 0.5), (2.0, 0.1)])
    assert low.status == "below_range" and low.rate == 0.0
    with pytest.raises(ValueError, match="duplicate"):
        goodput([(1.0, 1.0), (1.0, 0.5)])
    with pytest.raises(ValueError):
        goodput([])
    assert goodput([(1.0, 0.8), (2.0, 0.6)], target=0.7).rate == pytest.approx(1.5)


def test_slo_scale_is_tightest_factor_keeping_attainment() -> None:
    slo = SLO(ttft_s=1.0, tpot_s=0.1)
    rng = np.random.default_rng(1)
    records = [rec(i, float(rng.uniform(0.1, 2.0)), float(rng.uniform(0.01, 0.2)))
               for i in range(50)]
    s = slo_scale(records, slo)
    assert attainment(records, slo.scaled(s)).both >= 0.9
    assert attainment(records, slo.scaled(s * 0.999)).both < 0.9
    # the per-request need is the worse of the two ratios
    assert required_scale(rec(0, 0.5, 0.3), slo) == pytest.approx(3.0)
    # more than 10% failures: no scale helps
    failing = records[:40] + [rec(100 + i, None, None) for i in range(10)]
    assert slo_scale(failing, slo) == math.inf


def test_summarize_reports_quantiles_throughput_and_errors() -> None:
    slo = SLO(0.5, 0.05)
    records = [rec(i, 0.1 * (i + 1), 0.01 * (i + 1)) for i in range(9)] + [
        rec(9, None, None, error="HTTP 503: full")
    ]
    s = summarize(records, slo)
    assert s["num_requests"] == 10 and s["num_ok"] == 9 and s["num_errors"] == 1
    assert s["errors"] == {"HTTP 503: full": 1}
    assert s["ttft_ms"]["p50"] == pytest.approx(500.0)
    assert s["tpot_ms"]["p90"] == pytest.approx(percentile([10.0 * (i + 1) for i in range(9)], 0.9))
    # meets both: TTFT <= .5 (i <= 4) and TPOT <= .05 (i <= 4) -> 5 of 10
    assert s["attainment"]["both"] == pytest.approx(0.5)
    assert s["achieved_rate"] == pytest.approx(1.0)  # sent at 0, 1, ..., 9 s
    assert s["itl_ms"]["count"] == 90
    assert s["short_outputs"] == 0
