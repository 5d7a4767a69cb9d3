"""Fast failure: a request never waits out a timeout on a worker that is gone or hung when
another pair can serve it. Workers that are killed between two polls (connections refused),
hung (SIGSTOP: connections accepted, never answered) before or after their first token, or
slower than the prefill timeout: each request still gets its whole answer, within seconds, from
another pair; the retries and resumptions are counted. A worker that is slow but answers its
polls keeps its streams."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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
def stub_process(role: str, *args: str) -> Iterator[subprocess.Popen]:
    """A stub worker in its own process (to kill or stop), waiting long for KV (so a hung
    prefill is noticed by the router, not by decode giving up); ``args``: more of its options."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "splitserve.testing.stub_worker", "--role", role,
                             "--port", str(port), "--kv-wait", "60", *args], stdout=subprocess.DEVNULL)
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
def thread_stub(role: str, **behaviour) -> Iterator[tuple[ServerThread, StubBehaviour]]:
    b = StubBehaviour(role, wait_for_kv_s=60, **behaviour)
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


def _retries(url: str, reason: str, metric: str = "retries") -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(f'splitserve_router_{metric}_total{{reason="{reason}"}}'):
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


STREAM = {"model": "demo", "prompt": "x", "max_tokens": 8, "stream": True,
          "stream_options": {"include_usage": True}}


def _stream(url: str, after_first: Callable[[], None] = lambda: None) -> tuple[str, int, float]:
    """A streamed completion: its text, completion tokens, and the seconds from the first chunk
    (when ``after_first`` runs) to the end."""
    text, tokens, t0 = "", 0, None
    with httpx.stream("POST", url + "/v1/completions", json=STREAM, timeout=90) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            text += "".join(c["text"] for c in event["choices"])
            tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
            if t0 is None:
                t0 = time.monotonic()
                after_first()
    return text, tokens, time.monotonic() - t0


def test_a_decode_worker_hung_mid_stream_is_resumed_on_another(demo_model, caplog) -> None:
    """A decode worker SIGSTOPped after the first token of a stream (its connection stays open):
    once its polls go unanswered the router resumes the stream on the other decode worker from
    the tokens sent, and the client gets the same answer as without the fault, within seconds
    (not the 60 s stream idle timeout)."""
    with stub_process("decode", "--token-delay", "0.1", "--continues") as hung, thread_stub("prefill") as (p1, _), \
            thread_stub("decode", token_delay_s=0.1, continues_prompt=True) as (d1, other):
        # Polls give up after 0.5 s: the worker is marked before its stream has been silent for
        # the stall timeout, which the router then waits out (and no longer).
        with router(demo_model, [p1.url], [hung.url, d1.url], poll_interval_s=0.2, poll_timeout_s=0.5,
                    stream_stall_timeout_s=1.5) as url:
            reference = _stream(url)
            assert reference[1] == 8
            if not other.requests:  # round robin: the next stream starts on the worker to stop
                _stream(url)
            before = len(other.requests)
            text, tokens, seconds = _stream(url, lambda: os.kill(hung.pid, signal.SIGSTOP))
            assert (text, tokens) == reference[:2]
            assert 1.2 < seconds < 4, seconds  # about the stall timeout, not the 60 s idle timeout
            assert _retries(url, "stalled", "resumed") == 1
            assert len(other.requests) == before + 1  # the stream started on the stopped worker
            resumed = other.requests[-1]
            assert "-retry" in resumed["request_id"] and resumed["sampling"]["max_tokens"] < 8
            assert any(r.levelname == "WARNING" and "stalled" in r.getMessage() and hung.url in r.getMessage()
                       for r in caplog.records)


def test_a_slow_decode_worker_that_answers_its_polls_keeps_its_streams(demo_model) -> None:
    """Tokens far apart (longer than the stall timeout), but the worker answers /load: the
    stream stays on it, however long the silences."""
    with thread_stub("prefill") as (p1, _), thread_stub("decode", token_delay_s=1.0) as (d0, slow), \
            thread_stub("decode") as (d1, fast):
        with router(demo_model, [p1.url], [d0.url, d1.url], poll_interval_s=0.2, stream_stall_timeout_s=0.3) as url:
            for _ in range(2):  # round robin: one on each
                text, tokens, _ = _stream(url)
                assert tokens == 8
            assert len(slow.requests) == 1 and not slow.aborted
            assert _retries(url, "stalled", "resumed") == 0 and _retries(url, "failed", "resumed") == 0
            assert all("-retry" not in q["request_id"] for q in fast.requests)


def test_a_stream_that_flows_is_kept_though_its_worker_misses_polls(demo_model) -> None:
    """The decode worker's /load fails after the first token (the router marks it unhealthy),
    but its tokens keep coming, each sooner than the stall timeout: the stream stays on it."""
    with thread_stub("prefill") as (p1, _), thread_stub("decode", token_delay_s=0.3) as (d0, b0), \
            thread_stub("decode", token_delay_s=0.3) as (d1, b1):
        with router(demo_model, [p1.url], [d0.url, d1.url], poll_interval_s=0.1, stream_stall_timeout_s=1.0) as url:

            def polls_fail() -> None:
                b0.load_status = b1.load_status = 500

            text, tokens, seconds = _stream(url, polls_fail)
            assert tokens == 8 and seconds > 1.5  # marked unhealthy for most of the stream
            assert httpx.get(url + "/health").json()["workers"]["decode"]["healthy"] == 0
            assert _retries(url, "stalled", "resumed") == 0
            assert all("-retry" not in q["request_id"] for q in b0.requests + b1.requests)


def test_the_fault_timeouts_are_router_options() -> None:
    import argparse

    from splitserve.router.cli import config_from_args, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())

    def parse(*argv: str) -> RouterConfig:
        return config_from_args(parser.parse_args(["router", "--model", "m", "--decode", "http://d:1", *argv]))

    default = parse()
    assert (default.poll_timeout_s, default.stream_stall_timeout_s, default.stream_idle_timeout_s) == (2.0, 2.0, 60.0)
    cfg = parse("--poll-timeout", "0.5", "--stream-stall-timeout", "5", "--stream-idle-timeout", "30")
    assert (cfg.poll_timeout_s, cfg.stream_stall_timeout_s, cfg.stream_idle_timeout_s) == (0.5, 5.0, 30.0)
    for flag in ("--poll-timeout", "--stream-stall-timeout", "--stream-idle-timeout"):
        for bad in ("0", "nan", "inf"):
            with pytest.raises(ValueError, match="must be a number of seconds > 0 and finite"):
                parse(flag, bad)
