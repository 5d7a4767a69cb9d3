"""End to end with real worker processes: the ``openai`` client -> router -> prefill worker ->
KV transfer (TCP) -> decode worker, on the CPU with the demo model. Completion, chat, streaming,
``n``, stop, usage; greedy output through prefill->decode equals the decode worker computing the
prompt itself; a decode worker killed or hung mid-stream costs the client nothing: the router
resumes the sequence on the other decode worker, and the greedy answer is the same."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from splitserve.launcher.processes import Component, ProcessGroup
from splitserve.launcher.up import free_port
from splitserve.router.app import create_app
from splitserve.router.config import RouterConfig
from splitserve.testing.stub_worker import ServerThread

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One prefill and two decode worker processes (started in parallel), their URLs by name."""
    group = ProcessGroup(tmp_path_factory.mktemp("worker-logs"), env={"OMP_NUM_THREADS": "1"})
    urls: dict[str, str] = {}
    try:
        for name, role in (("p0", "prefill"), ("d0", "decode"), ("d1", "decode")):
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            group.start(Component(name, [role, "--model", str(demo_model), "--port", str(port), "--device", "cpu",
                                         "--num-kv-blocks", "128"], urls[name] + "/health"))
        group.wait_ready(group.components, timeout=90)
        yield urls | {"_pids": {c.name: c.process for c in group.components}}  # type: ignore[operator]
    finally:
        group.stop()


@contextmanager
def router(demo_model: Path, prefill: list[str], decode: list[str]) -> Iterator[openai.OpenAI]:
    cfg = RouterConfig(served_model_name="demo", model_dir=str(demo_model), prefill_urls=tuple(prefill),
                       decode_urls=tuple(decode), poll_interval_s=0.2)
    with ServerThread(create_app(cfg)) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


PROMPTS = ["hello world", "please write a story about the router and the cache " * 3, "x"]


def test_openai_client_through_prefill_and_decode(cluster, demo_model) -> None:
    with router(demo_model, [cluster["p0"]], [cluster["d0"]]) as c:
        greedy = [c.completions.create(model="demo", prompt=p, max_tokens=12, temperature=0) for p in PROMPTS]
        for out in greedy:
            assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens >= 1
        stream = c.completions.create(model="demo", prompt=PROMPTS[1], max_tokens=12, temperature=0, stream=True,
                                      stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == greedy[1].choices[0].text
        assert chunks[-1].usage.completion_tokens == greedy[1].usage.completion_tokens
        chat = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                         temperature=0.8, seed=3, n=2)
        assert len(chat.choices) == 2 and chat.usage.completion_tokens >= 2
        again = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                          temperature=0.8, seed=3, n=2)
        assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in chat.choices]
        text = greedy[0].choices[0].text
        stop = text[3:6].strip() or None
        if stop:
            cut = c.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop])
            assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
            assert text.startswith(cut.choices[0].text)
    # The same greedy tokens when decode computes the prompt itself (no prefill, no transfer).
    with router(demo_model, [], [cluster["d1"]]) as c:
        for p, out in zip(PROMPTS, greedy, strict=True):
            assert c.completions.create(model="demo", prompt=p, max_tokens=12, temperature=0).choices[0].text == out.choices[0].text


def test_logprobs_through_prefill_and_decode(cluster, demo_model) -> None:
    """Logprobs of every token, the first one included (it crosses the KV transfer, its logprobs
    come from the prefill worker), equal transformers' and the decode-only path's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(model="demo", prompt="hello world", max_tokens=5, temperature=0, logprobs=3,
              extra_body={"ignore_eos": True})
    with router(demo_model, [cluster["p0"]], [cluster["d0"]]) as c:
        split = c.completions.create(**kw).choices[0].logprobs
        chat = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                         temperature=0, logprobs=True, top_logprobs=2)
    with router(demo_model, [], [cluster["d1"]]) as c:
        alone = c.completions.create(**kw).choices[0].logprobs
    assert len(split.token_logprobs) == 5 and split.tokens == alone.tokens
    assert split.token_logprobs == pytest.approx(alone.token_logprobs, abs=1e-4)
    assert all(len(top) <= 3 for top in split.top_logprobs)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in entries)
    tok = AutoTokenizer.from_pretrained(demo_model)
    hf = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32)
    ids = tok("hello world")["input_ids"]
    with torch.no_grad():
        first = hf(torch.tensor([ids])).logits[0, -1].log_softmax(-1).max().item()
    assert split.token_logprobs[0] == pytest.approx(first, abs=1e-4)


GREEDY = dict(model="demo", prompt="hello", max_tokens=300, temperature=0, extra_body={"ignore_eos": True})


def _running(cluster) -> str:
    """The decode worker that holds a sequence now."""
    def busy(name: str) -> int:
        load = httpx.get(cluster[name] + "/load").json()
        return load["running"] + load["waiting"]
    return next(n for n in ("d0", "d1") if busy(n))


def _resumed(c: openai.OpenAI, reason: str) -> str:
    metrics = httpx.get(str(c.base_url).removesuffix("/v1/") + "/metrics").text
    return next((line.split()[-1] for line in metrics.splitlines()
                 if line.startswith(f'splitserve_router_resumed_total{{reason="{reason}"}}')), "0")


def _rest_of(stream: Iterator, fault: Callable[[], None]) -> tuple[str, float]:
    """The text of the stream after its first chunk, the fault injected after that chunk, and
    how long the rest took."""
    text = next(stream).choices[0].text
    fault()
    t0 = time.monotonic()
    text += "".join(ch.choices[0].text for ch in stream if ch.choices)
    return text, time.monotonic() - t0


def test_decode_hung_mid_stream_is_resumed_with_the_same_greedy_answer(cluster, demo_model) -> None:
    """The decode worker serving a stream is SIGSTOPped after its first token (its connection
    stays open): the router notices it in seconds and resumes the sequence on the other decode
    worker from the tokens sent; the client gets, token for token, the answer without the fault."""
    with router(demo_model, [cluster["p0"]], [cluster["d0"], cluster["d1"]]) as c:
        reference = c.completions.create(**GREEDY).choices[0].text
        stopped = []

        def stop() -> None:
            stopped.append(cluster["_pids"][_running(cluster)])
            stopped[0].send_signal(signal.SIGSTOP)

        try:
            text, seconds = _rest_of(iter(c.completions.create(**GREEDY, stream=True)), stop)
        finally:
            for proc in stopped:
                proc.send_signal(signal.SIGCONT)
        assert text == reference
        assert seconds < 10, seconds  # not the 60 s stream idle timeout
        assert _resumed(c, "stalled") == "1.0"


def test_decode_killed_mid_stream_is_resumed_with_the_same_greedy_answer(cluster, demo_model) -> None:
    with router(demo_model, [cluster["p0"]], [cluster["d0"], cluster["d1"]]) as c:
        reference = c.completions.create(**GREEDY).choices[0].text
        victim: list[str] = []

        def kill() -> None:
            victim.append(_running(cluster))
            cluster["_pids"][victim[0]].kill()

        text, seconds = _rest_of(iter(c.completions.create(**GREEDY, stream=True)), kill)
        assert text == reference and seconds < 5
        assert _resumed(c, "failed") == "1.0"
        for _ in range(3):
            assert c.completions.create(model="demo", prompt="again", max_tokens=4).usage.completion_tokens >= 1
        survivor = "d1" if victim[0] == "d0" else "d0"
        assert httpx.get(cluster[survivor] + "/health").status_code == 200
