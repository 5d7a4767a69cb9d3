"""The sampler (its parameters, the JSON that travels router -> workers, are in
``splitserve.protocol``).

Greedy rows are one batched argmax; sampled rows apply temperature, top-k and top-p in one
batched pass; a request with a ``seed`` draws from its own generator, so it gives the same
tokens on any worker and at any batch composition.
"""

from __future__ import annotations

import torch
from splitserve.engine.host_copy import to_device, to_host
from splitserve.protocol.messages import LogprobEntry
from splitserve.protocol.sampling import SamplingParams

__all__ = ["Logprobs", "SamplingParams", "make_generator", "sample_tokens"]


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request RNG when the request asks for a seed; None means the global RNG."""
    if params.seed is None or params.greedy:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def _filter_sorted(sorted_logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Top-k then top-p on logits sorted in descending order, one row per entry of ``params``
    (masked entries become -inf). Top-p applies to the distribution top-k left, and always keeps
    the token that crosses ``top_p``."""
    rows, vocab = sorted_logits.shape
    dev = sorted_logits.device
    if any(0 < p.top_k < vocab for p in params):
        ks = to_device([p.top_k if 0 < p.top_k < vocab else vocab for p in params], dev, torch.int64)
        beyond = torch.arange(vocab, device=dev)[None, :] >= ks[:, None]
        sorted_logits = sorted_logits.masked_fill(beyond, float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        # rows without top-p keep everything (a cumulative sum can round past 1.0)
        ps = to_device([p.top_p if p.top_p < 1.0 else float("inf") for p in params], dev, torch.float32)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > ps[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return sorted_logits


def _sample_one(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of ``probs``: argmax of p / E with E ~ Exp(1) picks token i with
    probability p_i (torch.multinomial's own one-sample path, written out because some torch
    versions check its input with a synchronising ``.item()``). E is kept above 0 so that a
    masked token (p = 0) can never win by 0/0."""
    e = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=torch.finfo(probs.dtype).tiny)
    return (probs / e).argmax(-1)


def _draw(
    logits: torch.Tensor, params: list[SamplingParams], generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row of ``logits (rows, vocab)``: temperature, top-k/top-p, a draw. Filters
    work on the sorted rows (one sort for the whole batch) and the draw maps back through it."""
    temps = to_device([p.temperature for p in params], logits.device, torch.float32)
    logits = logits / temps[:, None]
    if all(p.top_k == -1 and p.top_p == 1.0 for p in params):
        return _sample_one(logits.softmax(-1), generator)
    sorted_logits, order = logits.sort(-1, descending=True)
    probs = _filter_sorted(sorted_logits, params).softmax(-1)
    return order.gather(1, _sample_one(probs, generator)[:, None])[:, 0]


def sample_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """One next token per row of ``logits (B, vocab)``, left on the logits' device: nothing here
    waits for the GPU, so the engine can queue its next step before these tokens reach the host.

    Greedy rows: one argmax. Sampled rows without a seed: one batched draw (a handful of kernels
    for the whole batch, not per row). Rows with a seed draw alone from their own generator, so
    their tokens do not depend on the batch they ran in."""
    out = logits.argmax(-1)  # on the model's dtype: widening is exact, so the same argmax
    if all(p.greedy for p in params):
        return out
    logits = logits.float()
    shared = [i for i, p in enumerate(params) if not p.greedy and generators[i] is None]
    if len(shared) == len(params):
        out = _draw(logits, params, None)
    elif shared:
        rows = to_device(shared, logits.device, torch.int64)
        out = out.index_copy(0, rows, _draw(logits.index_select(0, rows), [params[i] for i in shared], None))
    for i, p in enumerate(params):
        if not p.greedy and generators[i] is not None:
            out[i] = _draw(logits[i : i + 1], [p], generators[i])[0]
    return out


class Logprobs:
    """Log-probabilities of the model's own distribution (before temperature and filtering, as
    OpenAI reports them) for the rows that asked: computed on the device in one batched pass
    when the step is queued, and copied to the host with its tokens (``to_host``), so asking for
    logprobs costs no per-row synchronisation and does not stop the next step being queued."""

    def __init__(self, logits: torch.Tensor, tokens: torch.Tensor, rows: list[int], top: list[int]) -> None:
        self.rows, self.top = rows, top
        index = to_device(rows, logits.device, torch.int64)
        lp = logits.index_select(0, index).float().log_softmax(-1)
        self.chosen = lp.gather(1, tokens.index_select(0, index)[:, None])[:, 0]
        self.top_values, self.top_ids = lp.topk(max(top), -1) if max(top) else (lp[:, :0], lp[:, :0].long())

    def to_host(self) -> None:
        """Start the copies to the host (they land with the step's tokens: read them after its
        event)."""
        self.chosen, self.top_values, self.top_ids = (
            to_host(t) for t in (self.chosen, self.top_values, self.top_ids)
        )

    def entries(self, tokens: list[int]) -> dict[int, LogprobEntry]:
        """Row -> its entry, as token lines carry it; call once landed."""
        chosen, values, ids = self.chosen.tolist(), self.top_values.tolist(), self.top_ids.tolist()
        return {
            row: {
                "token_id": tokens[row],
                "logprob": chosen[i],
                "top": [[t, v] for t, v in zip(ids[i][:k], values[i][:k], strict=True)],
            }
            for i, (row, k) in enumerate(zip(self.rows, self.top, strict=True))
        }
