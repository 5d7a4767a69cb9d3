"""Property-based fuzz of the OpenAI endpoints against a real router process (in front of stub
workers): whatever body and headers a client sends, the answer is a 200 (a complete answer or
stream) or a 4xx with OpenAI's error body, promptly; never a 5xx, never a hang, and the router
is alive and healthy afterwards.

Bodies are near-valid requests with fields replaced or added by arbitrary JSON (including NaN
and infinities, which Python's json writes), arbitrary bytes, and SLO headers of any text."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from services import stub_router

pytestmark = pytest.mark.timeout(300)
EXAMPLES = int(os.environ.get("SPLITSERVE_FUZZ_EXAMPLES", "60"))  # per endpoint; ~5 s in CI, more by hand

EDGE_NUMBERS = [0, 1, -1, 2, 16, 17, 20, 21, 1023, 1024, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, 10**30,
                0.5, 1.0, 2.0, 2.5, -0.0, 1e308, float("nan"), float("inf"), float("-inf")]

scalars = (st.none() | st.booleans() | st.sampled_from(EDGE_NUMBERS) | st.integers()
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer"])},
    optional={"content": st.text(max_size=40), "name": st.text(max_size=8)},
), min_size=1, max_size=3)
prompts = (st.text(max_size=40) | st.lists(st.integers(0, 600), min_size=1, max_size=6)
           | st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=3))
# Values a client may well send (valid or near the edges); each field is also tried with any JSON.
LIKELY = {
    "max_tokens": st.integers(-2, 40) | st.sampled_from([1024, 5000, 2**63]),
    "max_completion_tokens": st.integers(-1, 40),
    "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5), "top_k": st.integers(-3, 600),
    "n": st.integers(-1, 18), "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=5),
    "stop_token_ids": st.lists(st.integers(-2, 600), max_size=4), "ignore_eos": st.booleans(),
    "seed": st.integers(-2, 2**64 + 1), "presence_penalty": st.sampled_from([0, 0.0, 0.5]),
    "frequency_penalty": st.sampled_from([0, 1.5]), "logit_bias": st.sampled_from([{}, {"5": 1.0}]),
    "user": st.text(max_size=8), "echo": st.booleans(), "logprobs": st.integers(-1, 22) | st.booleans(),
    "top_logprobs": st.integers(-1, 22), "best_of": st.integers(0, 3), "suffix": st.text(max_size=3),
    "add_generation_prompt": st.booleans(), "tools": st.sampled_from([[], [{"type": "function"}]]),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
    "model": st.sampled_from(["demo", "demo", "gpt-4"]), "junk": json_values,
}


@st.composite
def bodies(draw: Any, chat: bool) -> bytes:
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=64))
    body: dict[str, Any] = {"model": "demo"}
    body["messages" if chat else "prompt"] = draw(messages if chat else prompts)
    for name in draw(st.lists(st.sampled_from([*LIKELY, "messages" if chat else "prompt"]), max_size=4, unique=True)):
        body[name] = draw(json_values if draw(st.integers(0, 4)) == 0 else LIKELY.get(name, json_values))
    return json.dumps(body).encode()  # allow_nan: NaN/Infinity tokens are sent as such


slo_headers = st.one_of(st.just({}), st.dictionaries(
    st.sampled_from(["x-slo-ttft-ms", "x-slo-tpot-ms"]),
    st.sampled_from(["nan", "inf", "-1", "0", "1e400", "250", "1e9", "", "x"]) | st.from_regex(r"[ -~]{0,12}", fullmatch=True).map(str.strip),  # (no edge blanks: the client refuses)
    max_size=2,
))


@pytest.fixture(scope="module")
def router(demo_model) -> Iterator[tuple[str, subprocess.Popen]]:
    with stub_router(demo_model) as running:
        yield running


def _check_answer(resp: httpx.Response, raw: bytes) -> None:
    status = resp.status_code
    assert status == 200 or 400 <= status < 500, (status, raw[:300], resp.text[:500])
    if status != 200:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], resp.text
        return
    if resp.headers["content-type"].startswith("text/event-stream"):
        text = resp.text
        assert text.endswith("data: [DONE]\n\n") and '"error"' not in text, text[-500:]
    else:
        assert resp.json()["choices"], resp.text


@pytest.mark.parametrize("chat", [False, True])
def test_any_body_gets_200_or_a_4xx_error_promptly(router, chat) -> None:
    url, proc = router
    path = url + ("/v1/chat/completions" if chat else "/v1/completions")

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(raw=bodies(chat), headers=slo_headers, content_type=st.sampled_from(["application/json"] * 8 + ["text/plain", None]))
    def check(raw: bytes, headers: dict[str, str], content_type: str | None) -> None:
        if content_type is not None:
            headers = headers | {"content-type": content_type}
        with httpx.Client(timeout=10) as client:  # a hang is a ReadTimeout: the test fails
            _check_answer(client.post(path, content=raw, headers=headers), raw)

    check()
    assert proc.poll() is None, "the router process died"
    assert httpx.get(url + "/health").status_code == 200
    metrics = httpx.get(url + "/metrics").text
    assert 'outcome="error"' not in metrics
