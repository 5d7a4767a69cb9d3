"""OpenAI's two logprobs shapes, from the workers' per-token entries (``protocol.LogprobEntry``).

Completions: parallel lists (tokens, token_logprobs, top_logprobs, text_offset). Chat: one object
per token with its bytes. Token text is each token decoded alone (special tokens included), so a
token that is part of a multi-byte character shows as a replacement character, as OpenAI's do.
"""

from __future__ import annotations

from typing import Any

from splitserve.protocol import LogprobEntry
from splitserve.router.tokenizer import RouterTokenizer


class LogprobsFormatter:
    def __init__(self, tokenizer: RouterTokenizer, chat: bool) -> None:
        self.tokenizer, self.chat = tokenizer, chat
        self.offset = 0  # characters of token text so far (completions' text_offset)

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def format(self, entries: list[LogprobEntry | None]) -> dict[str, Any]:
        entries = [e for e in entries if e is not None]
        if self.chat:
            return {"content": [self._chat_entry(e) for e in entries]}
        tokens = [self._text(e["token_id"]) for e in entries]
        offsets = []
        for t in tokens:
            offsets.append(self.offset)
            self.offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{self._text(i): lp for i, lp in e["top"]} for e in entries],
            "text_offset": offsets,
        }

    def _chat_entry(self, e: LogprobEntry) -> dict[str, Any]:
        def one(token_id: int, logprob: float) -> dict[str, Any]:
            text = self._text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {**one(e["token_id"], e["logprob"]), "top_logprobs": [one(i, lp) for i, lp in e["top"]]}
