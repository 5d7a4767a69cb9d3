"""One system, one workload, a list of rates: build requests, send them, write run files.

The glue between workloads, the load generator and the results files, shared by
``splitserve bench run`` and the sweep script (``bench/goodput.py``), so both write the same
files and a report cannot tell which produced them.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitserve.bench.loadgen import LoadConfig, run_load_sync
from splitserve.bench.report import SystemResult, build_report
from splitserve.bench.results import find_runs, run_path, write_run
from splitserve.bench.stats import SLO, summarize
from splitserve.bench.workloads import LengthCaps, Request, build_requests, get_workload

log = logging.getLogger("splitserve.bench")


def requests_at(rate: float, duration_s: float | None, min_requests: int, max_requests: int) -> int:
    """How many requests one rate sends: ``min_requests`` without a duration, else the arrivals
    of ``duration_s`` seconds at ``rate``, clamped to [min, max]. Equal time per rate keeps a
    sweep's length predictable (200 requests at 1 req/s are 200 s, at 16 req/s 12 s), while the
    floor keeps the low rates' attainment from resting on a handful of requests."""
    if duration_s is None:
        return min_requests
    return max(min_requests, min(max_requests, round(rate * duration_s)))


@dataclass(frozen=True)
class RunSpec:
    """Everything one sweep needs; validated when built."""

    load: LoadConfig
    workload: str
    rates: list[float]
    num_requests: int  # per rate; with duration_s, the least per rate
    seed: int = 0
    cv: float = 1.0
    caps: LengthCaps = field(default_factory=LengthCaps)
    tokenizer: str | None = None
    slo: SLO | None = None  # None: the workload's default
    out_dir: str = "bench/out"
    label: str = "system"
    num_gpus: int | None = None
    warmup: int = 0
    cooldown_s: float = 0.0
    progress: bool = True
    plots: bool = True
    duration_s: float | None = None  # arrivals per rate: rate x duration requests (see requests_at)
    max_requests: int = 1000

    def __post_init__(self) -> None:
        get_workload(self.workload)  # unknown name -> ValueError listing known ones
        if not self.rates or any(r <= 0 for r in self.rates):
            raise ValueError(f"rates must be a non-empty list of positive numbers: {self.rates}")
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration must be > 0, got {self.duration_s}")
        if self.max_requests < self.num_requests:
            raise ValueError(f"max_requests ({self.max_requests}) must be >= num_requests ({self.num_requests})")
        if self.warmup < 0 or self.cooldown_s < 0:
            raise ValueError("warmup and cooldown must be >= 0")
        if self.num_gpus is not None and self.num_gpus < 1:
            raise ValueError(f"num_gpus must be >= 1, got {self.num_gpus}")

    @property
    def effective_slo(self) -> SLO:
        """The given SLO, else the workload's default."""
        if self.slo is not None:
            return self.slo
        ttft, tpot = get_workload(self.workload).slo_ms
        return SLO(ttft / 1000, tpot / 1000)

    @classmethod
    def from_args(cls, args: argparse.Namespace, rates: list[float],
                  extra_body: dict[str, Any], headers: dict[str, str]) -> RunSpec:
        """Build from ``splitserve bench run`` arguments."""
        default_ttft, default_tpot = get_workload(args.workload).slo_ms
        ttft_ms = default_ttft if args.ttft_ms is None else args.ttft_ms
        tpot_ms = default_tpot if args.tpot_ms is None else args.tpot_ms
        if args.slo_headers:
            headers = {**headers, **slo_headers(ttft_ms, tpot_ms)}
        return cls(
            load=LoadConfig(
                base_url=args.base_url, model=args.model, ignore_eos=args.ignore_eos,
                include_usage=args.include_usage, temperature=args.temperature,
                request_timeout_s=args.timeout, api_key=args.api_key, extra_body=extra_body,
                headers=headers,
            ),
            workload=args.workload,
            rates=rates,
            num_requests=args.num_requests,
            seed=args.seed,
            cv=1.0 if args.arrival == "poisson" else args.cv,
            caps=LengthCaps(args.length_scale, args.max_input, args.max_output,
                            args.max_context),
            tokenizer=args.tokenizer,
            slo=SLO(ttft_ms / 1000, tpot_ms / 1000, args.attainment),
            out_dir=args.out,
            label=args.label,
            num_gpus=args.gpus,
            warmup=args.warmup,
            cooldown_s=args.cooldown,
            progress=args.progress,
            plots=args.plots,
        )


