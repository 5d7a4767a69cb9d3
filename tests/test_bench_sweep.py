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
