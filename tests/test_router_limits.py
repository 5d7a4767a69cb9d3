"""The router's limits against a real router process (``python -m splitserve.router``) and raw
sockets, as a hostile or unlucky client would use them: a huge body sent slowly, a half-sent
request line, idle sockets, more connections than allowed, huge headers, too many sequences.
Each is refused with a clear status, counted by reason, and never freezes the router: /health
answers within a second throughout."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from services import stub_router

pytestmark = pytest.mark.timeout(90)

MAX_BODY = 1024 * 1024
LIMITS = ["--max-body-bytes", str(MAX_BODY), "--max-sequences", "8", "--max-connections", "32",
          "--header-timeout", "1", "--body-timeout", "2", "--keep-alive-timeout", "1.5"]


@pytest.fixture(scope="module")
def router(demo_model) -> Iterator[tuple[str, subprocess.Popen]]:
    with stub_router(demo_model, *LIMITS) as running:
        yield running


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def _refused(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {s.labels["reason"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "splitserve_router_refused_total"}


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _health_latencies(url: str, stop: threading.Event) -> list[float]:
    out = []
    while not stop.is_set():
        t0 = time.monotonic()
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        out.append(time.monotonic() - t0)
        time.sleep(0.05)
    return out


def test_a_huge_body_sent_slowly_is_cut_off_at_the_limit_and_health_stays_responsive(router) -> None:
    url, proc = router
    rss0 = _rss_mb(proc.pid)
    sock = _connect(url)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"transfer-encoding: chunked\r\n\r\n")
    piece = b'{"model": "demo", "prompt": "' + b"a" * 65536
    sent, stop = 0, threading.Event()
    health: list[float] = []
    poller = threading.Thread(target=lambda: health.extend(_health_latencies(url, stop)))
    poller.start()
    try:
        while sent < 50 * 1024 * 1024:
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
            time.sleep(0.002)
        pytest.fail("the router read 50 MB of a body limited to 1 MiB")
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        stop.set()
        poller.join()
    # Cut off after the limit plus what the sockets' buffers held, nowhere near 50 MB.
    assert sent < 16 * 1024 * 1024, sent
    assert health and max(health) < 1.0, max(health)
    assert _rss_mb(proc.pid) - rss0 < 100
    assert _refused(url).get("body_too_large", 0) >= 1


def test_a_declared_oversized_body_is_refused_before_it_is_sent(router) -> None:
    url, _ = router
    sock = _connect(url)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: 52428800\r\n\r\n")
    head = _response(sock)
    assert head.startswith(b"HTTP/1.1 413") and b'"code":"body_too_large"' in head, head
    assert httpx.post(url + "/v1/completions", json={"model": "demo", "prompt": "x" * (MAX_BODY + 1)}).status_code == 413


def test_half_a_request_line_is_disconnected_after_the_header_timeout(router) -> None:
    url, _ = router
    before = _refused(url).get("header_timeout", 0)
    sock = _connect(url)
    t0 = time.monotonic()
    sock.sendall(b"POST /v1/compl")
    answer = _response(sock)
    assert answer.startswith(b"HTTP/1.1 408") and 0.8 < time.monotonic() - t0 < 3, answer
    # A stalled body: its deadline is the endpoint's (408, OpenAI's error shape).
    sock = _connect(url)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: 100\r\n\r\n{\"model\"")
    t0 = time.monotonic()
    answer = _response(sock)
    assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer and time.monotonic() - t0 < 4, answer
    assert _refused(url)["header_timeout"] == before + 1


def test_idle_connections_are_closed(router) -> None:
    url, _ = router
    sock = _connect(url)
    t0 = time.monotonic()
    assert _response(sock) == b"" and 1.0 < time.monotonic() - t0 < 4  # never sent a byte
    with httpx.Client() as c:  # between two requests on a kept-alive connection
        assert c.get(url + "/health").status_code == 200
        time.sleep(2.5)
        assert c.get(url + "/health").status_code == 200  # (httpx reconnects)
    assert _refused(url)["idle_timeout"] >= 2


def test_connections_beyond_the_cap_get_503_at_once_and_the_router_recovers(router) -> None:
    url, _ = router
    idle = [_connect(url) for _ in range(32)]
    time.sleep(0.2)
    try:
        extra = _connect(url)
        t0 = time.monotonic()
        answer = _response(extra)
        assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer, answer
        assert time.monotonic() - t0 < 1
    finally:
        for s in idle:
            s.close()
    time.sleep(0.3)
    assert httpx.get(url + "/health", timeout=2).status_code == 200
    assert _refused(url)["too_many_connections"] >= 1


def test_huge_headers_are_431(router) -> None:
    url, _ = router
    for size in (100_000, 300_000):  # whole headers in one piece; and arriving piece by piece
        sock = _connect(url)
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n" + b"x-junk: " + b"a" * size + b"\r\n\r\n")
        assert _response(sock).startswith(b"HTTP/1.1 431")
    assert httpx.get(url + "/health", headers={"x-ok": "a" * 30_000}).status_code == 200


def test_prompts_times_n_is_limited(router) -> None:
    url, _ = router
    resp = httpx.post(url + "/v1/completions", json={"model": "demo", "prompt": ["a", "b", "c"], "n": 3})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "n"
    assert resp.json()["error"]["code"] == "too_many_sequences"
    ok = httpx.post(url + "/v1/completions", json={"model": "demo", "prompt": ["a", "b"], "n": 4, "max_tokens": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 8
    assert _refused(url)["too_many_sequences"] == 1
