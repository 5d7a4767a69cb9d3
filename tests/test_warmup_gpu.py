"""On a GPU: after the worker's warm-up, serving compiles no Triton kernel.

Triton compiles a kernel again for every new specialisation of its integer arguments (== 1,
divisible by 16, neither), and on a GPU each compile takes a second or more, which a request
then waits for. An H200 run showed it: the split system's first prompt of 16 KV blocks waited
~1.4 s (the prefill kernel specialised on the block table's width), and every request queued
behind it. This serves a spread of prompt lengths, batch sizes and block-table widths after
``warm_up`` and fails naming any kernel that compiled. Runs only where CUDA is
(``bench/gpu_all.sh check``); works under ``pytest --noconftest``.
"""

from __future__ import annotations

import pytest
import torch
from splitserve.engine.config import RunnerConfig, SchedulerConfig
from splitserve.engine.demo_model import DemoModelSpec, init_demo_model
from splitserve.engine.engine import EngineConfig, LLMEngine
from splitserve.engine.sampling import SamplingParams
from splitserve.engine.sequence import Sequence
from splitserve.engine.warmup import warm_up

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (prompt lengths of one batch): single prompts whose block counts are 1, 16, 17, 32 and odd;
# packed batches of 3, 16 and 17 prompts; lengths on and off multiples of 16.
BATCHES = [[5], [100], [247], [256], [257], [300], [511], [512], [33, 70, 250],
           [9] * 16, [17] * 17, [256, 240, 16, 1]]


@pytest.mark.parametrize("chunked", [False, True])
def test_no_triton_compile_after_warm_up(tmp_path, chunked):
    knobs = pytest.importorskip("triton.knobs")
    if not hasattr(knobs.runtime, "jit_post_compile_hook"):
        pytest.skip("this Triton has no compile hook")
    # The served models' attention shape (bf16, head dim 128, GQA), so the kernels take the paths
    # they take in production (tensor descriptors included).
    model = init_demo_model(tmp_path / "model", DemoModelSpec(
        hidden_size=512, intermediate_size=1024, num_heads=4, num_kv_heads=2, head_dim=128,
        dtype="bfloat16"))
    engine = LLMEngine(EngineConfig(
        RunnerConfig(str(model), block_size=16, num_kv_blocks=2048, max_num_seqs=32),
        SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=256 if chunked else 4096,
                        chunked_prefill=chunked),
    ))
    warm_up(engine)
    compiled: list[str] = []

    def record(**kwargs):
        fn = kwargs.get("fn")
        compiled.append(f"{getattr(fn, 'name', fn)}: specialisation {kwargs.get('key')}")
        return False

    previous = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = record
    try:
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        for n, lengths in enumerate(BATCHES):
            for i, length in enumerate(lengths):
                engine.add(Sequence(f"b{n}-{i}", [(13 * n + 7 * i + t) % 200 + 3 for t in range(length)], params))
            while engine.has_work():
                engine.step()
        # A prompt that extends a cached one (prefix hit, a paged prefix of 16 blocks).
        base = [(5 * t) % 200 + 3 for t in range(256)]
        for name, extra in (("p0", [1, 2, 3]), ("p1", list(range(4, 40)))):
            engine.add(Sequence(name, base + extra, params))
            while engine.has_work():
                engine.step()
    finally:
        knobs.runtime.jit_post_compile_hook = previous
    assert not compiled, "compiled after warm-up:\n" + "\n".join(compiled)
