"""Results files and the comparison report, from synthetic runs (no server)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from splitserve.bench.records import RequestRecord
from splitserve.bench.report import build_report, resolve_slo
from splitserve.bench.results import clean_json, find_runs, run_path, write_run
from splitserve.bench.stats import SLO, summarize

DEFAULT_SLO = SLO(0.5, 0.05)


def fake_run(out: Path, label: str, rate: float, ttft: float, gpus: int | None = None,
             slo: SLO = DEFAULT_SLO) -> Path:
    """A run file whose requests all have TTFT ``ttft`` s and 20 ms gaps, 10 requests."""
    records = [RequestRecord(i, i / rate, 10, 5, sent_s=i / rate, ttft_s=ttft,
                             e2e_s=ttft + 0.08, itl_s=[0.02] * 4, output_tokens=5,
                             finish_reason="length") for i in range(10)]
    summary = summarize(records, slo)
    return write_run(run_path(out, label, "chat", rate), {
        "label": label, "server": {}, "num_gpus": gpus,
        "workload": {"name": "chat", "seed": 0}, "rate": rate,
        "run_seconds": summary["run_seconds"], "max_send_lag_s": 0.0, "summary": summary,
        "requests": [r.to_dict() for r in records],
    })


def test_report_goodput_per_system_and_files(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    # system "fast" meets TTFT 0.5 s at every rate; "slow" misses from rate 4 on
    for rate in (1.0, 2.0, 4.0):
        fake_run(runs, "fast", rate, 0.1, gpus=2)
        fake_run(runs, "slow", rate, 0.1 if rate < 4 else 0.9, gpus=2)
    results, slo, written = build_report([runs], tmp_path / "rep")
    by = {r.label: r for r in results}
    assert by["fast"].goodput.status == "above_range" and by["fast"].goodput.rate == 4.0
    # attainment 1.0 at 2 and 0.0 at 4: crosses 0.9 at 2.2
    assert by["slow"].goodput.rate == pytest.approx(2.2)
    assert by["slow"].goodput_per_gpu == pytest.approx(1.1)
    names = {p.name for p in written}
    assert {"report.json", "report.md", "attainment_chat.png", "cdf_chat_rate1.png"} <= names
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert doc["schema"] == "splitserve.bench.report/1"
    # judging by a looser TTFT makes "slow" meet everywhere
    results, _, _ = build_report([runs], tmp_path / "rep2", ttft_ms=1000, plots=False)
    assert all(r.goodput.status == "above_range" for r in results)


def test_runs_with_different_slos_need_an_explicit_one(tmp_path: Path) -> None:
    fake_run(tmp_path, "a", 1.0, 0.1, slo=SLO(0.5, 0.05))
    fake_run(tmp_path, "b", 1.0, 0.1, slo=SLO(0.6, 0.05))
    runs = find_runs([tmp_path])
    with pytest.raises(ValueError, match="ttft_ms"):
        resolve_slo(runs, None, None, None)
    assert resolve_slo(runs, 700, None, None) == SLO(0.7, 0.05, 0.9)


def test_find_runs_rejects_empty_folders_and_clean_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no splitserve.bench.run/1"):
        find_runs([tmp_path])
    assert clean_json({"a": [math.nan, math.inf, 1.0]}) == {"a": [None, "inf", 1.0]}
    # a round trip keeps every record field
    path = fake_run(tmp_path, "x", 3.0, 0.2)
    (run,) = find_runs([path])
    assert run.rate == 3.0 and run.records[0].itl_s == [0.02] * 4
