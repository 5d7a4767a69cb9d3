"""On a GPU: `splitserve up --devices cuda:0,cuda:0`, a prefill and a decode worker sharing one
GPU (what a user with one GPU tries first), comes up, each worker with its share of the device,
and serves greedy output equal to transformers' through the openai client.

Before the shares, the second worker to start saw the first one's 85% gone and refused to start
("KV cache budget of -0.09 GiB"). Runs only where CUDA is (``bench/gpu_all.sh check``); works
under ``pytest --noconftest``: the demo model is made here by ``splitserve model init``.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import time

import httpx
import pytest
import torch
from splitserve.launcher.processes import python_command
from splitserve.launcher.up import free_port

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = ["hello world", "the model serve token prompt decode prefill cache block " * 8, "a",
           "Explain how the router picks a worker, and why the cache matters for latency?"]
MAX_TOKENS = 24
READY_S = 300


def _wait_up(proc: subprocess.Popen, url: str, log_dir) -> None:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log_dir.glob("*.log")))
            pytest.fail(f"splitserve up exited with {proc.returncode} while starting\n{logs}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"splitserve up not ready after {READY_S}s")


# In a process of its own, in safe-path mode: pytest puts the repository root on this process's
# sys.path, where our kernels/ shadows the Hugging Face `kernels` package transformers imports.
HF_TEXTS = """
import json, sys
from splitserve.testing.hf_reference import hf_greedy, hf_tokenize
from transformers import AutoTokenizer
model, n, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
tok = AutoTokenizer.from_pretrained(model)
tokens = hf_greedy(model, hf_tokenize(model, prompts), n, device="cuda:0")
print(json.dumps([tok.decode(t, skip_special_tokens=True) for t in tokens]))
"""


def _hf_texts(model, prompts: list[str], n: int) -> list[str]:
    out = subprocess.run(python_command("-c", HF_TEXTS, str(model), str(n), json.dumps(prompts)),
                         check=True, capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_prefill_and_decode_share_one_gpu(tmp_path):
    from openai import OpenAI

    model = tmp_path / "demo"
    subprocess.run(python_command("-m", "splitserve.cli", "model", "init", str(model)), check=True, timeout=120)
    port, logs = free_port(), tmp_path / "logs"
    proc = subprocess.Popen(
        python_command("-m", "splitserve.cli", "up", "--model", str(model), "--served-model-name", "demo",
                       "--devices", "cuda:0,cuda:0", "--port", str(port), "--log-dir", str(logs)),
        start_new_session=True,
    )
    try:
        _wait_up(proc, f"http://127.0.0.1:{port}/health", logs)
        for name in ("prefill-0", "decode-0"):
            text = (logs / f"{name}.log").read_text()
            assert "memory on cuda:0: share" in text and "--gpu-memory-utilization 0.425" in text, text[-2000:]
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)

        def complete(prompt: str) -> str:
            r = client.completions.create(model="demo", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body={"ignore_eos": True})
            return r.choices[0].text

        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            texts = list(pool.map(complete, PROMPTS))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    assert texts == _hf_texts(model, PROMPTS, MAX_TOKENS)
