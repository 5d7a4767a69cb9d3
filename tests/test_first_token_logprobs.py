"""The first token's logprobs cross the KV transfer with the token (in its END frame), with a real
prefill -> decode pair on the CPU: decode's first token line carries them, the prefill worker's
reply does not, and greedy, they equal what the decode worker computes for the same prompt alone
(recompute: no prefill worker, no transfer)."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from splitserve.launcher.processes import Component, ProcessGroup
from splitserve.launcher.up import free_port
from splitserve.protocol import GenerateRequest, Health, PrefillRequest, TokenLine
from splitserve.protocol.sampling import SamplingParams

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

PROMPT = [1, 72, 101, 108, 108, 111, 300]  # ids inside the demo model's vocabulary (512)


@pytest.fixture(scope="module")
def pair(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One prefill and one decode worker process: their URLs, and decode's KV endpoint."""
    group = ProcessGroup(tmp_path_factory.mktemp("worker-logs"), env={"OMP_NUM_THREADS": "1"})
    urls: dict[str, str] = {}
    try:
        for role in ("prefill", "decode"):
            port = free_port()
            urls[role] = f"http://127.0.0.1:{port}"
            group.start(Component(role, [role, "--model", str(demo_model), "--port", str(port), "--device", "cpu",
                                         "--num-kv-blocks", "64"], urls[role] + "/health"))
        group.wait_ready(group.components, timeout=90)
        health = Health.from_json(httpx.get(urls["decode"] + "/health", timeout=10).json())
        yield urls | {"kv_endpoint": health.kv_endpoint}
    finally:
        group.stop()


def generate(decode_url: str, request: GenerateRequest) -> list[TokenLine]:
    with httpx.stream("POST", decode_url + "/generate", json=request.to_json(), timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        return [TokenLine.from_json(json.loads(line)) for line in resp.iter_lines() if line]


def split(pair: dict[str, str], rid: str, sampling: SamplingParams) -> tuple[list[TokenLine], dict]:
    """The prompt through prefill -> KV transfer -> decode: decode's lines and prefill's reply."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        lines = pool.submit(generate, pair["decode"], GenerateRequest(rid, PROMPT, sampling))
        reply = httpx.post(pair["prefill"] + "/prefill", timeout=60,
                           json=PrefillRequest(rid, PROMPT, sampling, pair["kv_endpoint"]).to_json())
        assert reply.status_code == 200, reply.text
        return lines.result(timeout=60), reply.json()


def test_the_first_tokens_logprobs_come_with_the_kv_and_equal_recompute(pair) -> None:
    sampling = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=2)
    lines, reply = split(pair, "lp-split", sampling)
    alone = generate(pair["decode"], GenerateRequest("lp-alone", PROMPT, sampling, recompute=True))
    assert "first_logprobs" not in reply  # the reply has none: END carried them to decode
    first, expected = lines[0].logprobs[0], alone[0].logprobs[0]
    assert first["token_id"] == lines[0].token_ids[0] == reply["first_token"] == expected["token_id"]
    assert first["logprob"] == pytest.approx(expected["logprob"], abs=1e-4)
    assert [t for t, _ in first["top"]] == [t for t, _ in expected["top"]] and len(first["top"]) == 2
    assert [v for _, v in first["top"]] == pytest.approx([v for _, v in expected["top"]], abs=1e-4)
    tokens = [t for line in lines for t in line.token_ids]
    assert tokens == [t for line in alone for t in line.token_ids]
    assert [e["token_id"] for line in lines for e in line.logprobs] == tokens


def test_no_logprobs_when_none_were_asked(pair) -> None:
    lines, _ = split(pair, "lp-none", SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    assert lines[0].token_ids and all(line.logprobs is None for line in lines)