def slo_headers(ttft_ms: float, tpot_ms: float) -> dict[str, str]:
    """splitserve's per-request SLO headers (router/app.py reads them)."""
    return {"x-slo-ttft-ms": f"{ttft_ms:g}", "x-slo-tpot-ms": f"{tpot_ms:g}"}


def run_sweep(spec: RunSpec) -> tuple[list[SystemResult], SLO]:
    """Run every rate of ``spec`` in order, write one run file each, then report on all of
    this label's runs of this workload found in its folder (so a sweep split over several
    invocations still gives one goodput) into ``OUT/LABEL/report_<workload>/``."""
    slo = spec.effective_slo
    if spec.warmup:
        _warmup(spec)
    for i, rate in enumerate(spec.rates):
        if i and spec.cooldown_s:
            time.sleep(spec.cooldown_s)
        path = run_one(spec, rate, slo)
        log.info("rate %g: wrote %s", rate, path)
    label_dir = run_path(spec.out_dir, spec.label, spec.workload, 1.0).parent
    files = [r.path for r in find_runs([label_dir]) if r.workload == spec.workload]
    results, _, _ = build_report(files, label_dir / f"report_{spec.workload}",
                                 slo.ttft_s * 1000, slo.tpot_s * 1000, slo.attainment,
                                 plots=spec.plots)
    return results, slo


def run_one(spec: RunSpec, rate: float, slo: SLO) -> Path:
    """One rate: build the (seeded) requests, send them open-loop, write the run file."""
    n = requests_at(rate, spec.duration_s, spec.num_requests, spec.max_requests)
    reqs = build_requests(spec.workload, n, rate, spec.seed, spec.cv,
                          spec.caps, spec.tokenizer)
    result = run_load_sync(reqs.requests, spec.load, spec.progress,
                           f"{spec.label} {spec.workload} @ {rate:g}/s")
    summary = summarize(result.records, slo, result.run_seconds)
    if result.max_send_lag_s > 0.05:
        log.warning("sends ran up to %.0f ms late: the load generator itself is overloaded",
                    result.max_send_lag_s * 1000)
    if summary["short_outputs"]:
        log.warning("%d requests ended before max_tokens (server ignores ignore_eos?)",
                    summary["short_outputs"])
    return write_run(run_path(spec.out_dir, spec.label, spec.workload, rate), {
        "label": spec.label,
        "server": {"base_url": spec.load.base_url, "model": spec.load.model,
                   "ignore_eos": spec.load.ignore_eos, "extra_body": spec.load.extra_body,
                   "headers": sorted(spec.load.headers)},
        "num_gpus": spec.num_gpus,
        "workload": reqs.meta(),
        "rate": rate,
        "run_seconds": result.run_seconds,
        "max_send_lag_s": result.max_send_lag_s,
        "summary": summary,
        "requests": [r.to_dict() for r in result.records],
    })


def _warmup(spec: RunSpec) -> None:
    """A few short requests one at a time (compilation, caches), not recorded."""
    warm = [Request(i, 0.0, " hello world", 3, 8) for i in range(spec.warmup)]
    for req in warm:
        res = run_load_sync([req], spec.load, progress=False)
        if res.records[0].error:
            log.warning("warm-up request failed: %s", res.records[0].error)
