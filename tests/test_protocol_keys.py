"""The worker protocol has one home: no key of a router <-> prefill <-> decode message is spelled
outside ``splitserve.protocol`` (as a dict key, a subscript or a ``.get``), and that module stands
alone (importing it loads no torch, no engine, no router)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Not scanned: the protocol itself; tests and benchmarks (they may write a raw message on purpose);
# kvtransfer/, whose frames are another wire with its own home (kvtransfer/wire.py).
EXEMPT = ("protocol", "tests", "bench", "kvtransfer", ".venv")
# Keys of worker messages only: spelled nowhere else in the product.
WORKER_KEYS = (
    "stop_string", "kv_endpoint", "decode_kv_endpoint", "first_token", "first_logprobs", "recompute",
    "num_prompt_tokens", "num_cached_tokens", "prefill_ms", "transfer_ms", "queued_prompt_tokens",
    "free_blocks", "total_blocks", "draining", "fingerprint", "sampling", "token_ids", "request_id",
)
# Keys other formats use too (the OpenAI API, bench and profile files): only the modules that
# speak to workers must not spell them.
SHARED_KEYS = ("finish_reason", "logprobs", "max_tokens", "stop_token_ids", "ignore_eos", "error",
               "block_size", "max_model_len", "waiting", "running")
WORKER_SIDE = ("prefill/", "decode/", "engine/", "router/dispatch.py", "router/workers.py",
               "router/pool.py", "testing/stub_worker.py")
NOT_MESSAGES = ("engine/profile.py",)  # writes the step-cost profile file, read by the simulator


def _uses(keys: tuple[str, ...]) -> re.Pattern[str]:
    """A key used as a message key: ``"k":``, ``["k"]`` or ``.get("k"``."""
    k = "|".join(keys)
    return re.compile(rf"""["']({k})["']\s*:|\[\s*["']({k})["']\s*\]|\.get\(\s*["']({k})["']""")


def _product_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] not in EXEMPT)


def _spelled(files: list[Path], pattern: re.Pattern[str]) -> list[str]:
    found = []
    for path in files:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    return found


def test_no_worker_message_key_is_spelled_outside_the_protocol_module():
    assert _spelled(_product_files(), _uses(WORKER_KEYS)) == []


def test_modules_that_speak_to_workers_spell_none_of_the_shared_keys():
    files = [p for p in _product_files()
             if str(p.relative_to(ROOT)).startswith(WORKER_SIDE) and str(p.relative_to(ROOT)) not in NOT_MESSAGES]
    assert len(files) > 10
    assert _spelled(files, _uses(SHARED_KEYS)) == []


@pytest.mark.parametrize("key", ["stop_string", "finish_reason"])
def test_the_scan_finds_a_key_where_one_is_spelled(tmp_path, key):
    """The pattern itself: a dict key, a subscript and a .get are each found."""
    for line in (f'x = {{"{key}": 1}}', f'y = line["{key}"]', f"z = line.get('{key}')"):
        assert _uses((key,)).search(line), line
    assert not _uses((key,)).search(f"{key} = 1  # an attribute")


def test_importing_the_protocol_loads_neither_torch_nor_engine_nor_router():
    code = ("import sys, splitserve.protocol\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith("
            "('splitserve.engine', 'splitserve.router', 'splitserve.kvtransfer', 'pydantic', 'fastapi')))\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONSAFEPATH="1"), check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
