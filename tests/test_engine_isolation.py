"""A request that makes an engine step raise fails alone: the other sequences of its batch finish
with exactly the tokens they get without it, and every block goes back."""

from __future__ import annotations

import pytest
from splitserve.engine import runner as runner_module
from splitserve.engine.config import EngineConfig, RunnerConfig, SchedulerConfig
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling import SamplingParams
from splitserve.engine.sequence import Sequence

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], list(range(20, 45)), [3], [40, 41, 42, 43], [60, 61]]


def make_engine(model_dir, chunked: bool = False, overlap: bool = False) -> LLMEngine:
    return LLMEngine(EngineConfig(
        RunnerConfig(str(model_dir), block_size=8, num_kv_blocks=128),
        SchedulerConfig(chunked_prefill=chunked, max_num_batched_tokens=32 if chunked else 8192),
        overlap=overlap,
    ))


def requests(bad_at: int | None) -> list[Sequence]:
    """Greedy and seeded sampled requests; the one at ``bad_at`` carries its own params object
    (the fault below recognises it by identity)."""
    seqs = []
    for i, prompt in enumerate(PROMPTS):
        sampling = GREEDY if i % 2 == 0 else SamplingParams(max_tokens=10, temperature=0.8, seed=100 + i, ignore_eos=True)
        if i == bad_at:
            sampling = SamplingParams(**{**sampling.to_json(), "stop": (), "stop_token_ids": ()})
        seqs.append(Sequence(f"r{i}", list(prompt), sampling))
    return seqs


def run(engine: LLMEngine, seqs: list[Sequence], add_every: int = 2) -> dict[str, list[int]]:
    """Add the sequences a few at a time (so some join a running batch) and run them out."""
    pending, steps = list(seqs), 0
    while pending or engine.has_work():
        if pending and steps % add_every == 0:
            engine.add(pending.pop(0))
        engine.step()
        steps += 1
    return {s.request_id: s.output_token_ids for s in seqs}


def fault_in_forward(engine: LLMEngine, bad: Sequence, monkeypatch) -> None:
    real = engine.runner.launch

    def launch(seqs, *args, **kwargs):
        if bad in seqs:
            raise RuntimeError("injected fault")
        return real(seqs, *args, **kwargs)

    monkeypatch.setattr(engine.runner, "launch", launch)


def fault_in_sampling(engine: LLMEngine, bad: Sequence, monkeypatch) -> None:
    """Raise after the seeded rows drew: their generators must be restored for the re-run."""
    real = runner_module.sample_tokens

    def sample_tokens(logits, params, generators):
        tokens = real(logits, params, generators)
        if any(p is bad.sampling for p in params):
            raise RuntimeError("injected fault")
        return tokens

    monkeypatch.setattr(runner_module, "sample_tokens", sample_tokens)


@pytest.mark.parametrize("inject", [fault_in_forward, fault_in_sampling])
@pytest.mark.parametrize("chunked, overlap", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("bad_at", [0, 3])
def test_a_failing_sequence_fails_alone_and_the_others_get_the_same_tokens(
    demo_model, monkeypatch, inject, chunked, overlap, bad_at
):
    engine = make_engine(demo_model, chunked, overlap)
    expected = run(engine, requests(None))
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks

    seqs = requests(bad_at)
    bad = seqs[bad_at]
    inject(engine, bad, monkeypatch)
    got = run(engine, seqs)
    assert bad.finish_reason == "error"
    for s in seqs:
        if s is not bad:
            assert got[s.request_id] == expected[s.request_id], s.request_id
            assert s.finish_reason == "length"
    engine.flush()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_a_failed_sequence_is_reported_as_an_error_output(demo_model, monkeypatch):
    engine = make_engine(demo_model)
    seqs = requests(1)
    fault_in_forward(engine, seqs[1], monkeypatch)
    for s in seqs:
        engine.add(s)
    errors = []
    while engine.has_work():
        errors += [out for out in engine.step() if out.error is not None]
    assert [out.seq for out in errors] == [seqs[1]]
    assert errors[0].finished and "injected fault" in str(errors[0].error)


def test_a_first_token_outside_the_vocabulary_fails_only_its_request(demo_model):
    engine = make_engine(demo_model)
    vocab = engine.runner.model_config.vocab_size
    seq = Sequence("kv", [1, 2, 3], GREEDY)
    engine.reserve(seq)
    with pytest.raises(ValueError, match="first token ids out of the vocabulary"):
        engine.activate(seq, vocab)
    engine.abort(seq)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize(
    "field, value",
    [("seed", 2**64), ("seed", -(2**63) - 1), ("seed", 1.5), ("max_tokens", True), ("temperature", float("nan")),
     ("temperature", 1e-30), ("top_p", 0), ("top_k", 2**64), ("logprobs", -1), ("stop", 5),
     ("stop_token_ids", ["a"]), ("ignore_eos", "yes")],
)
def test_sampling_values_the_engine_cannot_run_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams.from_json({field: value})


@pytest.mark.parametrize("seed", [0, 2**63, 2**64 - 1, -(2**63)])
def test_every_seed_the_generator_takes_runs(demo_model, seed):
    engine = make_engine(demo_model)
    out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=1.0, seed=seed))
    assert len(out[0]) == 3
