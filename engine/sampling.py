"""Sampling parameters (the JSON that travels router -> workers) and the sampler.

Greedy rows are one batched argmax; sampled rows apply temperature, top-k and top-p and draw
from a per-request generator, so a request with a ``seed`` gives the same tokens on any worker
and at any batch composition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from splitserve.engine.config import MAX_LOGPROBS


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; n: the chosen token's logprob and the top n

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown sampling field(s): {', '.join(sorted(unknown))}")
        values = dict(data)
        for name in ("stop", "stop_token_ids"):
            if name in values:
                raw = values[name]
                values[name] = tuple([raw] if isinstance(raw, str) else (raw or ()))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stop"] = list(self.stop)
        out["stop_token_ids"] = list(self.stop_token_ids)
        return out


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request RNG when the request asks for a seed; None means the global RNG."""
    if params.seed is None or params.greedy:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """One next token per row of ``logits (B, vocab)``, left on the logits' device: nothing here
    waits for the GPU, so the engine can queue its next step before these tokens reach the host."""
    logits = logits.float()
    out = logits.argmax(-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = _filter_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p)
        out[i] = torch.multinomial(row.softmax(-1), 1, generator=generators[i])[0]
    return out


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """``sample_tokens``, brought to the host."""
    return sample_tokens(logits, params, generators).tolist()


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> dict[str, Any]:
    """Log-probabilities of the model's own distribution (before temperature and filtering, as
    OpenAI reports them) for one row: the chosen token's and the ``top`` most likely tokens'."""
    lp = logits.float().log_softmax(-1)
    values, ids = lp.topk(top) if top else (lp[:0], lp[:0].long())
    return {
        "token_id": token,
        "logprob": float(lp[token]),
        "top": [[int(i), float(v)] for i, v in zip(ids.tolist(), values.tolist(), strict=True)],
    }
