"""``splitserve router --workers N``: N processes share one port (SO_REUSEPORT), and whichever of
them answers a scrape reports the totals of all (prometheus_client's multiprocess directory),
so the operator's SLO loop reads the same numbers whatever process it reaches."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from splitserve.launcher.processes import wait_http_ok
from splitserve.launcher.up import free_port
from splitserve.testing.stub_worker import ServerThread, StubBehaviour, create_stub_app

pytestmark = pytest.mark.timeout(120)


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_processes_share_the_port_and_every_scrape_reports_the_totals(demo_model) -> None:
    leftovers = set(glob.glob(os.path.join(tempfile.gettempdir(), "splitserve-router-metrics-*")))
    decode = StubBehaviour("decode")
    with ServerThread(create_stub_app(StubBehaviour("prefill"))) as p, ServerThread(
        create_stub_app(decode)
    ) as d:
        decode.kv_endpoint = d.endpoint
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        router = subprocess.Popen([
            sys.executable, "-m", "splitserve.router", "--model", str(demo_model),
            "--served-model-name", "demo", "--port", str(port), "--workers", "2",
            "--prefill", p.url, "--decode", d.url, "--log-level", "WARNING",
        ])
        try:
            wait_http_ok(url + "/health", timeout=60)
            children = open(f"/proc/{router.pid}/task/{router.pid}/children").read().split()
            servers = [c for c in children if b"spawn_main" in open(f"/proc/{c}/cmdline", "rb").read()]
            assert len(servers) == 2  # (the other child is multiprocessing's resource tracker)
            body = {"model": "demo", "prompt": "hello there", "max_tokens": 3}
            for _ in range(20):  # a new connection each: the kernel spreads them over both
                r = httpx.post(url + "/v1/completions", json=body, headers={"Connection": "close"})
                assert r.status_code == 200, r.text
            prompt_tokens = r.json()["usage"]["prompt_tokens"]
            for _ in range(6):
                text = httpx.get(url + "/metrics", headers={"Connection": "close"}).text
                got = _samples(text)
                ok = (("endpoint", "/v1/completions"), ("outcome", "ok"))
                assert got[("splitserve_router_requests_total", ok)] == 20
                assert got[("splitserve_router_prompt_tokens_total", ())] == 20 * prompt_tokens
                assert got[("splitserve_router_inflight_sequences", ())] == 0
        finally:
            router.terminate()
            assert router.wait(timeout=30) == 0
    left = set(glob.glob(os.path.join(tempfile.gettempdir(), "splitserve-router-metrics-*")))
    assert left <= leftovers  # the shared metrics directory is removed on exit
