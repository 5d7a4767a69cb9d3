"""The sweep script's system handling: parse, start, wait for /health, stop its process group."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest
from splitserve.bench.goodput import System, build_systems, parse_pairs, started


def test_build_systems_parses_and_validates() -> None:
    systems = build_systems(["a=run {port}"], ["b=http://h:1"], ["a=2"])
    assert systems == [System("a", command="run {port}", num_gpus=2),
                       System("b", url="http://h:1")]
    with pytest.raises(ValueError, match="duplicate"):
        build_systems(["a=x"], ["a=http://h:1"], [])
    with pytest.raises(ValueError, match="unknown"):
        build_systems(["a=x"], [], ["b=1"])
    with pytest.raises(ValueError, match="LABEL=VALUE"):
        parse_pairs(["nolabel"], "--system")
    with pytest.raises(ValueError, match="at least one"):
        build_systems([], [], [])


def test_started_waits_for_health_and_stops_the_process(tmp_path: Path) -> None:
    """A real child process (python's http.server serving a file named 'health')."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "health").write_text("ok")
    cmd = f"{sys.executable} -m http.server {{port}} --bind {{host}} --directory {site}"
    with started(System("web", command=cmd), "m", "m", tmp_path / "logs",
                 ready_timeout_s=30) as base:
        assert httpx.get(f"{base}/health", timeout=5).text == "ok"
        port = int(base.rsplit(":", 1)[1])
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    assert (tmp_path / "logs" / "web.log").exists()


def test_started_reports_a_system_that_dies(tmp_path: Path) -> None:
    cmd = f"{sys.executable} -c \"import sys; print('bad flag'); sys.exit(3)\""
    with pytest.raises(RuntimeError, match="exited with 3"), \
            started(System("bad", command=cmd), "m", "m", tmp_path, ready_timeout_s=30):
        pass
    assert os.path.exists(tmp_path / "bad.log")


def test_sweep_end_to_end_with_the_sse_test_double(tmp_path: Path) -> None:
    """Start the SSE test double as a system, sweep two rates, stop it, report."""
    from splitserve.bench.goodput import main

    double = Path(__file__).with_name("test_bench_loadgen.py")
    out = tmp_path / "sweep"
    rc = main([
        "--model", "demo", "--system", f"double={sys.executable} {double} {{port}}",
        "--gpus", "double=1", "--workloads", "code", "--rates", "10,20", "--num-requests", "4",
        "--max-input", "40", "--max-output", "3", "--ttft-ms", "5000", "--tpot-ms", "1000",
        "--warmup", "1", "--cooldown", "0", "--ready-timeout", "60", "--out", str(out),
        "--no-progress",
    ])
    assert rc == 0
    assert sorted(p.name for p in (out / "double").glob("*.json")) == \
        ["code_rate10.json", "code_rate20.json"]
    report = (out / "report" / "code" / "report.md").read_text()
    assert "| code | double | >=20.00 | >=20.00 |" in report
    assert (out / "report" / "code" / "attainment_code.png").exists()
