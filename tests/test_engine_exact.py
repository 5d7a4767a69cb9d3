"""Greedy generation of the engine equals Hugging Face transformers on the same weights."""

from __future__ import annotations

import pytest
from splitserve.engine.config import RunnerConfig, SchedulerConfig
from splitserve.engine.engine import EngineConfig, LLMEngine
from splitserve.engine.sampling import SamplingParams
from splitserve.testing.hf_reference import hf_greedy, hf_tokenize

PROMPTS = [
    "hello world",
    "the model serve token prompt decode prefill cache block request latency " * 4,
    "a",
    "Explain how the router picks a worker, and why the cache matters for latency?",
]


def test_greedy_matches_transformers(model_variant):
    prompts = hf_tokenize(model_variant, PROMPTS)
    # Small blocks and a tight token budget: several prefill batches, blocks filled mid-decode.
    engine = LLMEngine(
        EngineConfig(
            RunnerConfig(str(model_variant), block_size=8, num_kv_blocks=128),
            SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
        )
    )
    ours = engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert ours == hf_greedy(model_variant, prompts, 24)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_chunked_prefill_matches_transformers(demo_model):
    """The colocated baseline: prompt chunks of at most 16 tokens ride along with decodes."""
    prompts = hf_tokenize(demo_model, PROMPTS)
    engine = LLMEngine(
        EngineConfig(
            RunnerConfig(str(demo_model), block_size=8, num_kv_blocks=128),
            SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16, chunked_prefill=True),
        )
    )
    ours = engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert ours == hf_greedy(demo_model, prompts, 24)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_prefix_reuse_gives_same_tokens(demo_model):
    prompt = hf_tokenize(demo_model, [PROMPTS[1]])[0]
    engine = LLMEngine(EngineConfig(RunnerConfig(str(demo_model), block_size=8, num_kv_blocks=64)))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    first = engine.generate([prompt], params)
    from splitserve.engine.sequence import Sequence

    seq = Sequence("again", prompt, params)
    engine.add(seq)
    while engine.has_work():
        engine.step()
    assert seq.output_token_ids == first[0]
    assert seq.num_cached_tokens >= 8 * ((len(prompt) - 1) // 8) - 8
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_preemption_under_cache_pressure_keeps_results(demo_model):
    prompts = hf_tokenize(demo_model, PROMPTS)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    roomy = LLMEngine(EngineConfig(RunnerConfig(str(demo_model), block_size=8, num_kv_blocks=256)))
    tight = LLMEngine(EngineConfig(RunnerConfig(str(demo_model), block_size=8, num_kv_blocks=16)))
    assert tight.generate(prompts, params) == roomy.generate(prompts, params)


def test_seeded_sampling_is_reproducible(demo_model):
    prompts = hf_tokenize(demo_model, PROMPTS[:2])
    engine = LLMEngine(EngineConfig(RunnerConfig(str(demo_model), num_kv_blocks=64)))
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    assert engine.generate(prompts, params) == engine.generate(prompts, params)


def test_stop_strings_and_max_tokens(demo_model):
    engine = LLMEngine(EngineConfig(RunnerConfig(str(demo_model), num_kv_blocks=64)))
    prompt = hf_tokenize(demo_model, PROMPTS[:1])
    full = engine.generate(prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    text = engine.tokenizer.decode(full)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip("generated text has no usable stop string")
    from splitserve.engine.sequence import Sequence

    seq = Sequence("s", prompt[0], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=(stop,)))
    engine.add(seq)
    while engine.has_work():
        engine.step()
    assert seq.finish_reason == "stop" and seq.stop_string == stop
    assert stop in engine.tokenizer.decode(seq.output_token_ids)
    assert len(seq.output_token_ids) < 20


def test_prompt_over_context_is_refused(demo_model):
    from splitserve.engine.engine import PromptTooLong
    from splitserve.engine.sequence import Sequence

    engine = LLMEngine(EngineConfig(RunnerConfig(str(demo_model), num_kv_blocks=128)))
    with pytest.raises(PromptTooLong, match="context is 1024"):
        engine.add(Sequence("long", [5] * 1024, SamplingParams()))
