"""When a sequence stops: EOS, stop token ids, stop strings, max_tokens, the context length.

Stop strings need text, so this is the one place in the engine that detokenizes; it decodes only
a window of recent tokens, long enough to contain any of the request's stop strings.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.engine.sequence import Sequence


@dataclass(frozen=True)
class StopDecision:
    reason: str  # "stop" | "length"
    stop_string: str | None = None


class StopChecker:
    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def check(self, seq: Sequence) -> StopDecision | None:
        params, last = seq.sampling, seq.token_ids[-1]
        if (last in self.eos and not params.ignore_eos) or last in params.stop_token_ids:
            return StopDecision("stop")
        if params.stop:
            hit = self._stop_string(seq)
            if hit is not None:
                return StopDecision("stop", hit)
        length = len(seq.token_ids)
        if length - seq.num_prompt_tokens >= params.max_tokens or length >= self.max_model_len:
            return StopDecision("length")
        return None

    def _stop_string(self, seq: Sequence) -> str | None:
        if self.tokenizer is None:
            raise ValueError("stop strings need the model's tokenizer.json")
        out = seq.output_token_ids
        # Each token is at least one character, so this window holds any stop string that the
        # newest token completed, plus a margin for tokens that decode to partial characters.
        window = max(len(s) for s in seq.sampling.stop) + 4
        text = self.tokenizer.decode(out[-window:], skip_special_tokens=False)
        newest = self.tokenizer.decode(out[-window:-1], skip_special_tokens=False) if len(out) > 1 else ""
        for s in seq.sampling.stop:
            if s in text and s not in newest:
                return s
        return None
