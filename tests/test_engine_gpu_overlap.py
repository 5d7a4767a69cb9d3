"""On a GPU: queuing a step never waits for the GPU, so overlapped steps really overlap.

A hidden host-device synchronisation inside ``ModelRunner.launch`` (an ``.item()``, a tensor
indexed with a Python list, a copy from pageable memory, a torch op that checks its input on the
host) costs nothing on the CPU and silently serialises the engine on a GPU; torch's sync debug
mode turns each into an error here. Runs only where CUDA is (``bench/gpu_all.sh check``); works
under ``pytest --noconftest``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from splitserve.engine.config import RunnerConfig, SchedulerConfig
from splitserve.engine.demo_model import DemoModelSpec, init_demo_model
from splitserve.engine.engine import EngineConfig, LLMEngine
from splitserve.engine.sampling import SamplingParams
from splitserve.engine.sequence import Sequence

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextlib.contextmanager
def no_sync() -> Iterator[None]:
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.parametrize("chunked", [False, True])
def test_launch_never_waits_for_the_gpu(tmp_path, chunked):
    model = init_demo_model(tmp_path / "model", DemoModelSpec())
    engine = LLMEngine(EngineConfig(
        RunnerConfig(str(model), block_size=16, num_kv_blocks=256, max_num_seqs=8),
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32 if chunked else 512,
                        chunked_prefill=chunked),
        overlap=True,
    ))
    assert engine.overlap
    launch = engine.runner.launch
    checked = {"prefill": 0, "decode": 0}
    launches = []

    def launch_without_sync(seqs, is_prefill, prev=None):
        launches.append(is_prefill)
        if len(launches) <= 4:  # the first steps allocate and compile: not checked
            return launch(seqs, is_prefill, prev)
        checked["prefill" if is_prefill else "decode"] += 1
        with no_sync():
            return launch(seqs, is_prefill, prev)

    engine.runner.launch = launch_without_sync
    prompts = [[(7 * i + t) % 200 + 3 for t in range(n)] for i, n in enumerate((5, 40, 17, 90))]
    params = [
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, ignore_eos=True),
        SamplingParams(max_tokens=18, temperature=1.0, top_k=20, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=22, temperature=0, ignore_eos=True, logprobs=2),
    ]
    seqs = [Sequence(f"s{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    for i, seq in enumerate(seqs):
        engine.add(seq)
        if i == 1:  # the others arrive while the first ones decode
            for _ in range(6):
                engine.step()
    while engine.has_work():
        engine.step()
    assert [len(s.output_token_ids) for s in seqs] == [p.max_tokens for p in params]
    assert checked["decode"] > 10 and (checked["prefill"] > 0 or not chunked)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
