"""Text of one choice as its tokens arrive: detokenize, hold back what may start a stop string,
cut at the stop string.

The engine stops generating at a stop string and reports which one (``stop_string``); the text
it matched may span several chunks, so while stop strings are set the router never emits the
longest tail of the text that could still be the start of one. The stop string itself is not
part of the output (OpenAI semantics).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.router.tokenizer import IncrementalDetokenizer


def _held_tail(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@dataclass
class ChoiceText:
    detok: IncrementalDetokenizer
    stops: list[str]
    text: str = ""  # all text decoded so far (before cutting)
    emitted: int = 0  # characters of ``text`` already handed out
    num_tokens: int = 0
    finished: bool = False
    finish_reason: str | None = None
    _parts: list[str] = field(default_factory=list)

    def add(self, token_ids: list[int], finish_reason: str | None, stop_string: str | None) -> str:
        """Feed one chunk from the decode stream; returns the text delta to send now."""
        if self.finished:
            return ""
        self.num_tokens += len(token_ids)
        self.text += self.detok.add(token_ids)
        if finish_reason is not None:
            self.text += self.detok.flush()
        cut = self._find_stop(stop_string)
        if cut is not None:
            self.text = self.text[:cut]
            finish_reason = "stop"
        if finish_reason is not None or cut is not None:
            self.finished, self.finish_reason = True, finish_reason
            end = len(self.text)
        else:
            end = len(self.text) - (_held_tail(self.text, self.stops) if self.stops else 0)
        delta = self.text[self.emitted : max(end, self.emitted)]
        self.emitted = max(end, self.emitted)
        return delta

    def _find_stop(self, reported: str | None) -> int | None:
        """Index where the earliest stop string starts (searching only text not yet emitted)."""
        candidates = list(self.stops)
        if reported and reported not in candidates:
            candidates.append(reported)
        if not candidates:
            return None
        start = max(0, self.emitted - max(len(s) for s in candidates))
        hits = [i for s in candidates if (i := self.text.find(s, start)) >= 0]
        return max(min(hits), self.emitted) if hits else None
