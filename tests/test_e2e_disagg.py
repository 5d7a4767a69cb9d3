"""End to end through `splitserve up`'s real processes: openai client -> router -> prefill ->
TCP KV -> decode.

Greedy tokens must equal Hugging Face transformers on the same weights, for prompts of several
lengths sent concurrently (so batching and the paged cache are exercised on both workers). The
API surface (chat, streaming, n, stop) and a decode worker killed mid-request are covered in
test_router_e2e.py against the same real workers.
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest
from splitserve.launcher.up import Deployment, UpConfig, free_port, plan
from splitserve.testing.hf_reference import hf_greedy, hf_tokenize

PROMPTS = [
    "hello world",
    "the model serve token prompt decode prefill cache block request latency " * 6,
    "a",
    "Explain how the router picks a worker, and why the cache matters for latency?",
    "cluster pod node memory compute batch stream transfer layer attention query key value " * 3,
]
MAX_TOKENS = 20
WORKER_ARGS = ("--block-size", "8", "--num-kv-blocks", "256")


@pytest.fixture(scope="module")
def deployment(demo_model, tmp_path_factory):
    cfg = UpConfig(
        model=str(demo_model),
        served_model_name="demo",
        num_prefill=1,
        num_decode=2,
        port=free_port(),
        worker_args=WORKER_ARGS,
        log_dir=tmp_path_factory.mktemp("logs"),
    )
    with Deployment(cfg) as dep:
        yield dep


@pytest.fixture(scope="module")
def client(deployment):
    from openai import OpenAI

    return OpenAI(base_url=deployment.base_url, api_key="unused", max_retries=0, timeout=60)


def hf_reference(model_dir, prompts, n):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tokens = hf_greedy(model_dir, hf_tokenize(model_dir, prompts), n)
    return [tok.decode(t, skip_special_tokens=True) for t in tokens]


def test_greedy_concurrent_matches_transformers(client, demo_model):
    def complete(prompt):
        r = client.completions.create(
            model="demo", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"ignore_eos": True},
        )
        return r.choices[0].text, r.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(complete, PROMPTS))
    expected = hf_reference(demo_model, PROMPTS, MAX_TOKENS)
    assert [text for text, _ in results] == expected
    assert all(n == MAX_TOKENS for _, n in results)


def test_router_metrics_show_each_kv_link_and_its_negotiated_backend(client, deployment):
    """After traffic, the router exports every prefill -> decode link its prefill worker reports,
    with the backend the handshake chose (one host, CPU caches: shm) and no fallback."""
    from splitserve.operator import observe

    client.completions.create(model="demo", prompt="hello", max_tokens=2, temperature=0)
    snap = kv_links_on_router_metrics(deployment)
    links = snap.kv_links
    assert links, "no splitserve_router_kv_link_* sample after a served request"
    assert {k.backend for k in links} == {"shm"} and not any(k.fallback for k in links)
    assert all(k.decode.startswith("http://") for k in links)  # named by the decode worker's URL
    summary = observe.kv_summary([snap])
    assert summary["transfers"] >= 1 and summary["failures"] == 0


def kv_links_on_router_metrics(deployment: Deployment, within_s: float = 10.0, transfers: int = 1):  # noqa: ANN201
    """The router's /metrics once it shows KV links that carried ``transfers`` transfers in all
    (the router learns a prefill worker's peers and counts from its next /load poll, so the last
    request's transfer may show one poll late), or as it is after ``within_s``; an
    observe.Snapshot."""
    from splitserve.operator import observe

    root = deployment.base_url.removesuffix("/v1")
    deadline = time.monotonic() + within_s
    while True:
        text = httpx.get(f"{root}/metrics", headers=deployment.internal_headers()).text
        snap = observe.parse(text, at=0.0)
        if sum(k.transfers for k in snap.kv_links) >= transfers or time.monotonic() > deadline:
            return snap
        time.sleep(0.2)


def test_greedy_matches_transformers_on_qwen2_tied(tmp_path):
    """A second architecture end to end: Qwen2 (q/k/v bias, tied embeddings, one KV head), with
    the workers' steps overlapped as on a GPU (``--overlap on``)."""
    from splitserve.engine.demo_model import DemoModelSpec, init_demo_model

    model = init_demo_model(tmp_path / "qwen2", DemoModelSpec(model_type="qwen2", tie_word_embeddings=True,
                                                              num_kv_heads=1, seed=1))
    cfg = UpConfig(model=str(model), served_model_name="qwen", port=free_port(),
                   worker_args=(*WORKER_ARGS, "--overlap", "on"), log_dir=tmp_path / "logs")
    with Deployment(cfg) as dep:
        def complete(prompt):
            r = httpx.post(f"{dep.base_url}/completions", timeout=60, json={
                "model": "qwen", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            texts = list(pool.map(complete, PROMPTS))
    assert texts == hf_reference(model, PROMPTS, MAX_TOKENS)


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == ["demo"]


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"model": "demo", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "nope", "prompt": "hi", "max_tokens": 4}, 404, "nope"),
        ({"model": "demo", "prompt": "token " * 2000, "max_tokens": 4}, 400, "context"),
        ({"model": "demo", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ],
)
def test_bad_requests_get_clear_4xx(deployment, body, status, words):
    r = httpx.post(f"{deployment.base_url}/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_malformed_json_is_400(deployment):
    r = httpx.post(
        f"{deployment.base_url}/completions", content=b"{not json",
        headers={"Content-Type": "application/json"}, timeout=30,
    )
    assert r.status_code == 400, r.text


def test_workers_found_through_redis(demo_model, redis_server, tmp_path):
    """Multi-host shape: workers announce themselves in a real Redis, the router finds them there
    (no worker URLs on its command line), and greedy output is unchanged."""
    cfg = UpConfig(
        model=str(demo_model), served_model_name="demo", port=free_port(), worker_args=WORKER_ARGS,
        log_dir=tmp_path, redis_url=redis_server.url,
    )
    router_args = next(c.args for c in plan(cfg) if c.name == "router")
    assert "--prefill" not in router_args and "--decode" not in router_args
    with Deployment(cfg) as dep:
        r = httpx.post(f"{dep.base_url}/completions", timeout=60, json={
            "model": "demo", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == hf_reference(demo_model, PROMPTS[:1], 8)[0]
