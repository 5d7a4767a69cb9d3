"""Fast failure: a request never waits out a timeout on a worker that is gone or hung when
another pair can serve it. Workers that are killed between two polls (connections refused),
hung (SIGSTOP: connections accepted, never answered) or slower than the prefill timeout: each
request still gets its answer, within seconds, from another pair; the retries are counted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from splitserve.launcher.processes import wait_http_ok
from splitserve.launcher.up import free_port
from splitserve.router.app import create_app
from splitserve.router.config import RouterConfig
from splitserve.router.processes import server_options
from splitserve.testing.stub_worker import ServerThread, StubBehaviour, create_stub_app

pytestmark = pytest.mark.timeout(90)

BODY = {"model": "demo", "prompt": "x", "max_tokens": 4}


@contextmanager
def stub_process(role: str) -> Iterator[subprocess.Popen]:
    """A stub worker in its own process (to kill or stop), waiting long for KV (so a hung
    prefill is noticed by the router, not by decode giving up)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "splitserve.testing.stub_worker", "--role", role,
                             "--port", str(port), "--kv-wait", "60"], stdout=subprocess.DEVNULL)
    proc.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    try:
        wait_http_ok(proc.url + "/health", timeout=30)  # type: ignore[attr-defined]
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(timeout=10)


@contextmanager
def thread_stub(role: str) -> Iterator[tuple[ServerThread, StubBehaviour]]:
    b = StubBehaviour(role, wait_for_kv_s=60)
    with ServerThread(create_stub_app(b)) as server:
        if role == "decode":
            b.kv_endpoint = server.endpoint
        yield server, b


@contextmanager
def router(demo_model, prefill: list[str], decode: list[str], **kw) -> Iterator[str]:
    cfg = RouterConfig(served_model_name="demo", model_dir=str(demo_model), prefill_urls=tuple(prefill),
                       decode_urls=tuple(decode), **kw)
    app = create_app(cfg)
    with ServerThread(app, **server_options(app)) as server:
        yield server.url


def _timed(url: str) -> float:
    t0 = time.monotonic()
    resp = httpx.post(url + "/v1/completions", json=BODY, timeout=30)
    assert resp.status_code == 200, resp.text
    return time.monotonic() - t0


def _retries(url: str, reason: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(f'splitserve_router_retries_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_workers_killed_between_polls_fail_over_at_once(demo_model) -> None:
    with stub_process("prefill") as p0, stub_process("decode") as d0, thread_stub("prefill") as (p1, _), \
            thread_stub("decode") as (d1, _):
        # Polls far apart: the router learns of the deaths only from the requests themselves.
        with router(demo_model, [p0.url, p1.url], [d0.url, d1.url], poll_interval_s=60) as url:
            assert _timed(url) < 5  # (everything warm)
            p0.kill()
            p0.wait()
            assert max(_timed(url) for _ in range(4)) < 1.0
            assert _retries(url, "prefill") == 1  # then the router knows p0 is down
            d0.kill()
            d0.wait()
            assert max(_timed(url) for _ in range(4)) < 1.0
            assert _retries(url, "decode") == 1


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_a_hung_worker_fails_over_as_soon_as_a_poll_marks_it(demo_model, role) -> None:
    with stub_process(role) as hung, thread_stub("prefill") as (p1, _), thread_stub("decode") as (d1, _):
        prefill = [hung.url, p1.url] if role == "prefill" else [p1.url]
        decode = [hung.url, d1.url] if role == "decode" else [d1.url]
        with router(demo_model, prefill, decode, poll_interval_s=0.2) as url:
            assert _timed(url) < 5
            os.kill(hung.pid, signal.SIGSTOP)  # accepts connections (the kernel does), answers nothing
            # Round robin sends one of these to the hung worker before any poll has noticed;
            # it fails over once a poll times out (~2 s), not after the 120 s prefill timeout.
            assert max(_timed(url) for _ in range(2)) < 5
            assert _retries(url, role) == 1
            health = httpx.get(url + "/health").json()["workers"][role]
            assert health == {"healthy": 1, "total": 2}


def test_a_prefill_that_times_out_is_retried_on_another_pair(demo_model) -> None:
    with thread_stub("prefill") as (p0, slow), thread_stub("prefill") as (p1, _), thread_stub("decode") as (d0, _):
        slow.prefill_delay_s = 3.0
        with router(demo_model, [p0.url, p1.url], [d0.url], prefill_timeout_s=1.0, poll_interval_s=0.2) as url:
            times = [_timed(url) for _ in range(2)]
            assert max(times) < 2.5, times
            assert len(slow.requests) == 1 and _retries(url, "prefill") == 1
