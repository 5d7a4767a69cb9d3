"""Tokenization for the router: the model's tokenizer (tokenizer.json, or built from a GGUF
file's metadata), its chat template, and streaming detokenization - without importing
transformers.

The chat template is rendered the way Hugging Face renders it (a sandboxed jinja2 environment
with ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson``, the special tokens as
variables), and a rendered chat is encoded without adding special tokens again (the template
carries them), exactly as ``apply_chat_template(tokenize=True)`` does.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _compile_template(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kw)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class RouterTokenizer:
    """Encode prompts, render chats, decode outputs for one model (a folder or a GGUF file)."""

    def __init__(self, model_path: str | Path) -> None:
        from splitserve.modelfiles.read import read_tokenizer, read_tokenizer_config

        tok = read_tokenizer(model_path)
        if tok is None:
            raise FileNotFoundError(
                f"{Path(model_path) / 'tokenizer.json'} not found: the router needs the model's tokenizer"
            )
        self._tok = tok
        cfg = read_tokenizer_config(model_path)
        self.special_tokens = {k: _token_text(cfg.get(k)) for k in _SPECIAL_KEYS}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: HF uses "default"
            template = {t["name"]: t["template"] for t in template}.get("default")
        self._template = _compile_template(template) if template else None
        self.vocab_size = self._tok.get_vocab_size()

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template; use /v1/completions")
        import jinja2

        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as exc:
            # The messages are the client's (any JSON in the extra fields a template may read):
            # whatever the template trips over in them is a bad request, not a server error.
            raise ValueError(f"chat template error: {type(exc).__name__}: {exc}") from exc

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def detokenizer(self, prompt_ids: list[int]) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas.

    Decodes a small window (a few tokens of context plus the new ones) and emits the difference,
    so the cost per token is constant, leading-space rules of SentencePiece-style decoders see
    their context, and a character whose UTF-8 bytes span several tokens is held back (the
    decoder yields U+FFFD) until its last byte arrives.
    """

    CONTEXT = 5

    def __init__(self, tokenizer: RouterTokenizer, prompt_ids: list[int]) -> None:
        self._tok = tokenizer
        self._ids = list(prompt_ids[-self.CONTEXT :])
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, token_ids: list[int]) -> str:
        self._ids.extend(token_ids)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """What is left at the end of the stream (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :]
