"""The HF transformers baseline server and the engine-vs-HF comparison, on the CPU demo model.

The server must answer with exactly the tokens ``transformers`` ``generate`` gives (else the
comparison would time different work): checked through a real process, real HTTP and the
openai client, and in-process for static batches (left padding must not change greedy tokens).
The comparison script is run end to end once, tiny, and must write its JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest
from splitserve.bench.goodput import System, started
from splitserve.router.tokenizer import RouterTokenizer
from splitserve.testing.hf_reference import hf_greedy, hf_tokenize

PROMPTS = ["hello world, please tell me a story about a cache", "why"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def reference(demo_model: Path) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt token ids, greedy tokens from transformers generate) for PROMPTS."""
    prompts = hf_tokenize(demo_model, PROMPTS)
    return prompts, hf_greedy(demo_model, prompts, NEW_TOKENS)


def _expected_text(model_dir: Path, prompt: list[int], tokens: list[int]) -> str:
    """What the server's text for ``tokens`` must be (same incremental detokenizer)."""
    detok = RouterTokenizer(model_dir).detokenizer(prompt)
    return detok.add(tokens) + detok.flush()


@pytest.mark.timeout(120)
def test_server_streams_the_tokens_generate_gives(
    demo_model: Path, reference: tuple[list[list[int]], list[list[int]]], tmp_path: Path
) -> None:
    from openai import OpenAI

    prompts, expected = reference
    cmd = (f"{sys.executable} -m splitserve.bench.hf_server --model {{model}} "
           f"--served-model-name {{name}} --device cpu --host {{host}} --port {{port}}")
    with started(System("hf", command=cmd), str(demo_model), "demo", tmp_path,
                 ready_timeout_s=90) as base:
        client = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["demo"]
        for text, prompt, tokens in zip(PROMPTS, prompts, expected, strict=True):
            stream = client.completions.create(
                model="demo", prompt=text, max_tokens=NEW_TOKENS, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            )
            chunks = list(stream)
            got = "".join(c.choices[0].text for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices]
            usage = chunks[-1].usage
            assert got == _expected_text(demo_model, prompt, tokens)
            assert finish[-1] == "length" and set(finish[:-1]) == {None}
            assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), NEW_TOKENS)
        with pytest.raises(Exception, match="logprobs"):  # refused, not silently ignored
            client.completions.create(model="demo", prompt="hi", max_tokens=2, logprobs=1)
        _abandoned_request_is_never_generated(base)


def _abandoned_request_is_never_generated(base: str) -> None:
    """A request whose client gives up while it waits in the queue is dropped, not generated
    later (it would delay everything behind it)."""
    import threading

    import httpx

    body = {"model": "demo", "prompt": "hello", "max_tokens": 1000, "ignore_eos": True}
    before = httpx.get(f"{base}/load", timeout=10).json()["sequences_run"]
    # n=2: two 1000-token sequences one after the other, so the GPU (CPU) stays busy well past
    # the moment the server notices the second client has gone, even on a fast machine.
    long = threading.Thread(target=httpx.post, args=(f"{base}/v1/completions",),
                            kwargs={"json": dict(body, n=2), "timeout": 60})
    long.start()
    try:
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/load", timeout=10).json()["running"] == 0:
            assert time.monotonic() < deadline, "the long request never started"
            time.sleep(0.05)
        with pytest.raises(httpx.TimeoutException):  # queued behind the long one; we leave
            httpx.post(f"{base}/v1/completions", json=dict(body, max_tokens=4), timeout=0.5)
    finally:
        long.join(60)
    time.sleep(1.0)  # the server polls for disconnects every 0.5 s
    load = httpx.get(f"{base}/load", timeout=10).json()
    assert (load["waiting"], load["running"], load["sequences_run"]) == (0, 0, before + 2)


