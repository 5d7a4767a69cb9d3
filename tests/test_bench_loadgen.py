"""The load generator against a real HTTP server, and the CLI end to end.

TEST DOUBLE: the server below is a minimal OpenAI-style ``/v1/completions`` SSE server written
for these tests (real FastAPI + uvicorn on a free port, real HTTP and SSE framing), not
splitserve's router. It emits ``max_tokens`` chunks at a fixed gap after a fixed first-token
delay, so the client's timing logic can be checked against known numbers.
``python tests/test_bench_loadgen.py PORT`` serves it standalone (the sweep test starts it so).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
from fastapi import FastAPI, Request  # noqa: E402  (module level: FastAPI resolves annotations)
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402

FIRST_TOKEN_S = 0.05
GAP_S = 0.01


def make_app(received: list[tuple[float, dict, dict]]) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        received.append((time.perf_counter(), body, dict(request.headers)))
        if "REJECT" in body["prompt"]:
            return JSONResponse({"error": {"message": "rejected"}}, status_code=400)
        n = int(body["max_tokens"])
        usage = (body.get("stream_options") or {}).get("include_usage", False)

        async def events() -> Iterator[str]:
            await asyncio.sleep(FIRST_TOKEN_S)
            for i in range(n):
                if i:
                    await asyncio.sleep(GAP_S)
                done = i == n - 1
                chunk = {"id": "x", "object": "text_completion", "model": body["model"],
                         "choices": [{"index": 0, "text": f" t{i}",
                                      "finish_reason": "length" if done else None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            if usage:
                chunk = {"id": "x", "choices": [], "usage": {
                    "prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture
def sse_server() -> Iterator[tuple[str, list]]:
    """The test-double server on a free port; yields (base_url, received requests)."""
    received: list[tuple[float, dict, dict]] = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(received), log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        if thread.is_alive():
            raise RuntimeError("test server did not stop")


def main(argv: list[str]) -> int:
    """The `splitserve bench` commands alone (the root CLI also imports every component)."""
    import argparse

    from splitserve.bench.cli import register

    parser = argparse.ArgumentParser(prog="splitserve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def _requests(n: int, spacing: float, max_tokens: int = 5, prompt: str = " hi"):
    from splitserve.bench.workloads import Request

    return [Request(i, i * spacing, prompt, 3, max_tokens) for i in range(n)]


def test_records_ttft_gaps_and_usage(sse_server) -> None:
    from splitserve.bench.loadgen import LoadConfig, run_load_sync

    url, received = sse_server
    cfg = LoadConfig(base_url=url, model="m", headers={"x-test": "1"})
    res = run_load_sync(_requests(3, 0.02, max_tokens=6), cfg, progress=False)
    assert [r.index for r in res.records] == [0, 1, 2]
    for r in res.records:
        assert r.ok, r.error
        assert r.output_tokens == 6 and r.prompt_tokens == 7  # from usage
        assert r.finish_reason == "length"
        assert len(r.itl_s) == 5
        assert FIRST_TOKEN_S * 0.9 <= r.ttft_s < FIRST_TOKEN_S + 0.5
        # single gaps can be ~0 when two chunks arrive in one TCP read; their mean cannot
        assert r.tpot_s >= GAP_S * 0.5
        assert r.tpot_s == pytest.approx(sum(r.itl_s) / 5)
        assert r.e2e_s == pytest.approx(r.ttft_s + sum(r.itl_s))
    body = received[0][1]
    assert received[0][2]["x-test"] == "1"
    assert body["ignore_eos"] is True and body["stream"] is True and body["max_tokens"] == 6
    assert body["stream_options"] == {"include_usage": True}


def test_open_loop_sends_on_schedule_while_others_stream(sse_server) -> None:
    """Each request takes ~0.45 s; 8 requests scheduled 20 ms apart must all leave within
    ~0.14 s + slack (generous: CI machines are loaded), not one after another (~3.6 s)."""
    from splitserve.bench.loadgen import LoadConfig, run_load_sync

    url, received = sse_server
    cfg = LoadConfig(base_url=url, model="m", include_usage=False)
    res = run_load_sync(_requests(8, 0.02, max_tokens=41), cfg, progress=False)
    assert all(r.ok for r in res.records)
    arrivals = sorted(t for t, _, _ in received)
    assert arrivals[-1] - arrivals[0] < 1.5
    for r in res.records:
        assert r.sent_s == pytest.approx(r.scheduled_s, abs=0.5)
        assert r.output_tokens == 41  # counted from chunks without usage
    assert res.run_seconds >= 0.14 + FIRST_TOKEN_S + 40 * GAP_S * 0.9


def test_errors_are_recorded_not_raised(sse_server) -> None:
    from splitserve.bench.loadgen import LoadConfig, run_load_sync

    url, _ = sse_server
    res = run_load_sync(_requests(1, 0.0, prompt=" REJECT"), LoadConfig(url, "m"),
                        progress=False)
    assert res.records[0].error.startswith("HTTP 400")
    # the whole request is bounded, not just each read (gaps here are 10 ms, total ~0.45 s)
    res = run_load_sync(_requests(1, 0.0, max_tokens=41),
                        LoadConfig(url, "m", request_timeout_s=0.2), progress=False)
    assert res.records[0].error.startswith("timeout") and not res.records[0].ok
    # nothing listening: connection refused is a recorded error too
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    res = run_load_sync(_requests(1, 0.0), LoadConfig(dead, "m", request_timeout_s=5),
                        progress=False)
    assert res.records[0].error and not res.records[0].ok


def test_config_validation_and_url() -> None:
    from splitserve.bench.loadgen import LoadConfig

    assert LoadConfig("http://h:1", "m").completions_url == "http://h:1/v1/completions"
    assert LoadConfig("http://h:1/v1/", "m").completions_url == "http://h:1/v1/completions"
    with pytest.raises(ValueError, match="base_url"):
        LoadConfig("h:1", "m")


def test_cli_run_two_systems_then_report(sse_server, tmp_path: Path) -> None:
    """`bench run` twice (two labels, same seed), then `bench report`: JSON, table, PNGs."""
    from splitserve.bench.results import find_runs

    url, received = sse_server
    out = tmp_path / "out"
    common = ["bench", "run", "--base-url", url, "--model", "m", "--workload", "chat",
              "--rates", "20,40", "--num-requests", "6", "--seed", "3", "--max-input", "50",
              "--max-output", "4", "--ttft-ms", "5000", "--tpot-ms", "1000", "--out", str(out),
              "--no-progress"]
    assert main(common + ["--label", "a", "--gpus", "2"]) == 0
    assert main(common + ["--label", "b", "--no-plots", "--slo-headers"]) == 0
    assert received[-1][2]["x-slo-tpot-ms"] == "1000" and "x-slo-tpot-ms" not in received[0][2]
    prompts = [b["prompt"] for _, b, _ in received]
    # both systems got the same requests (arrival order at the server may differ slightly)
    assert sorted(prompts[:12]) == sorted(prompts[12:]) and len(set(prompts)) > 1
    runs = find_runs([out])
    assert {(r.label, r.rate) for r in runs} == {("a", 20.0), ("a", 40.0), ("b", 20.0),
                                                   ("b", 40.0)}
    data = json.loads((out / "a" / "chat_rate20.json").read_text())
    assert data["summary"]["attainment"]["both"] == 1.0
    assert data["workload"]["seed"] == 3 and len(data["requests"]) == 6
    assert (out / "a" / "report_chat" / "attainment_chat.png").stat().st_size > 1000

    rep = tmp_path / "rep"
    assert main(["bench", "report", str(out / "a"), str(out / "b"), "--out", str(rep),
                 "--tpot-ms", "1"]) == 0
    report = json.loads((rep / "report.json").read_text())
    assert report["slo"]["tpot_ms"] == 1.0 and report["slo"]["ttft_ms"] == 5000.0
    systems = {s["label"]: s for s in report["systems"]}
    assert systems["a"]["num_gpus"] == 2
    # a 1 ms TPOT target cannot be met with ~10 ms gaps
    assert systems["b"]["goodput"]["status"] == "below_range"
    for name in ("attainment_chat.png", "cdf_chat_rate20.png", "cdf_chat_rate40.png"):
        assert (rep / name).stat().st_size > 1000
    assert "| chat | a |" in (rep / "report.md").read_text()


if __name__ == "__main__":  # the test double as a process, for tests/test_bench_sweep.py
    import sys

    uvicorn.run(make_app([]), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
