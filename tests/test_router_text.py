"""Tokenizer, chat template and streaming detokenizer against transformers; stop-string cutting;
request validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from splitserve.router.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    validation_message,
)
from splitserve.router.output import ChoiceText, _held_tail
from splitserve.router.tokenizer import RouterTokenizer

TEXTS = [
    "Hello world, how are you?",
    "  leading spaces and\nnew lines\n\n",
    "Unicode: héllo wörld, 世界, emoji 🎉🚀 and ½.",
    "",
]
CHATS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is a KV cache? 世界"},
        {"role": "assistant", "content": "Keys and values."},
        {"role": "user", "content": "More."},
    ],
]


@pytest.fixture(scope="module")
def toks(demo_model: Path):
    from transformers import AutoTokenizer

    return RouterTokenizer(demo_model), AutoTokenizer.from_pretrained(str(demo_model))


def test_encode_decode_match_transformers(toks) -> None:
    ours, hf = toks
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"]
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
        ids = ours.encode(text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(toks, gen: bool) -> None:
    ours, hf = toks
    for messages in CHATS:
        assert ours.render_chat(messages, gen) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
        if isinstance(expected, dict) or hasattr(expected, "input_ids"):
            expected = expected["input_ids"]
        assert ours.encode_chat(messages, gen) == list(expected)


def test_incremental_detokenizer_handles_split_characters(toks) -> None:
    ours, hf = toks
    for text in TEXTS[:3]:
        prompt = ours.encode("A prompt")
        ids = ours.encode(text, add_special_tokens=False)
        detok = ours.detokenizer(prompt)
        deltas = [detok.add([t]) for t in ids]
        deltas.append(detok.flush())
        assert "".join(deltas) == hf.decode(ids, skip_special_tokens=True) == text
        assert all("\ufffd" not in d for d in deltas)
    # A multi-byte character really is split across byte tokens in this vocabulary.
    emoji_ids = ours.encode("🎉", add_special_tokens=False)
    assert len(emoji_ids) > 1
    detok = ours.detokenizer([])
    assert [detok.add([t]) for t in emoji_ids][-1] == "🎉"


def test_incremental_detokenizer_flushes_incomplete_character(toks) -> None:
    ours, _ = toks
    ids = ours.encode("🎉", add_special_tokens=False)
    detok = ours.detokenizer([])
    assert detok.add(ids[:1]) == ""
    assert detok.flush() == "\ufffd" * len(ours.decode(ids[:1]))


def test_special_tokens_are_skipped_in_output(toks) -> None:
    ours, _ = toks
    eos = ours.encode("<|im_end|>", add_special_tokens=False)
    detok = ours.detokenizer([])
    assert detok.add(ours.encode("hi", add_special_tokens=False)) + detok.add(eos) + detok.flush() == "hi"


class _FakeDetok:
    """Feeds characters as if each token were one piece of text."""

    def __init__(self, pieces: dict[int, str]) -> None:
        self.pieces = pieces

    def add(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)

    def flush(self) -> str:
        return ""


def _stream(pieces: list[str], stops: list[str], finish_at_end: str = "length", reported: str | None = None):
    choice = ChoiceText(_FakeDetok(dict(enumerate(pieces))), stops)  # type: ignore[arg-type]
    out = []
    for i in range(len(pieces)):
        last = i == len(pieces) - 1
        out.append(choice.add([i], finish_at_end if last else None, reported if last else None))
    return out, choice


def test_stop_string_split_across_chunks_is_never_sent() -> None:
    out, choice = _stream(["Hello", " wor", "ld\n", "\nBye"], ["\n\n"], "stop", "\n\n")
    assert "".join(out) == "Hello world"
    assert out == ["Hello", " wor", "ld", ""]  # the first "\n" was held back, then cut
    assert choice.finish_reason == "stop" and choice.text == "Hello world"


def test_router_cuts_stop_string_before_engine_reports_it() -> None:
    out, choice = _stream(["a", "bSTO", "P", "more", "x"], ["STOP"])
    assert "".join(out) == "ab" and choice.finished and choice.finish_reason == "stop"
    assert out[3:] == ["", ""]  # nothing after the stop


def test_held_back_text_is_released_when_it_does_not_become_a_stop() -> None:
    out, choice = _stream(["x", "ST", "AR", "T"], ["STOP"])
    assert out == ["x", "", "STAR", "T"]
    assert choice.finish_reason == "length"
    assert _held_tail("abcST", ["STOP", "T"]) == 2
    assert _held_tail("abc", ["STOP"]) == 0


def test_no_stops_streams_everything_at_once() -> None:
    out, _ = _stream(["a", "b", "c"], [])
    assert out == ["a", "b", "c"]


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens must be at least 1"),
        ({"model": "m", "prompt": "x", "max_tokens": -5}, "max_tokens must be at least 1"),
        ({"model": "m", "prompt": "x", "temperature": -1}, "temperature"),
        ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "m", "prompt": "x", "top_p": 1.5}, "top_p"),
        ({"model": "m", "prompt": "x", "n": 0}, "n"),
        ({"model": "m", "prompt": "x", "stop": ["", "a"]}, "non-empty"),
        ({"model": "m", "prompt": "x", "logprobs": 21}, "logprobs must be between 0 and 20"),
        ({"model": "m", "prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty is not supported"),
        ({"model": "m", "prompt": "x", "bogus": 1}, "Unrecognized request argument supplied: bogus"),
        ({"model": "m"}, "missing required parameter: prompt"),
        ({"model": "m", "prompt": []}, "prompt must not be empty"),
        ({"model": "m", "prompt": "x", "top_k": 0}, "top_k"),
    ],
)
def test_completion_validation_messages(body: dict, fragment: str) -> None:
    with pytest.raises(ValidationError) as exc:
        CompletionRequest.model_validate(body)
    message, _ = validation_message(exc.value.errors())
    assert fragment in message


def test_chat_validation_and_sampling_json() -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": []})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "wizard", "content": "x"}]})
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
         "max_completion_tokens": 7, "stop": "\n", "seed": 5, "temperature": 0}
    )
    assert req.messages[0].template_dict() == {"role": "user", "content": "ab"}
    assert req.max_tokens == 7
    assert req.sampling(7, 2) == {"max_tokens": 7, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "seed": 7,
                                  "stop": ["\n"], "stop_token_ids": [], "ignore_eos": False, "logprobs": None}
    with_lp = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 3})
    assert with_lp.sampling(4, 0)["logprobs"] == 3
    with pytest.raises(ValidationError, match="top_logprobs needs logprobs"):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3})
    c = CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2], [3]]})
    assert c.prompts() == [[1, 2], [3]]
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2]}).prompts() == [[1, 2]]
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]}).prompts() == ["a", "b"]
