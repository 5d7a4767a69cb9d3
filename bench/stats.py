"""SLO statistics over measured requests: attainment, percentiles, goodput, SLO scale.

Pure functions in plain Python (no numpy), so each definition below is the whole truth about a
number in a report. Definitions:

- A request **meets the SLO** (TTFT target T, TPOT target P) when it finished without error,
  ``ttft <= T`` and ``tpot <= P``; ``tpot`` is ``RequestRecord.tpot_s`` (mean time per output
  token after the first). A request with a single output token has no TPOT and only needs TTFT.
  Failed requests always miss.
- **Attainment** = requests that meet / all requests sent (failures stay in the denominator).
- **Percentiles** use linear interpolation between order statistics (numpy's default method).
- **Goodput** over a rate sweep: see ``goodput``.
- **SLO scale** at one rate: see ``slo_scale``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from splitserve.bench.records import RequestRecord

DEFAULT_ATTAINMENT = 0.9
QUANTILES = (0.5, 0.9, 0.99)


@dataclass(frozen=True)
class SLO:
    """Latency targets in seconds; ``attainment`` is the fraction that must meet both."""

    ttft_s: float
    tpot_s: float
    attainment: float = DEFAULT_ATTAINMENT

    def __post_init__(self) -> None:
        if not self.ttft_s > 0:
            raise ValueError(f"ttft_s must be > 0, got {self.ttft_s}")
        if not self.tpot_s > 0:
            raise ValueError(f"tpot_s must be > 0, got {self.tpot_s}")
        if not 0 < self.attainment <= 1:
            raise ValueError(f"attainment must be in (0, 1], got {self.attainment}")

    def scaled(self, scale: float) -> SLO:
        """Both targets multiplied by ``scale`` (the 'SLO scale' axis of DistServe's plots)."""
        return SLO(self.ttft_s * scale, self.tpot_s * scale, self.attainment)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (q in [0, 1]) with linear interpolation; NaN for no values."""
    if not 0 <= q <= 1:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def distribution(values: Sequence[float], quantiles: Iterable[float] = QUANTILES) -> dict:
    """Count, mean, min, max and the named quantiles (keys ``p50``, ``p90``, ``p99``...)."""
    out: dict[str, float] = {"count": len(values)}
    out["mean"] = sum(values) / len(values) if values else math.nan
    out["min"] = min(values) if values else math.nan
    out["max"] = max(values) if values else math.nan
    for q in quantiles:
        out[f"p{q * 100:g}"] = percentile(values, q)
    return out


def meets(record: RequestRecord, slo: SLO) -> tuple[bool, bool]:
    """(meets TTFT, meets TPOT) for one request; a failed request meets neither."""
    if not record.ok:
        return False, False
    ttft_ok = record.ttft_s is not None and record.ttft_s <= slo.ttft_s
    tpot = record.tpot_s
    tpot_ok = tpot is None or tpot <= slo.tpot_s
    return ttft_ok, tpot_ok


def surely_misses(record: RequestRecord, slo: SLO) -> bool:
    """Whether a request still in flight already misses ``slo`` whatever happens next: it
    failed, its first token came after the TTFT target, or it finished and ``meets`` says so
    (a record only gains tokens and an end, and a failure never clears)."""
    if record.error is not None or (record.ttft_s is not None and record.ttft_s > slo.ttft_s):
        return True
    return record.e2e_s is not None and not all(meets(record, slo))


@dataclass(frozen=True)
class Attainment:
    """Fractions of all requests meeting TTFT, TPOT, and both."""

    both: float
    ttft: float
    tpot: float
    total: int


def attainment(records: Sequence[RequestRecord], slo: SLO) -> Attainment:
    """SLO attainment over all requests (failures count as misses); raises on no records."""
    if not records:
        raise ValueError("attainment needs at least one request record")
    flags = [meets(r, slo) for r in records]
    n = len(records)
    return Attainment(
        both=sum(t and p for t, p in flags) / n,
        ttft=sum(t for t, _ in flags) / n,
        tpot=sum(p for _, p in flags) / n,
        total=n,
    )


def required_scale(record: RequestRecord, slo: SLO) -> float:
    """Smallest factor s such that the request meets ``slo.scaled(s)``; inf if it failed."""
    if not record.ok or record.ttft_s is None:
        return math.inf
    need = record.ttft_s / slo.ttft_s
    tpot = record.tpot_s
    if tpot is not None:
        need = max(need, tpot / slo.tpot_s)
    return need


def slo_scale(records: Sequence[RequestRecord], slo: SLO) -> float:
    """Tightest common scale s of both targets that still gives ``slo.attainment``.

    Attainment of ``slo.scaled(s)`` is non-decreasing in s and each request meets it exactly
    when s >= its ``required_scale``, so the answer is the k-th smallest required scale with
    k = ceil(attainment * n): exact, no search. s < 1 means the SLO holds with room to spare;
    inf means too many requests failed outright.
    """
    if not records:
        raise ValueError("slo_scale needs at least one request record")
    needs = sorted(required_scale(r, slo) for r in records)
    k = math.ceil(slo.attainment * len(needs) - 1e-9)
    return needs[max(k, 1) - 1]


@dataclass(frozen=True)
class Goodput:
    """Result of ``goodput``.

    ``status``: ``"interpolated"`` (attainment crosses the target between two measured rates),
    ``"above_range"`` (every measured rate meets it: ``rate`` is the
    highest measured rate, a lower bound), ``"below_range"`` (the lowest measured rate already
    misses: ``rate`` is 0.0, the true value is below the lowest measured rate).
    """

    rate: float
    status: str
    target: float


def goodput(points: Sequence[tuple[float, float]], target: float = DEFAULT_ATTAINMENT) -> Goodput:
    """Goodput from a rate sweep: the highest rate up to which attainment stays >= ``target``.

    ``points`` are (offered rate in req/s, attainment of both targets) pairs, any order,
    distinct rates. Attainment between measured rates is taken as the straight line between
    neighbours. Precisely: goodput = sup{ r >= r_min : A(x) >= target for every x in
    [r_min, r] }, with A the piecewise-linear interpolant. It is the first downward crossing
    walking up from the lowest rate, so a lucky noisy point above a failing one cannot inflate
    it. Edge cases are flagged in ``Goodput.status``.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target must be in (0, 1], got {target}")
    if not points:
        raise ValueError("goodput needs at least one (rate, attainment) point")
    pts = sorted(points)
    rates = [r for r, _ in pts]
    if len(set(rates)) != len(rates):
        raise ValueError(f"duplicate rates in sweep: {rates}")
    if any(r <= 0 for r in rates):
        raise ValueError(f"rates must be > 0, got {rates}")
    if pts[0][1] < target:
        return Goodput(0.0, "below_range", target)
    for (r0, a0), (r1, a1) in zip(pts, pts[1:], strict=False):
        if a1 >= target:
            continue
        # a0 >= target > a1: the straight line crosses target in [r0, r1).
        return Goodput(r0 + (r1 - r0) * (a0 - target) / (a0 - a1), "interpolated", target)
    return Goodput(pts[-1][0], "above_range", target)


def summarize(
    records: Sequence[RequestRecord], slo: SLO, run_seconds: float | None = None
) -> dict:
    """The numbers one run (one system, one rate) reports; latencies in milliseconds.

    ``run_seconds`` (first send to last completion) gives the achieved throughputs; without it
    they are computed from the records' own send and finish times.
    """
    if not records:
        raise ValueError("summarize needs at least one request record")
    ok = [r for r in records if r.ok]
    ms = 1000.0
    ttft = [r.ttft_s * ms for r in ok if r.ttft_s is not None]
    tpot = [t * ms for r in ok if (t := r.tpot_s) is not None]
    e2e = [r.e2e_s * ms for r in ok if r.e2e_s is not None]
    gaps = [g * ms for r in ok for g in r.itl_s]
    if run_seconds is None:
        run_seconds = _span(records)
    att = attainment(records, slo)
    sent = [r for r in records if r.sent_s is not None]
    send_span = _send_span(sent)
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "num_requests": len(records),
        "num_ok": len(ok),
        "num_errors": len(records) - len(ok),
        "errors": _error_counts(records),
        "short_outputs": sum(1 for r in ok if r.output_tokens < r.max_tokens),
        "run_seconds": run_seconds,
        "achieved_rate": (len(sent) - 1) / send_span if send_span > 0 else math.nan,
        "request_throughput": len(ok) / run_seconds if run_seconds > 0 else math.nan,
        "output_token_throughput": out_tokens / run_seconds if run_seconds > 0 else math.nan,
        "ttft_ms": distribution(ttft),
        "tpot_ms": distribution(tpot),
        "itl_ms": distribution(gaps),
        "e2e_ms": distribution(e2e),
        "attainment": {"both": att.both, "ttft": att.ttft, "tpot": att.tpot},
        "slo_scale": slo_scale(records, slo),
        "slo": {"ttft_ms": slo.ttft_s * ms, "tpot_ms": slo.tpot_s * ms,
                "attainment": slo.attainment},
    }


def _span(records: Sequence[RequestRecord]) -> float:
    starts = [r.sent_s for r in records if r.sent_s is not None]
    ends = [r.sent_s + r.e2e_s for r in records if r.sent_s is not None and r.e2e_s is not None]
    if not starts or not ends:
        return 0.0
    return max(ends) - min(starts)


def _send_span(sent: Sequence[RequestRecord]) -> float:
    times = [r.sent_s for r in sent if r.sent_s is not None]
    return max(times) - min(times) if len(times) >= 2 else 0.0


def _error_counts(records: Sequence[RequestRecord]) -> dict[str, int]:
    """Errors grouped by their first 80 characters, so a report shows what went wrong."""
    counts: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            key = r.error[:80]
            counts[key] = counts.get(key, 0) + 1
        elif not r.ok:
            counts["no token received"] = counts.get("no token received", 0) + 1
    return counts
