"""The router's HTTP API through a real uvicorn server, with the real ``openai`` client, in front
of stub workers that speak the Worker HTTP API (testing/stub_worker.py): results, streaming,
``n``, stop strings, usage, every 4xx path, API keys, and failures (prefill refuses, decode dies
mid-stream or is killed) - the client gets its answer from another worker, or a clear error
promptly, never a hang."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from splitserve.launcher.processes import wait_http_ok
from splitserve.launcher.up import free_port
from splitserve.router.app import create_app
from splitserve.router.config import RouterConfig
from splitserve.router.processes import server_options
from splitserve.router.tokenizer import RouterTokenizer
from splitserve.testing.stub_worker import ServerThread, StubBehaviour, create_stub_app

pytestmark = pytest.mark.timeout(60)

OUTPUT_TEXT = "Hello world, how are you today? Fine!"


@pytest.fixture(scope="module")
def tok(demo_model: Path) -> RouterTokenizer:
    return RouterTokenizer(demo_model)


@pytest.fixture(scope="module")
def workers(tok: RouterTokenizer) -> Iterator[dict[str, tuple[ServerThread, StubBehaviour]]]:
    """Two prefill and two decode stubs, shared by the module; behaviours reset per test."""
    out = {}
    with ServerThread(create_stub_app(b0 := StubBehaviour("prefill"))) as p0, ServerThread(
        create_stub_app(b1 := StubBehaviour("prefill"))
    ) as p1, ServerThread(create_stub_app(b2 := StubBehaviour("decode"))) as d0, ServerThread(
        create_stub_app(b3 := StubBehaviour("decode"))
    ) as d1:
        out = {"p0": (p0, b0), "p1": (p1, b1), "d0": (d0, b2), "d1": (d1, b3)}
        yield out


@pytest.fixture(autouse=True)
def _reset(workers, tok: RouterTokenizer) -> None:
    ids = tok.encode(OUTPUT_TEXT, add_special_tokens=False)
    for server, b in workers.values():
        fresh = StubBehaviour(b.role, output_token_ids=ids, stop_strings_from=tok)
        if b.role == "decode":
            fresh.kv_endpoint = server.endpoint
        b.__dict__.update(fresh.__dict__)


@contextmanager
def router(demo_model: Path, workers, prefill=("p0", "p1"), decode=("d0", "d1"), **kw) -> Iterator[ServerThread]:
    cfg = RouterConfig(
        served_model_name="demo",
        model_dir=str(demo_model),
        prefill_urls=tuple(workers[n][0].url for n in prefill),
        decode_urls=tuple(workers[n][0].url for n in decode),
        poll_interval_s=0.2,
        **kw,
    )
    app = create_app(cfg)
    with ServerThread(app, **server_options(app)) as server:  # the limits `splitserve router` has
        yield server


def client(server: ServerThread, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=20)


def test_completion_chat_and_usage(demo_model, workers, tok) -> None:
    with router(demo_model, workers) as r:
        c = client(r)
        out = c.completions.create(model="demo", prompt="Tell me a story", max_tokens=5, temperature=0)
        expected = tok.decode(tok.encode(OUTPUT_TEXT, add_special_tokens=False)[:5])
        assert out.choices[0].text == expected and out.choices[0].finish_reason == "length"
        assert out.usage.prompt_tokens == len(tok.encode("Tell me a story"))
        assert out.usage.completion_tokens == 5 and out.usage.total_tokens == out.usage.prompt_tokens + 5
        messages = [{"role": "user", "content": "hi"}]
        chat = c.chat.completions.create(model="demo", messages=messages, max_tokens=200)
        assert (OUTPUT_TEXT * 20).startswith(chat.choices[0].message.content)
        assert chat.choices[0].message.role == "assistant"
        assert chat.usage.prompt_tokens == len(tok.encode_chat(messages))
        # The decode stub saw the chat-templated prompt and the right sampling JSON.
        sent = workers["d0"][1].requests + workers["d1"][1].requests
        assert tok.encode_chat(messages) in [r["token_ids"] for r in sent]
        assert all(r["recompute"] is False for r in sent)
        prefill_sent = workers["p0"][1].requests + workers["p1"][1].requests
        assert {r["decode_kv_endpoint"] for r in prefill_sent} <= {workers["d0"][0].endpoint, workers["d1"][0].endpoint}
        assert c.models.list().data[0].id == "demo"


def test_max_tokens_defaults_to_remaining_context(demo_model, workers, tok) -> None:
    with router(demo_model, workers) as r:
        client(r).completions.create(model="demo", prompt="abc")
        sent = workers["d0"][1].requests + workers["d1"][1].requests
        assert sent[-1]["sampling"]["max_tokens"] == 1024 - len(tok.encode("abc"))


def test_streaming_chat_with_usage(demo_model, workers) -> None:
    with router(demo_model, workers) as r:
        stream = client(r).chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert OUTPUT_TEXT.startswith(text) and len(text) > 5
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
        raw = httpx.post(r.url + "/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 3, "stream": True})
        events = [line for line in raw.text.split("\n\n") if line]
        assert events[-1] == "data: [DONE]" and raw.headers["content-type"].startswith("text/event-stream")
        assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_a_chunk_per_token_even_while_a_character_is_incomplete(demo_model, workers, tok) -> None:
    """Each euro sign is three byte-level tokens: the text of the first two is held back, but
    their chunks still stream (empty text), so a client sees every token as it is made."""
    ids = tok.encode("\u20ac" * 4, add_special_tokens=False)
    assert len(ids) == 12
    for _, b in workers.values():
        b.output_token_ids, b.token_delay_s = ids, 0.02  # tokens apart, as an engine makes them
    with router(demo_model, workers) as r:
        stream = client(r).completions.create(model="demo", prompt="x", max_tokens=6, stream=True)
        chunks = [ch for ch in stream if ch.choices]
    assert len(chunks) == 6
    assert "".join(ch.choices[0].text for ch in chunks) == "\u20ac\u20ac"
    assert [ch.choices[0].text for ch in chunks[:2]] == ["", ""]

def test_n_and_batched_prompts(demo_model, workers) -> None:
    with router(demo_model, workers) as r:
        out = client(r).completions.create(model="demo", prompt=["a b", "c d e"], n=2, max_tokens=4, seed=11)
        assert sorted(ch.index for ch in out.choices) == [0, 1, 2, 3]
        assert out.usage.completion_tokens == 16
        sent = workers["d0"][1].requests + workers["d1"][1].requests
        assert sorted(s["sampling"]["seed"] for s in sent) == [11, 12, 13, 14]
        assert len({s["request_id"] for s in sent}) == 4
        stream = client(r).chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "x"}], n=3, max_tokens=5, stream=True
        )
        finished = {ch.choices[0].index for ch in stream if ch.choices and ch.choices[0].finish_reason}
        assert finished == {0, 1, 2}


def test_stop_strings_cut_the_text(demo_model, workers) -> None:
    with router(demo_model, workers) as r:
        c = client(r)
        out = c.completions.create(model="demo", prompt="x", max_tokens=50, stop=["you"])
        assert out.choices[0].text == "Hello world, how are " and out.choices[0].finish_reason == "stop"
        stream = c.completions.create(model="demo", prompt="x", max_tokens=50, stop=[", how"], stream=True)
        chunks = list(stream)
        assert "".join(ch.choices[0].text for ch in chunks) == "Hello world"
        assert chunks[-1].choices[0].finish_reason == "stop"


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_bad_input_gets_clear_4xx(demo_model, workers) -> None:
    with router(demo_model, workers) as r:
        url = r.url + "/v1/completions"
        ok = {"model": "demo", "prompt": "hello"}
        err = _error(httpx.post(url, content=b'{"model": "demo", "prompt": ', headers={"content-type": "application/json"}), 400)
        assert "not valid JSON" in err["message"]
        assert "JSON object" in _error(httpx.post(url, content=b"[1, 2]", headers={"content-type": "application/json"}), 400)["message"]
        err = _error(httpx.post(url, json=ok | {"model": "gpt-4"}), 404)
        assert err["code"] == "model_not_found" and "gpt-4" in err["message"]
        err = _error(httpx.post(url, json=ok | {"prompt": "hello " * 1100}), 400)
        assert "maximum context length is 1024" in err["message"]
        err = _error(httpx.post(url, json=ok | {"max_tokens": 0}), 400)
        assert "max_tokens" in err["message"] and err["param"] == "max_tokens"
        err = _error(httpx.post(url, json=ok | {"max_tokens": 5000}), 400)
        assert "5000 for the completion" in err["message"]
        assert "temperature" in _error(httpx.post(url, json=ok | {"temperature": -0.5}), 400)["message"]
        assert "out of range" in _error(httpx.post(url, json=ok | {"prompt": [1, 99999]}), 400)["message"]
        assert "x-slo-ttft-ms" in _error(httpx.post(url, json=ok, headers={"x-slo-ttft-ms": "soon"}), 400)["message"]
        err = _error(httpx.post(r.url + "/v1/chat/completions", json={"model": "demo", "messages": "hi"}), 400)
        assert err["param"] == "messages"
        _error(httpx.get(r.url + "/v1/nothing"), 404)
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            client(r).chat.completions.create(model="demo", messages=[{"role": "user", "content": "a " * 1100}])
        with pytest.raises(openai.NotFoundError):
            client(r).completions.create(model="other", prompt="x")
        # None of that reached a worker.
        assert not any(b.requests for _, b in workers.values())


BAD_FIELDS = [  # (field, value): each is a 400 naming the field, and reaches no worker
    ("max_tokens", "10"), ("max_tokens", True), ("max_tokens", 10.0), ("max_tokens", 0),
    ("stream", "yes"), ("stream", 1), ("echo", "no"),
    ("temperature", "1"), ("temperature", True), ("temperature", 2.5), ("top_p", 0),
    ("top_k", 0), ("top_k", -2), ("top_k", 2**31), ("top_k", "5"),
    ("n", 0), ("n", 17), ("n", "2"),
    ("seed", 2**64), ("seed", 2**63), ("seed", -1), ("seed", "1"), ("seed", 1.5),
    ("logprobs", 21), ("logprobs", -1), ("logprobs", True),
    ("stop", ["a", "b", "c", "d", "e"]), ("stop", ""), ("stop", "x" * 1025), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", [10**6]), ("stop_token_ids", ["1"]),
    ("stop_token_ids", list(range(257))),
    ("presence_penalty", 0.5), ("presence_penalty", "0"), ("logit_bias", {"1": 5}),
    ("prompt", [1, -3]), ("prompt", [1, 99999]), ("prompt", [[1], ["a"]]), ("prompt", 5), ("prompt", []),
    ("prompt", [True]), ("model", 5), ("user", 5), ("stream_options", {"include_usage": "yes"}),
]


@pytest.mark.parametrize("chat", [False, True])
def test_every_field_is_strictly_typed_and_range_checked(demo_model, workers, chat) -> None:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    base = {"model": "demo"} | ({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})
    with router(demo_model, workers) as r:
        for name, value in BAD_FIELDS:
            if chat and name in ("prompt", "echo", "logprobs"):
                continue
            err = _error(httpx.post(r.url + path, json=base | {name: value}), 400)
            assert err["param"] == name, (name, value, err)
        if chat:
            for name, value in (("top_logprobs", 21), ("logprobs", 1), ("max_completion_tokens", "3"),
                                ("messages", [{"role": "user", "content": 5}]), ("messages", [])):
                assert _error(httpx.post(r.url + path, json=base | {name: value}), 400)["param"] == name
        # The same fields with good values (an integer where a number is expected is fine).
        good = {"max_tokens": 3, "temperature": 1, "top_p": 1, "top_k": 5, "seed": 2**63 - 1, "n": 2,
                "stop_token_ids": [0], "presence_penalty": 0, "stop": ["zzz"]}
        resp = httpx.post(r.url + path, json=base | good)
        assert resp.status_code == 200, resp.text
    sent = [b["sampling"]["seed"] for _, b in workers.values() if b.role == "decode" for b in b.requests]
    assert sorted(sent) == [0, 2**63 - 1]  # choice 1's seed wraps around within the range


def test_slo_headers_must_be_finite_positive_and_bounded(demo_model, workers) -> None:
    with router(demo_model, workers) as r:
        ok = {"model": "demo", "prompt": "x", "max_tokens": 2}
        for name in ("x-slo-ttft-ms", "x-slo-tpot-ms"):
            for value in ("nan", "inf", "-inf", "-5", "0", "1e12", "soon", ""):
                err = _error(httpx.post(r.url + "/v1/completions", json=ok, headers={name: value}), 400)
                assert err["param"] == name and name in err["message"], (name, value)
            assert httpx.post(r.url + "/v1/completions", json=ok, headers={name: "250.5"}).status_code == 200


def test_api_key(demo_model, workers) -> None:
    with router(demo_model, workers, api_key="s3cret") as r:
        with pytest.raises(openai.AuthenticationError):
            client(r, "wrong").models.list()
        _error(httpx.get(r.url + "/v1/models"), 401)
        assert client(r, "s3cret").completions.create(model="demo", prompt="x", max_tokens=2).choices
        assert httpx.get(r.url + "/health").status_code == 200


def test_prefill_failure_retries_on_another_pair(demo_model, workers) -> None:
    workers["p0"][1].prefill_status = 503
    with router(demo_model, workers) as r:
        for _ in range(4):  # round robin hits p0 half the time
            assert client(r).completions.create(model="demo", prompt="x", max_tokens=3).choices[0].text
        assert len(workers["p0"][1].requests) >= 1
        # each abandoned decode stream was closed (the close reaches the stub asynchronously)
        deadline = time.monotonic() + 5
        while (len(workers["d0"][1].aborted + workers["d1"][1].aborted)
               < len(workers["p0"][1].requests)) and time.monotonic() < deadline:
            time.sleep(0.05)
        aborted = workers["d0"][1].aborted + workers["d1"][1].aborted
        assert len(aborted) == len(workers["p0"][1].requests)
        assert "splitserve_router_retries_total" in httpx.get(r.url + "/metrics").text


def test_prefill_failure_without_alternative_falls_back_to_recompute(demo_model, workers) -> None:
    """The one prefill worker fails: the retry has the decode worker compute the prompt itself."""
    workers["p0"][1].prefill_status = 502
    with router(demo_model, workers, prefill=("p0",)) as r:
        t0 = time.monotonic()
        resp = httpx.post(r.url + "/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 4}, timeout=10)
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == 4 and time.monotonic() - t0 < 5
        stream = client(r).chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}],
                                                   stream=True, max_tokens=4)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        metrics = httpx.get(r.url + "/metrics").text
        assert 'outcome="recompute_fallback"' in metrics


def test_decode_dying_mid_request_is_resumed_on_another_worker(demo_model, workers, tok) -> None:
    """d0 breaks its stream after 3 tokens: the router resumes the sequence on d1 from the tokens
    sent (prompt + those 3, asking for the 5 still due); the client gets the whole answer."""
    for name in ("d0", "d1"):
        workers[name][1].token_delay_s = 0.01
        workers[name][1].continues_prompt = True
    workers["d0"][1].die_after_tokens = 3
    expected = tok.decode(tok.encode(OUTPUT_TEXT, add_special_tokens=False)[:8])
    with router(demo_model, workers) as r:
        texts = [client(r).completions.create(model="demo", prompt="x", max_tokens=8).choices[0].text
                 for _ in range(2)]  # round robin: one of these lands on d0
        assert texts == [expected, expected]
        resumed = [q for q in workers["d1"][1].requests if "-retry" in q["request_id"]]
        assert len(resumed) == 1 and resumed[0]["sampling"]["max_tokens"] == 5
        assert 'splitserve_router_resumed_total{reason="failed"} 1.0' in httpx.get(r.url + "/metrics").text
        stream = client(r).completions.create(model="demo", prompt="x", max_tokens=8, stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == expected
        health = httpx.get(r.url + "/health").json()
        assert health["workers"]["decode"] == {"healthy": 1, "total": 2}


def test_decode_process_killed_mid_stream(demo_model, workers, tok) -> None:
    """A real decode process, the only one, is SIGKILLed while streaming: with no other worker to
    resume on, the stream ends with an error event."""
    sock_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitserve.testing.stub_worker", "--role", "decode", "--port", str(sock_port),
         "--token-delay", "0.05", "--tokens", *map(str, tok.encode(OUTPUT_TEXT, add_special_tokens=False))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{sock_port}"
        wait_http_ok(url + "/health", timeout=20)
        cfg = RouterConfig(served_model_name="demo", model_dir=str(demo_model), prefill_urls=(workers["p0"][0].url,),
                           decode_urls=(url,), poll_interval_s=0.2)
        with ServerThread(create_app(cfg)) as r:
            stream = client(r).completions.create(model="demo", prompt="x", max_tokens=500, stream=True)
            it = iter(stream)
            assert next(it).choices[0].text
            os.kill(proc.pid, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(openai.APIError, match="failed mid-request"):
                for _ in it:
                    pass
            assert time.monotonic() - t0 < 5
            err = _error(httpx.post(r.url + "/v1/completions", json={"model": "demo", "prompt": "x"}), 503)
            assert "decode" in err["message"]
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_client_disconnect_aborts_the_decode_sequence(demo_model, workers) -> None:
    workers["d0"][1].token_delay_s = workers["d1"][1].token_delay_s = 0.02
    with router(demo_model, workers) as r:
        body = {"model": "demo", "prompt": "x", "max_tokens": 500, "stream": True}
        with httpx.stream("POST", r.url + "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 5
        while not (workers["d0"][1].aborted or workers["d1"][1].aborted):
            assert time.monotonic() < deadline, "decode stream was not closed after the client left"
            time.sleep(0.02)


def test_no_healthy_decode_is_503(demo_model, workers) -> None:
    workers["d0"][1].dead = workers["d1"][1].dead = True
    with router(demo_model, workers) as r:
        err = _error(httpx.post(r.url + "/v1/completions", json={"model": "demo", "prompt": "x"}), 503)
        assert "no decode worker available" in err["message"]
        assert httpx.get(r.url + "/health").status_code == 503


def test_decode_only_mode_asks_decode_to_recompute(demo_model, workers) -> None:
    with router(demo_model, workers, prefill=(), decode=("d1",)) as r:
        assert client(r).completions.create(model="demo", prompt="x", max_tokens=2).choices[0].text
        assert workers["d1"][1].requests[-1]["recompute"] is True


def test_goodput_sheds_with_429_and_reason(demo_model, workers, tmp_path) -> None:
    model = tmp_path / "latency.json"
    model.write_text(json.dumps({"decode": {"base_ms": 500, "per_seq_ms": 1, "per_context_token_ms": 0}}))
    with router(demo_model, workers, policy="goodput", latency_model_path=str(model), max_queue_ms=50) as r:
        t0 = time.monotonic()
        resp = httpx.post(r.url + "/v1/completions", json={"model": "demo", "prompt": "x"})
        err = _error(resp, 429)
        assert err["code"] == "slo_tpot" and "TPOT" in err["message"] and resp.headers["retry-after"]
        assert time.monotonic() - t0 < 2
        # A looser per-request target (header) is admitted.
        ok = httpx.post(r.url + "/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 2},
                        headers={"x-slo-tpot-ms": "1000"})
        assert ok.status_code == 200, ok.text
        metrics = httpx.get(r.url + "/metrics").text
        assert 'splitserve_router_shed_total{reason="slo_tpot"} 1.0' in metrics
        assert 'splitserve_router_routing_decisions_total{outcome="shed",policy="goodput"} 1.0' in metrics


def test_metrics_record_latency_and_outcomes(demo_model, workers) -> None:
    with router(demo_model, workers, policy="least_loaded") as r:
        client(r).completions.create(model="demo", prompt="x", max_tokens=4)
        httpx.post(r.url + "/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 0})
        text = httpx.get(r.url + "/metrics").text
        for needle in (
            "splitserve_router_ttft_seconds_count 1.0",
            "splitserve_router_tpot_seconds_count 1.0",
            "splitserve_router_e2e_seconds_count 1.0",
            'splitserve_router_requests_total{endpoint="/v1/completions",outcome="ok"} 1.0',
            'splitserve_router_requests_total{endpoint="/v1/completions",outcome="bad_request"} 1.0',
            'splitserve_router_routing_decisions_total{outcome="routed",policy="least_loaded"} 1.0',
            'splitserve_router_slo_requests_total{tpot="met",ttft="met"} 1.0',
            "splitserve_router_worker_healthy",
        ):
            assert needle in text, needle


def test_goodput_queues_within_bound_until_a_worker_frees_up(demo_model, workers, tmp_path) -> None:
    """Both decode workers report a batch too big for the TPOT target; one drains while the
    request waits in admission: it is admitted (not shed) once the poll shows room."""
    model = tmp_path / "latency.json"
    model.write_text(json.dumps({"decode": {"base_ms": 10, "per_seq_ms": 1, "per_context_token_ms": 0}}))
    workers["d0"][1].load, workers["d1"][1].load = {"running": 200}, {"running": 200}
    with router(demo_model, workers, policy="goodput", latency_model_path=str(model), max_queue_ms=3000) as r:
        metrics = _served_by_d1_once_it_frees_up(r, workers, running=0)
        assert 'splitserve_router_routing_decisions_total{outcome="queued",policy="goodput"} 1.0' in metrics


def _served_by_d1_once_it_frees_up(r, workers, **freed: int) -> str:  # noqa: ANN001
    """d1's load becomes ``freed`` 0.5 s after a request is sent that no decode worker can take
    yet: the request waits in admission, then d1 serves it; the router's /metrics after."""
    import threading

    threading.Timer(0.5, lambda: workers["d1"][1].load.update(**freed)).start()
    t0 = time.monotonic()
    resp = httpx.post(r.url + "/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 2}, timeout=10)
    assert resp.status_code == 200, resp.text
    assert 0.4 < time.monotonic() - t0 < 3
    assert workers["d1"][1].requests and not workers["d0"][1].requests
    return httpx.get(r.url + "/metrics").text



def test_a_client_that_leaves_while_queued_gives_its_place_back_at_once(demo_model, workers, tmp_path) -> None:
    """No decode worker has room: the request waits in admission (for up to 10 s); its client
    gives up after 0.3 s; the router notices the disconnect at once, leaves the queue and never
    sends the request to a worker once room appears."""
    model = tmp_path / "latency.json"
    model.write_text(json.dumps({"decode": {"base_ms": 10, "per_seq_ms": 1, "per_context_token_ms": 0}}))
    workers["d0"][1].load, workers["d1"][1].load = {"running": 200}, {"running": 200}
    with router(demo_model, workers, policy="goodput", latency_model_path=str(model), max_queue_ms=10000) as r:
        for stream in (False, True):
            body = {"model": "demo", "prompt": "x", "max_tokens": 2, "stream": stream}
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(r.url + "/v1/completions", json=body, timeout=0.3)
            deadline = time.monotonic() + 2
            while "splitserve_router_queued_requests 0.0" not in httpx.get(r.url + "/metrics").text:
                assert time.monotonic() < deadline, "the abandoned request stayed queued"
                time.sleep(0.05)
        workers["d1"][1].load.update(running=0)
        time.sleep(0.5)  # a poll shows room: nothing abandoned may be sent there now
        assert not workers["d0"][1].requests and not workers["d1"][1].requests
        text = httpx.get(r.url + "/metrics").text
        assert 'splitserve_router_requests_total{endpoint="/v1/completions",outcome="client_closed"} 2.0' in text

def test_a_kv_shortage_waits_in_admission_until_a_decode_worker_frees_blocks(demo_model, workers) -> None:
    """Both decode workers are out of KV blocks (a burst filled them); one frees its blocks
    0.5 s later: the request waits for the poll that shows it (not a 503 at once) and is served."""
    workers["d0"][1].load, workers["d1"][1].load = {"free_blocks": 0}, {"free_blocks": 0}
    with router(demo_model, workers, max_queue_ms=3000) as r:
        metrics = _served_by_d1_once_it_frees_up(r, workers, free_blocks=1000)
        assert 'splitserve_router_queued_total{reason="no_kv_room"} 1.0' in metrics
        assert 'splitserve_router_routing_decisions_total{outcome="queued",policy="round_robin"} 1.0' in metrics


def test_a_kv_shortage_that_lasts_is_shed_after_the_queue_bound_with_its_reason(demo_model, workers) -> None:
    workers["d0"][1].load, workers["d1"][1].load = {"free_blocks": 0}, {"free_blocks": 0}
    with router(demo_model, workers, policy="least_loaded", max_queue_ms=400) as r:
        t0 = time.monotonic()
        resp = httpx.post(r.url + "/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 2})
        err = _error(resp, 429)
        assert 0.35 < time.monotonic() - t0 < 2
        assert err["code"] == "no_kv_room" and resp.headers["retry-after"]
        assert err["message"] == "every decode worker is out of KV blocks for this prompt (waited 400 ms)"
        assert not workers["d0"][1].requests and not workers["d1"][1].requests
        metrics = httpx.get(r.url + "/metrics").text
        assert 'splitserve_router_queued_total{reason="no_kv_room"} 1.0' in metrics
        assert 'splitserve_router_shed_total{reason="no_kv_room"} 1.0' in metrics


def test_a_prompt_larger_than_every_decode_cache_is_a_400_at_once(demo_model, workers) -> None:
    """Two blocks of 16 hold 31 prompt tokens and the first token; waiting frees none more."""
    workers["d0"][1].load = workers["d1"][1].load = {"free_blocks": 2, "total_blocks": 2}
    with router(demo_model, workers, max_queue_ms=3000) as r:
        t0 = time.monotonic()
        resp = httpx.post(r.url + "/v1/completions", json={"model": "demo", "prompt": "hello " * 40, "max_tokens": 2})
        err = _error(resp, 400)
        assert time.monotonic() - t0 < 1
        assert err["code"] == "prompt_exceeds_kv_cache" and "whole KV cache" in err["message"]
        assert not workers["d0"][1].requests and not workers["d1"][1].requests


def test_missing_key_is_401_before_anything_else(demo_model, workers) -> None:
    with router(demo_model, workers, api_key="k") as r:
        _error(httpx.post(r.url + "/v1/completions", content=b"{oops", headers={"content-type": "application/json"}), 401)
        _error(httpx.post(r.url + "/v1/chat/completions", json={"model": "demo"}), 401)


def test_metrics_report_the_prefill_backlog_and_the_oldest_wait(demo_model, workers) -> None:
    """The planner's queue inputs on /metrics: the workers' queued prompt tokens (from their
    /load) and the age of a request still waiting for its first token (a slow prefill)."""
    from splitserve.operator import observe

    for name in ("p0", "p1"):
        b = workers[name][1]
        b.load, b.prefill_delay_s = {"queued_prompt_tokens": 700}, 3.0
    with router(demo_model, workers) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(c.post, "/v1/completions",
                                  json={"model": "demo", "prompt": "hi", "max_tokens": 2})
            deadline = time.monotonic() + 10
            while True:  # the gauges follow the pool's poll rounds (0.2 s here)
                snap = observe.parse(c.get("/metrics").text, at=0.0)
                if snap.oldest_wait_s >= 1.0 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert snap.queued_prompt_tokens == 1400  # both prefill workers' queues
            assert 1.0 <= snap.oldest_wait_s < 10
            assert pending.result().status_code == 200
        time.sleep(0.5)  # a poll round after the first token
        assert observe.parse(c.get("/metrics").text, at=0.0).oldest_wait_s == 0.0
