"""The sampler: batched top-k/top-p equals the textbook per-row filter, seeded rows do not depend
on their batch, greedy rows are the argmax, and draws follow the filtered distribution."""

from __future__ import annotations

import pytest
import torch
from splitserve.engine.sampling import SamplingParams, _filter_sorted, make_generator, sample_tokens


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Per row, in vocabulary order: temperature, keep the top_k largest, then the smallest set
    of the most likely tokens whose mass reaches top_p (the one crossing it included)."""
    row = logits.float() / p.temperature
    if 0 < p.top_k < row.numel():
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = row.softmax(-1)
    if p.top_p < 1.0:
        values, order = probs.sort(descending=True)
        keep = values.cumsum(-1) - values <= p.top_p
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter(0, order, keep)
        probs = probs.masked_fill(~mask, 0.0)
        probs = probs / probs.sum()
    return probs


def batched_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    temps = torch.tensor([p.temperature for p in params])[:, None]
    sorted_logits, order = (logits.float() / temps).sort(-1, descending=True)
    sorted_probs = _filter_sorted(sorted_logits, params).softmax(-1)
    return torch.zeros_like(sorted_probs).scatter(1, order, sorted_probs)


@pytest.mark.parametrize("vocab", [7, 50, 1000])
def test_batched_filter_matches_the_per_row_definition(vocab):
    torch.manual_seed(vocab)
    params = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=3),
        SamplingParams(temperature=1.3, top_p=0.5),
        SamplingParams(temperature=0.9, top_k=5, top_p=0.8),
        SamplingParams(temperature=2.0, top_k=vocab + 10),  # larger than the vocabulary: off
        SamplingParams(temperature=0.5, top_p=0.01),  # only the most likely token is left
    ]
    logits = torch.randn(len(params), vocab) * 3
    ours = batched_probs(logits, params)
    for i, p in enumerate(params):
        torch.testing.assert_close(ours[i], reference_probs(logits[i], p), atol=1e-6, rtol=1e-5)
    assert (ours[5] > 0).sum() == 1 and ours[5].argmax() == logits[5].argmax()


def test_seeded_rows_do_not_depend_on_their_batch():
    torch.manual_seed(0)
    logits = torch.randn(5, 300)
    logits[4] = logits[1]  # the same request's row twice, each with a fresh generator
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=1234)
    params = [SamplingParams(temperature=0), seeded, SamplingParams(temperature=1.0),
              SamplingParams(temperature=1.0, top_k=10), seeded]  # fmt: skip
    draws = []
    for _ in range(2):
        gens = [make_generator(p, logits.device) for p in params]
        draws.append(sample_tokens(logits, params, gens).tolist())
    alone = sample_tokens(logits[1:2], [seeded], [make_generator(seeded, logits.device)]).tolist()
    assert draws[0][1] == draws[1][1] == alone[0] == draws[0][4]
    assert draws[0][0] == int(logits[0].argmax())


def test_unseeded_draws_follow_the_filtered_distribution():
    torch.manual_seed(1)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    p = SamplingParams(temperature=0.8, top_k=4, top_p=0.95)
    n = 20_000
    tokens = sample_tokens(logits.expand(n, -1), [p] * n, [None] * n)
    freq = torch.bincount(tokens, minlength=6).float() / n
    want = reference_probs(logits[0], p)
    assert freq[4:].sum() == 0  # outside top-k: never drawn
    torch.testing.assert_close(freq, want, atol=0.015, rtol=0)


def test_greedy_and_sampled_rows_mix():
    torch.manual_seed(2)
    logits = torch.randn(4, 40)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1e-4),
              SamplingParams(temperature=0), SamplingParams(temperature=1e-4, top_k=2)]  # fmt: skip
    tokens = sample_tokens(logits, params, [None] * 4)
    # a vanishing temperature samples the argmax too
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_logprobs_are_the_models_own_log_softmax():
    from splitserve.engine.sampling import Logprobs

    torch.manual_seed(3)
    logits = torch.randn(4, 50)
    tokens = torch.tensor([5, 7, 9, 11])
    lp = Logprobs(logits, tokens, rows=[1, 3], top=[2, 0])
    lp.to_host()
    got = lp.entries(tokens.tolist())
    ref = logits.log_softmax(-1)
    assert set(got) == {1, 3}
    assert got[1]["token_id"] == 7 and got[1]["logprob"] == pytest.approx(float(ref[1, 7]), abs=1e-6)
    values, ids = ref[1].topk(2)
    assert [t for t, _ in got[1]["top"]] == ids.tolist()
    assert [v for _, v in got[1]["top"]] == pytest.approx(values.tolist(), abs=1e-6)
    assert got[3]["top"] == [] and got[3]["logprob"] == pytest.approx(float(ref[3, 11]), abs=1e-6)
