"""Build a model's tokenizer and tokenizer config from a GGUF file's metadata.

A GGUF has no tokenizer.json: it stores the vocabulary, merges (or SentencePiece scores), token
types, special token ids and chat template under ``tokenizer.*`` keys. From them we build the
same ``tokenizers.Tokenizer`` that transformers builds for the file (byte-level BPE for
``gpt2`` vocabularies such as SmolLM2, Llama 3 and Qwen2; SentencePiece-style BPE with byte
fallback for ``llama`` vocabularies such as Llama 2 and Mistral), and the tokenizer_config.json
dict the router reads, so a GGUF is tokenized and templated exactly as a Hugging Face folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitserve.modelfiles.gguf_file import metadata

if TYPE_CHECKING:
    from tokenizers import Tokenizer

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (1 is normal)

# Pre-tokenizer split rules of the vocabularies whose merges were learned on them, by the
# file's ``tokenizer.ggml.pre``; the rest use GPT-2's rule, built into ByteLevel.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_RULES = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}

_SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte, the alphabet of byte-level vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    spelling = {b: chr(b) for b in printable}
    spelling.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return spelling


def _byte_level(tokens: list[str], merges: list[str], pre: str | None) -> Tokenizer:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # A control token like <|im_start|> is already spelled in the alphabet; one that is not is
    # re-spelled byte by byte, as transformers does, so the vocabulary keeps its size.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i for i, t in enumerate(tokens)
    }
    model = models.BPE(
        vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
        continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
    )
    tok = Tokenizer(model)
    split = SPLIT_RULES.get(pre or "")
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tok.decoder = decoders.ByteLevel()
    return tok


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece files store scores, not merges: every split of a token into two tokens is a
    merge, ranked by the merged token's score (higher first), as transformers derives them."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, scores, strict=True):
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found.extend((left, right, score) for left, right in pairs)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _sentencepiece(tokens: list[str], scores: list[float], unk: str | None, add_space_prefix: bool) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    model = models.BPE(
        vocab={t: i for i, t in enumerate(tokens)}, merges=_merges_from_scores(tokens, scores),
        unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None,
    )
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _add_bos_default(path: str | Path) -> bool:
    """llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise."""
    flag = metadata(path, "tokenizer.ggml.add_bos_token")
    return bool(flag) if flag is not None else metadata(path, "tokenizer.ggml.model") == "llama"


def gguf_tokenizer(path: str | Path) -> Tokenizer:
    """The file's tokenizer as a ``tokenizers.Tokenizer``."""
    from tokenizers import AddedToken, processors

    kind = metadata(path, "tokenizer.ggml.model")
    tokens = metadata(path, "tokenizer.ggml.tokens")
    types = metadata(path, "tokenizer.ggml.token_type") or [1] * len(tokens)
    cfg = gguf_tokenizer_config(path)
    if kind == "gpt2":
        tok = _byte_level(tokens, metadata(path, "tokenizer.ggml.merges") or [], metadata(path, "tokenizer.ggml.pre"))
    elif kind == "llama":
        add_space = metadata(path, "tokenizer.ggml.add_space_prefix")
        tok = _sentencepiece(
            tokens, metadata(path, "tokenizer.ggml.scores"), cfg["unk_token"], add_space is None or bool(add_space)
        )
    else:
        raise ValueError(f"{Path(path).name}: tokenizer model {kind!r} is not supported (gpt2 or llama)")
    # Control tokens (<|im_start|>) are special, user-defined ones (<think>) plain added tokens:
    # both must match whole in text. In a byte-level vocabulary a "control" token outside the
    # byte alphabet is a mislabel of llama.cpp's and stays an ordinary token, as in transformers.
    alphabet = set(_bytes_to_unicode().values()) if kind == "gpt2" else None
    vocab = tok.get_vocab()
    tok.add_special_tokens([
        AddedToken(t, normalized=False, special=True)
        for t, k in zip(tokens, types, strict=True)
        if k == CONTROL and (alphabet is None or set(t) <= alphabet)
    ])
    tok.add_tokens([
        AddedToken(t, normalized=False, special=False)
        for t, k in zip(tokens, types, strict=True) if k == USER_DEFINED and t in vocab
    ])
    single, specials = "$A", []
    bos_id = metadata(path, "tokenizer.ggml.bos_token_id")
    if cfg["add_bos_token"] and bos_id is not None:
        single = f"{cfg['bos_token']} $A"
        specials.append((cfg["bos_token"], int(bos_id)))
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    return tok


def gguf_tokenizer_config(path: str | Path) -> dict[str, Any]:
    """The tokenizer_config.json a Hugging Face folder would have: special tokens as text, the
    chat template, whether BOS is added."""
    tokens = metadata(path, "tokenizer.ggml.tokens")
    cfg: dict[str, Any] = {
        name: (tokens[i] if (i := metadata(path, key)) is not None else None) for name, key in _SPECIAL_IDS.items()
    }
    cfg["chat_template"] = metadata(path, "tokenizer.chat_template")
    cfg["add_bos_token"] = _add_bos_default(path)
    return cfg
