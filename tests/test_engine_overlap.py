"""The overlapped engine (each decode step queued before the previous step's tokens reach the
host) gives the same tokens, stops and block accounting as the synchronous one.

On the CPU a queued step computes at once, so these tests check the bookkeeping (placeholders,
tokens gathered from the previous step's samples, one-step-late stop checks, blocks held while a
step may still write them), not the speed: that is bench/engine.py's on a GPU.
"""

from __future__ import annotations

import pytest
from splitserve.engine.config import RunnerConfig, SchedulerConfig
from splitserve.engine.engine import EngineConfig, LLMEngine
from splitserve.engine.sampling import SamplingParams
from splitserve.engine.sequence import PLACEHOLDER, Sequence
from splitserve.testing.hf_reference import hf_greedy, hf_tokenize

PROMPTS = [
    "hello world",
    "the model serve token prompt decode prefill cache block request latency " * 3,
    "a",
    "Explain how the router picks a worker?",
]


def make_engine(model_dir, overlap: bool, blocks: int = 128, **sched) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            RunnerConfig(str(model_dir), block_size=8, num_kv_blocks=blocks),
            SchedulerConfig(**{"max_num_seqs": 8, "max_num_batched_tokens": 64, **sched}),
            overlap=overlap,
        )
    )


def run(engine: LLMEngine, seqs: list[Sequence]) -> list[list[int]]:
    for seq in seqs:
        engine.add(seq)
    return finish(engine, seqs)


def finish(engine: LLMEngine, seqs: list[Sequence]) -> list[list[int]]:
    """Step to the end; nothing may be left waiting for a token or holding a block."""
    while engine.has_work():
        engine.step()
    assert all(PLACEHOLDER not in s.token_ids for s in seqs)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    return [s.output_token_ids for s in seqs]


def test_overlapped_greedy_matches_transformers(model_variant):
    prompts = hf_tokenize(model_variant, PROMPTS)
    engine = make_engine(model_variant, overlap=True)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    ours = run(engine, [Sequence(f"s{i}", p, params) for i, p in enumerate(prompts)])
    assert ours == hf_greedy(model_variant, prompts, 20)


@pytest.mark.parametrize("chunked", [False, True])
def test_overlap_changes_nothing_but_timing(demo_model, chunked):
    """Mixed lengths, a stop token hit mid-flight, seeded sampling and different max_tokens: the
    same outputs and finish reasons with and without overlap."""
    prompts = hf_tokenize(demo_model, PROMPTS)
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    probe = run(make_engine(demo_model, overlap=False), [Sequence("p", prompts[1], greedy)])[0]
    stop_at = probe[9]  # sequence 1 stops at its 10th token (or earlier if it repeats)

    def requests() -> list[Sequence]:
        return [
            Sequence("a", prompts[0], SamplingParams(max_tokens=17, temperature=0, ignore_eos=True)),
            Sequence("b", prompts[1], SamplingParams(max_tokens=30, temperature=0,
                                                     stop_token_ids=[stop_at])),
            Sequence("c", prompts[2], SamplingParams(max_tokens=25, temperature=0.8, top_p=0.9,
                                                     seed=7, ignore_eos=True)),
            Sequence("d", prompts[3], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)),
        ]

    kw = {"chunked_prefill": True, "max_num_batched_tokens": 16} if chunked else {}
    sync_seqs, overlap_seqs = requests(), requests()
    assert run(make_engine(demo_model, overlap=False, **kw), sync_seqs) == run(
        make_engine(demo_model, overlap=True, **kw), overlap_seqs
    )
    assert [s.finish_reason for s in overlap_seqs] == [s.finish_reason for s in sync_seqs]
    assert overlap_seqs[1].finish_reason == "stop"
    assert overlap_seqs[1].output_token_ids[-1] == stop_at


