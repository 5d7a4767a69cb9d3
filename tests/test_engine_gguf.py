"""GGUF files load as their Hugging Face folders do: the same weights (exactly in F32, within
each quantization's error otherwise), the same greedy tokens as transformers' GGUF loading, the
same tokenizer and chat template; what cannot be served is refused by name.

The files are the small random demo models written as GGUF by tests/gguf_testing.py, so every
weight type and architecture is covered in a second; tests/test_gguf_smollm2.py covers the
real default model.
"""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_VARIANTS
from gguf_testing import write_gguf
from splitserve.engine.demo_model import init_demo_model
from splitserve.engine.loader import load_model

ARCHITECTURES = ["llama-gqa", "qwen2-tied", "mistral-mha", "llama3-rope"]
# Relative error of a weight matrix after quantization (random normal weights, 32-wide blocks).
TOLERANCE = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q5_1": 4e-2, "Q5_0": 5e-2, "Q4_1": 8e-2, "Q4_0": 1e-1}
CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=ARCHITECTURES)
def variant(request, tmp_path_factory):
    folder = init_demo_model(tmp_path_factory.mktemp(request.param), MODEL_VARIANTS[request.param])
    return folder, write_gguf(folder, tmp_path_factory.mktemp("gguf") / "model-f32.gguf")


def _weights(path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_model(path, torch.float32, CPU).state_dict().items()}


def test_f32_gguf_has_exactly_the_folders_weights(variant):
    """Names, the Q/K row order (permuted for Llama and Mistral, not for Qwen2), biases and tied
    embeddings all come back as the folder has them, bit for bit."""
    folder, gguf = variant
    ours, expected = _weights(gguf), _weights(folder)
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name


def test_llama3_rope_factors_rotate_as_the_folders_scaling(variant):
    """A GGUF stores Llama 3's RoPE scaling as per-pair factors (rope_freqs), not parameters."""
    folder, gguf = variant
    ours = load_model(gguf, torch.float32, CPU)
    expected = load_model(folder, torch.float32, CPU)
    torch.testing.assert_close(ours.rope_cos, expected.rope_cos, rtol=0, atol=2e-5)
    torch.testing.assert_close(ours.rope_sin, expected.rope_sin, rtol=0, atol=2e-5)


@pytest.mark.parametrize("kind", sorted(TOLERANCE))
def test_quantized_weights_are_within_the_types_error(demo_model, tmp_path, kind):
    gguf = write_gguf(demo_model, tmp_path / f"model-{kind}.gguf", kind)
    ours, expected = _weights(gguf), _weights(demo_model)
    for name, tensor in expected.items():
        error = (ours[name] - tensor).norm() / tensor.norm()
        assert error < TOLERANCE[kind], (name, float(error))


def test_greedy_tokens_equal_transformers_gguf_loading(demo_model, tmp_path):
    """Q8_0 weights, dequantized by us and by transformers: the same model, the same tokens."""
    from splitserve.engine.config import RunnerConfig
    from splitserve.engine.engine import EngineConfig, LLMEngine
    from splitserve.engine.sampling import SamplingParams
    from splitserve.testing.hf_reference import hf_greedy

    gguf = write_gguf(demo_model, tmp_path / "model-q8.gguf", "Q8_0")
    prompts = [[1, 17, 99, 250, 3, 64], [1, 400, 12]]
    engine = LLMEngine(EngineConfig(RunnerConfig(str(gguf), block_size=8, num_kv_blocks=64)))
    ours = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert ours == hf_greedy(gguf, prompts, 12)


def test_tokenizer_and_chat_template_equal_the_folders(variant):
    from splitserve.router.tokenizer import RouterTokenizer

    folder, gguf = variant
    ours, expected = RouterTokenizer(gguf), RouterTokenizer(folder)
    for text in ["hello world", "  two  spaces\nand a new line", "café ☕ 12345", "<|im_start|>user hi<|im_end|>"]:
        ids = expected.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == expected.decode(ids)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "how are you?"}]
    assert ours.render_chat(chat) == expected.render_chat(chat)
    assert ours.encode_chat(chat) == expected.encode_chat(chat)
    assert ours.special_tokens == expected.special_tokens


def test_config_and_served_name_come_from_the_file(variant):
    from splitserve.engine.config import ModelConfig
    from splitserve.modelfiles.read import model_name

    folder, gguf = variant
    ours, expected = ModelConfig.from_pretrained(gguf), ModelConfig.from_pretrained(folder)
    for field in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "intermediate_size",
                  "vocab_size", "rope_theta", "tie_word_embeddings", "attention_bias", "bos_token_id"):
        assert getattr(ours, field) == getattr(expected, field), field
    assert model_name(gguf) == "model-f32" and model_name(folder) == folder.name


def test_a_weight_type_we_do_not_dequantize_is_refused_by_name(demo_model, tmp_path):
    gguf = write_gguf(demo_model, tmp_path / "model-i8.gguf", "I8")
    with pytest.raises(ValueError, match=r"tensor output\.weight has type I8"):
        load_model(gguf, torch.float32, CPU)


def test_sentencepiece_vocabulary_tokenizes_as_transformers_does(tmp_path):
    """Llama 2 / Mistral files: merges derived from scores, byte fallback, BOS added, the
    leading space SentencePiece adds and strips."""
    from gguf_testing import write_sentencepiece_gguf
    from splitserve.router.tokenizer import RouterTokenizer
    from splitserve.testing.hf_reference import hf_tokenizer

    gguf = write_sentencepiece_gguf(tmp_path / "spm.gguf")
    ours, theirs = RouterTokenizer(gguf), hf_tokenizer(gguf)
    for text in ["the world and a thin", "  two spaces", "hello wörld\n", "and</s>the"]:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
