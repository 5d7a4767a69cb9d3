"""Workload sampling: matches the published statistics roughly, reproducible by seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from splitserve.bench.workloads import (
    WORKLOADS,
    LengthCaps,
    arrival_times,
    build_requests,
    fit_sigma,
    get_workload,
    sample_lengths,
)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model's tokenizer (byte-level BPE, trained locally in well under a second)."""
    from splitserve.engine.demo_model import train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(512, 0).save(str(path))
    return path


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_sampled_lengths_match_published_targets(name: str) -> None:
    w = WORKLOADS[name]
    inp, out = sample_lengths(w, 20000, seed=0)
    for dist, x in ((w.input, inp), (w.output, out)):
        assert np.median(x) == pytest.approx(dist.median, rel=0.06)
        if dist.target_mean is not None:
            assert x.mean() == pytest.approx(dist.target_mean, rel=0.2)
        if dist.target_p90 is not None:
            assert np.percentile(x, 90) == pytest.approx(dist.target_p90, rel=0.15)
    if w.output.hard_max is not None:
        assert out.max() <= w.output.hard_max


def test_fit_sigma_exact_cases() -> None:
    # only a p90: solved exactly; only a mean: solved exactly
    assert fit_sigma(None, 100.0, 100.0 * np.exp(1.2815515655446004 * 0.8)) == pytest.approx(0.8)
    assert fit_sigma(100.0 * np.exp(0.5 ** 2 / 2), 100.0, None) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        fit_sigma(50.0, 100.0, None)


def test_same_seed_same_requests_different_seed_different(tokenizer_path: Path) -> None:
    a = build_requests("chat", 30, rate=2.0, seed=7, tokenizer_path=str(tokenizer_path))
    b = build_requests("chat", 30, rate=2.0, seed=7, tokenizer_path=str(tokenizer_path))
    c = build_requests("chat", 30, rate=2.0, seed=8, tokenizer_path=str(tokenizer_path))
    assert a.requests == b.requests
    assert [r.prompt for r in a.requests] != [r.prompt for r in c.requests]
    # another rate: identical lengths, arrival pattern time-scaled, new text (no cache hits
    # from the previous rate of a sweep)
    d = build_requests("chat", 30, rate=4.0, seed=7, tokenizer_path=str(tokenizer_path))
    assert [(r.prompt_tokens, r.max_tokens) for r in a.requests] == \
        [(r.prompt_tokens, r.max_tokens) for r in d.requests]
    assert not {r.prompt for r in a.requests} & {r.prompt for r in d.requests}
    for ra, rd in zip(a.requests, d.requests, strict=True):
        assert rd.arrival_s == pytest.approx(ra.arrival_s / 2)


def test_prompts_are_token_exact_and_fit_the_caps(tokenizer_path: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    caps = LengthCaps(max_input=700, max_output=100, max_context=768)
    reqs = build_requests("conversation", 40, rate=1.0, seed=0, caps=caps,
                          tokenizer_path=str(tokenizer_path))
    inp, out = sample_lengths(get_workload("conversation"), 40, 0, caps)
    for r, n_in, n_out in zip(reqs.requests, inp, out, strict=True):
        assert r.prompt_tokens == len(tok.encode(r.prompt).ids) == n_in
        assert r.max_tokens == n_out <= 100
        assert r.prompt_tokens <= 700 and r.prompt_tokens + r.max_tokens <= 768
    assert reqs.exact_lengths


def test_long_conversation_reuses_prefixes(tokenizer_path: Path) -> None:
    reqs = build_requests("long_conversation", 60, rate=1.0, seed=0,
                          caps=LengthCaps(max_context=1024), tokenizer_path=str(tokenizer_path))
    children = [r for r in reqs.requests if r.prefix_of is not None]
    assert children, "expected some requests to continue earlier ones"
    for r in children:
        assert r.prompt.startswith(reqs.requests[r.prefix_of].prompt)


def test_without_tokenizer_lengths_are_approximate_words() -> None:
    reqs = build_requests("chat", 20, rate=1.0, seed=0)
    assert not reqs.exact_lengths
    for r in reqs.requests:
        assert len(r.prompt.split()) == max(1, round(r.prompt_tokens * 0.75))


def test_arrivals_rate_and_burstiness() -> None:
    t = arrival_times(20000, rate=5.0, seed=0)
    gaps = np.diff(t)
    assert t[0] == 0.0
    assert 1 / gaps.mean() == pytest.approx(5.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # Poisson
    bursty = np.diff(arrival_times(20000, rate=5.0, seed=0, cv=3.0))
    assert bursty.std() / bursty.mean() == pytest.approx(3.0, rel=0.1)
    with pytest.raises(ValueError, match="rate"):
        arrival_times(10, rate=0.0, seed=0)


def test_bad_inputs_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        get_workload("nope")
    with pytest.raises(ValueError, match="max_context"):
        LengthCaps(max_context=1)
    with pytest.raises(ValueError, match="scale"):
        LengthCaps(scale=0)