def test_outputs_arrive_one_step_late_and_in_order(demo_model):
    engine = make_engine(demo_model, overlap=True)
    prompt = hf_tokenize(demo_model, ["hello world"])[0]
    seq = Sequence("s", prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    engine.add(seq)
    per_call = [[o.token_id for o in engine.step()] for _ in range(8)]
    # prefill (settled at once: 1 token), then the first decode step stays in flight (nothing),
    # then one token per call, and the last call settles the final step
    assert [len(x) for x in per_call[:2]] == [1, 0]
    assert sum(per_call, []) == seq.output_token_ids and len(seq.output_token_ids) == 6
    assert seq.finish_reason == "length" and not engine.has_work()


def test_blocks_of_an_aborted_sequence_wait_for_the_step_in_flight(demo_model):
    """A sequence aborted while a queued step may still write its cache slot keeps its blocks
    until that step is done, so nothing else (a transfer's reservation) can be handed them."""
    engine = make_engine(demo_model, overlap=True, blocks=8)
    prompt = hf_tokenize(demo_model, [PROMPTS[1]])[0][:40]  # 5 blocks of 8 (+1 to decode)
    seq = Sequence("s", prompt, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    engine.add(seq)
    engine.step()  # prefill
    engine.step()  # first decode step: queued, in flight
    assert engine.has_work() and PLACEHOLDER in seq.token_ids
    engine.abort(seq)
    assert engine.blocks.num_free_blocks == 8 - 6  # held: the step in flight writes block 6
    assert engine.flush() == []  # settles the step; the aborted sequence's sample is dropped
    assert engine.blocks.num_free_blocks == 8 and not engine.has_work()


def test_decode_worker_activation_joins_an_overlapped_batch(demo_model):
    """A decode worker adds sequences whose prompt KV arrived (``activate``) between steps,
    while a step is in flight: their first token is on the host, the others' on the device."""
    prompts = hf_tokenize(demo_model, PROMPTS[:2])
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    want = run(make_engine(demo_model, overlap=False), [Sequence(f"r{i}", p, params) for i, p in enumerate(prompts)])

    prefill = make_engine(demo_model, overlap=False)
    decode = make_engine(demo_model, overlap=True)
    first = Sequence("a", prompts[0], params)
    decode.add(first)
    for _ in range(4):
        decode.step()
    assert PLACEHOLDER in first.token_ids  # a step is in flight
    # the second request: prefilled elsewhere, its KV copied into blocks the decode side reserved
    donor = Sequence("donor", prompts[1], SamplingParams(max_tokens=1, temperature=0), prefill_only=True)
    prefill.add(donor)
    (out,) = prefill.step()
    late = Sequence("b", prompts[1], params)
    table = decode.reserve(late)
    for src, dst in zip(donor.block_table, table, strict=False):
        decode.runner.kv_cache[:, :, dst] = prefill.runner.kv_cache[:, :, src]
    decode.activate(late, out.token_id)
    while decode.has_work():
        decode.step()
    assert [first.output_token_ids, late.output_token_ids] == want
    assert decode.blocks.num_free_blocks == decode.blocks.num_blocks


def test_chunked_prefill_steps_overlap_too(demo_model):
    """The colocated baseline: a step carrying decodes and a prompt chunk is left in flight like
    a decode step, and the tokens still equal the synchronous engine's."""
    prompts = hf_tokenize(demo_model, [PROMPTS[0], PROMPTS[1]])
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outputs = []
    for overlap in (False, True):
        engine = make_engine(demo_model, overlap=overlap, chunked_prefill=True, max_num_batched_tokens=16)
        first, late = Sequence("a", prompts[0], params), Sequence("b", prompts[1], params)
        engine.add(first)
        for _ in range(3):
            engine.step()
        engine.add(late)  # its prompt needs several 16-token chunks
        engine.step()
        assert late.num_computed_tokens < len(prompts[1])  # mid-prompt: a mixed step ran
        assert (PLACEHOLDER in first.token_ids) == overlap
        outputs.append(finish(engine, [first, late]))
    assert outputs[0] == outputs[1] and all(len(o) == 12 for o in outputs[0])


def test_logprobs_requests_overlap_and_match_the_synchronous_engine(demo_model):
    prompts = hf_tokenize(demo_model, PROMPTS[:3])
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3),
              SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=0)]  # fmt: skip
    got = []
    for overlap in (False, True):
        engine = make_engine(demo_model, overlap=overlap)
        seqs = [Sequence(f"s{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
        for seq in seqs:
            engine.add(seq)
        entries: dict[str, list] = {s.request_id: [] for s in seqs}
        while engine.has_work():
            for out in engine.step():
                entries[out.seq.request_id].append(out.logprobs)
        assert entries["s1"] == [None] * 8
        assert [len(e["top"]) for e in entries["s0"]] == [3] * 6
        got.append((finish(engine, seqs), entries))
    (sync_tokens, sync_lp), (tokens, lp) = got
    assert tokens == sync_tokens
    for rid in ("s0", "s2"):
        for a, b in zip(lp[rid], sync_lp[rid], strict=True):
            assert a["token_id"] == b["token_id"] and [t for t, _ in a["top"]] == [t for t, _ in b["top"]]
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-5)


def test_a_prompt_that_cannot_start_yet_does_not_stop_the_overlap(demo_model):
    engine = make_engine(demo_model, overlap=True, blocks=8)
    prompt = hf_tokenize(demo_model, [PROMPTS[1]])[0] * 2
    assert len(prompt) >= 60
    running = Sequence("a", prompt[:20], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    engine.add(running)
    engine.step()  # prefill: 3 of the 8 blocks
    engine.add(Sequence("b", prompt[:60], SamplingParams(max_tokens=2)))  # needs 8: must wait
    for _ in range(3):
        engine.step()
        assert PLACEHOLDER in running.token_ids  # decode steps still overlap


def test_a_reservation_settles_the_step_holding_the_blocks_it_needs(demo_model):
    """Blocks of a sequence that finished during the step in flight are held; a decode worker's
    reservation for an incoming transfer that needs them settles that step instead of failing,
    and the settled step's outputs come with the next step()."""
    engine = make_engine(demo_model, overlap=True, blocks=9)
    prompt = hf_tokenize(demo_model, [PROMPTS[1]])[0] * 2
    assert len(prompt) >= 40
    short = hf_tokenize(demo_model, ["a"])[0]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    want = run(make_engine(demo_model, overlap=False), [Sequence("k", short, params)])[0]
    first = Sequence("a", prompt[:40], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    keep = Sequence("k", short, params)  # one block
    engine.add(first)
    engine.add(keep)
    engine.step()
    engine.step()  # a decode step in flight; first holds 6 of the 9 blocks (41 tokens)
    engine.abort(first)
    assert PLACEHOLDER not in first.token_ids
    incoming = Sequence("b", prompt[:40], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    table = engine.reserve(incoming)  # 5 blocks, 2 free: only with the 6 held ones back
    assert len(table) == 5 and engine.blocks.num_free_blocks == 3  # 9 - keep 1 - 5
    outputs = engine.step()  # the settled step's output (keep's token) comes first
    assert outputs[0].seq is keep and outputs[0].token_id == want[1]
    engine.abort(incoming)
    assert finish(engine, [keep]) == [want]