def test_static_batch_gives_the_same_greedy_tokens(
    demo_model: Path, reference: tuple[list[list[int]], list[list[int]]]
) -> None:
    """Two queued requests of different lengths, one left-padded generate call."""
    from splitserve.bench.hf_server import HFGenerator, HFServerConfig, load_model
    from splitserve.protocol import SamplingParams
    from splitserve.router.config import SLO
    from splitserve.router.dispatch import SequenceSpec

    prompts, expected = reference
    model, eos, pad = load_model(HFServerConfig(str(demo_model), "demo", device="cpu"))
    gen = HFGenerator(model, eos, pad, batch=2)
    sampling = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    specs = [SequenceSpec(f"r{i}", p, sampling, SLO(), 0.0) for i, p in enumerate(prompts)]

    async def collect(spec: SequenceSpec) -> list[int]:
        return [t async for chunk in gen.run(spec) for t in chunk.token_ids]

    async def both() -> list[list[int]]:
        # Hold the queue's lock (re-entrant, so run() can still enqueue from this thread) until
        # both requests are queued: the generate thread then takes them as one batch.
        with gen._cv:
            tasks = [asyncio.create_task(collect(s)) for s in specs]
            await asyncio.sleep(0)
        return list(await asyncio.gather(*tasks))

    try:
        assert asyncio.run(asyncio.wait_for(both(), 60)) == expected
        load = gen.load()
        assert (load["batches_run"], load["sequences_run"]) == (1, 2)
    finally:
        gen.close()


@pytest.mark.timeout(120)
def test_engine_vs_hf_smoke(demo_model: Path, tmp_path: Path) -> None:
    """Both systems started in turn on the CPU, one rate, a few requests: the JSON says both
    ran, produced the same token counts, and the report has the shared attainment plot."""
    from splitserve.bench.engine_vs_hf import main

    out = tmp_path / "evh"
    rc = main([
        "--model", str(demo_model), "--device", "cpu", "--out", str(out), "--rates", "4",
        "--engine-rates", "", "--min-requests", "3", "--duration", "0.5", "--max-input", "48",
        "--max-output", "6", "--length-scale", "1", "--ttft-ms", "5000", "--tpot-ms", "2000",
        "--warmup", "0", "--cooldown", "0", "--ready-timeout", "90", "--timeout", "60",
        "--no-progress",
    ])
    assert rc == 0
    doc = json.loads((out / "engine_vs_hf_chat.json").read_text())
    assert doc["schema"] == "splitserve.bench.engine_vs_hf/1"
    assert set(doc["systems"]) == {"engine", "hf"}
    assert doc["output_tokens_match"] == {"4": True}
    row = doc["rows"][0]
    for label in ("engine", "hf"):
        assert row[label]["num_requests"] == 3 and row[label]["errors"] == 0
        assert row[label]["attainment"] == 1.0
    assert doc["goodput_ratio"]["bound"] == "unknown"  # both met the SLO at their only rate
    assert (out / "report" / "chat" / "attainment_chat.png").exists()


def test_goodput_ratio_says_what_kind_of_bound_it_is() -> None:
    from splitserve.bench.engine_vs_hf import goodput_ratio, ratio_text
    from splitserve.bench.stats import Goodput

    def g(rate: float, status: str) -> Goodput:
        return Goodput(rate, status, 0.9)

    cases = [
        (g(8, "interpolated"), g(0.2, "interpolated"), 40.0, "exact", "40.0x"),
        (g(8, "interpolated"), g(0, "below_range"), 80.0, "lower", "> 80.0x"),  # HF < 0.1
        (g(64, "above_range"), g(0.2, "interpolated"), 320.0, "lower", "> 320.0x"),
        (g(8, "interpolated"), g(0.5, "above_range"), 16.0, "upper", "< 16.0x"),
        (g(0, "below_range"), g(0.2, "interpolated"), 0.5, "upper", "< 0.5x"),  # engine < 0.1
        (g(64, "above_range"), g(0.5, "above_range"), None, "unknown", "?"),
        (g(0, "below_range"), g(0, "below_range"), None, "unknown", "?"),
    ]
    for engine, hf, value, bound, text in cases:
        ratio = goodput_ratio(engine, hf, engine_min_rate=0.1, hf_min_rate=0.1)
        assert ratio["bound"] == bound, (engine, hf)
        if value is None:
            assert ratio["value"] is None
        else:
            assert ratio["value"] == pytest.approx(value)
        assert ratio_text(ratio) == text


def test_an_8b_shape_keeps_a_vocabulary_the_tokenizer_can_decode(tmp_path: Path) -> None:
    from splitserve.bench.engine_vs_hf import check_vocab, make_8b_shape

    model = make_8b_shape(str(tmp_path / "m"))
    cfg = json.loads((model / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == \
        (4096, 32, 8)
    assert not (model / "model.safetensors").exists()
    check_vocab(str(model))
    cfg["vocab_size"] = 128256  # Llama-3's rows over the demo tokenizer: refused
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="decode to nothing"):
        check_vocab(str(model))
