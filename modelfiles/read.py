"""Where a model's configuration and tokenizer are read from: a Hugging Face folder or a GGUF file.

Every reader of a model (the workers' config and tokenizer, the router's tokenizer, chat template
and context length) goes through these few functions, so both formats are handled in one place
and in the same way. Torch-free: the router uses it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitserve.modelfiles.gguf_file import gguf_config, is_gguf

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def model_name(path: str | Path) -> str:
    """The name a model is served under by default: the folder's name, or the file's without
    its extension (``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct.Q4_1``)."""
    path = Path(path)
    return path.stem if is_gguf(path) else path.name


def read_config(path: str | Path) -> dict[str, Any]:
    """The model's ``config.json`` dict (for a GGUF, built from its metadata)."""
    if is_gguf(path):
        return gguf_config(path)
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: is {path} a Hugging Face model folder or a GGUF file?")
    return json.loads(file.read_text())


def read_tokenizer(path: str | Path) -> Tokenizer | None:
    """The model's ``tokenizers.Tokenizer``, or None for a folder without tokenizer.json."""
    if is_gguf(path):
        from splitserve.modelfiles.gguf_tokenizer import gguf_tokenizer

        return gguf_tokenizer(path)
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    return Tokenizer.from_file(str(file)) if file.is_file() else None


def read_tokenizer_config(path: str | Path) -> dict[str, Any]:
    """The model's ``tokenizer_config.json`` dict (special tokens, chat template); {} if none."""
    if is_gguf(path):
        from splitserve.modelfiles.gguf_tokenizer import gguf_tokenizer_config

        return gguf_tokenizer_config(path)
    file = Path(path) / "tokenizer_config.json"
    return json.loads(file.read_text()) if file.is_file() else {}
