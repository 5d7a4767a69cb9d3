"""Synthetic prompt text of a drawn token length.

With the served model's tokenizer (a ``tokenizer.json`` loaded with ``tokenizers``) prompts are
token-exact: words are picked from a pool whose per-word token counts are known, and a
byte-level/metaspace BPE tokenizes space-separated words independently, so the counts add up;
the result is re-encoded once to check. Without a tokenizer the length is approximated with the
usual ~0.75 English words per token. Text is random words (seeded), so different requests share
no prefix unless the workload asks for one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

WORDS_PER_TOKEN = 0.75  # rule of thumb for English with BPE tokenizers

_ENGLISH = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "more can about said what out some time into only could new them man two may first then do "
    "any like my now over such our even most made after also did many before must through back "
    "years where much your way well down should because each just those people how too little "
    "state good very make world still own see men work long get here between both life being "
    "under never day same another know while last might us great old year off come since against "
    "go came right used take three system model server request token cache memory batch decode"
).split()


class PromptBuilder:
    """Builds word lists of an exact (or approximate) token count."""

    def __init__(self, tokenizer: object | None = None) -> None:
        self._tok = tokenizer
        if tokenizer is None:
            self._pool = [(" " + w, 1) for w in _ENGLISH]
            self._lens = dict(self._pool)
            self._special = 0
            return
        pool = [(" " + w, self._len(" " + w)) for w in _ENGLISH]
        pool += [(w, 1) for w in self._single_token_words()]
        self._pool = sorted(set(pool), key=lambda x: (x[1], x[0]))
        self._lens = dict(self._pool)
        self._special = self._len(" the", special=True) - self._len(" the")

    @classmethod
    def from_path(cls, path: str | None) -> PromptBuilder:
        """Load ``tokenizer.json`` (the file, or a model folder holding it); None: approximate."""
        if path is None:
            return cls(None)
        from tokenizers import Tokenizer

        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise ValueError(f"tokenizer file not found: {p}")
        return cls(Tokenizer.from_file(str(p)))

    @property
    def exact(self) -> bool:
        """True when counts come from the real tokenizer."""
        return self._tok is not None

    def count(self, text: str) -> int:
        """Prompt tokens as the server counts them (special tokens included); approximate
        (words / 0.75) without a tokenizer."""
        if self._tok is None:
            return max(1, round(len(text.split()) / WORDS_PER_TOKEN))
        return self._len(text, special=True)

    def extend(self, rng: np.random.Generator, head: Sequence[str], target: int) -> list[str]:
        """``head`` plus random words so the prompt has ``target`` tokens (as close as the pool
        allows; the caller re-counts). Without a tokenizer, ``target`` tokens ~ 0.75*target
        words."""
        words = list(head)
        if self._tok is None:
            want = max(1, round(target * WORDS_PER_TOKEN))
            while len(words) < want:
                words.append(self._pool[int(rng.integers(len(self._pool)))][0])
            return words
        remaining = target - self._special - sum(self._word_len(w) for w in head)
        while remaining > 0:
            fits = self._fitting(remaining)
            if fits == 0:
                break  # no word short enough: the prompt ends a few tokens short
            word, n = self._pool[int(rng.integers(fits))]
            words.append(word)
            remaining -= n
        return words

    def _fitting(self, remaining: int) -> int:
        """Number of pool entries (sorted by length) with at most ``remaining`` tokens."""
        lo, hi = 0, len(self._pool)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._pool[mid][1] <= remaining:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _word_len(self, word: str) -> int:
        n = self._lens.get(word)
        return n if n is not None else self._len(word)

    def _len(self, text: str, special: bool = False) -> int:
        return len(self._tok.encode(text, add_special_tokens=special).ids)  # type: ignore[union-attr]

    def _single_token_words(self) -> list[str]:
        """Vocabulary entries that are a space plus letters and encode back to one token
        (byte-level BPE marks the space as 'Ġ', SentencePiece as '▁')."""
        out = []
        for piece in self._tok.get_vocab():  # type: ignore[union-attr]
            if len(piece) < 3 or piece[0] not in "Ġ▁" or not piece[1:].isascii():
                continue
            if not piece[1:].isalpha():
                continue
            word = " " + piece[1:]
            if self._len(word) == 1:
                out.append(word)
        return out
