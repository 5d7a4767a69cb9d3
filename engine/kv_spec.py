"""What two workers must agree on to pair: the model, the KV layout and the serving generation.

The engine's side of the KV-transfer handshake: its model and cache, described as the
``KVSpec`` both ends compare (``splitserve.kvtransfer``). The workers open their connectors with
it (``splitserve.worker.handshake``); benchmarks and the profiler build the same spec with only
torch installed.
"""

from __future__ import annotations

import hashlib

from splitserve.engine.config import dtype_name
from splitserve.engine.engine import LLMEngine
from splitserve.kvtransfer import KVSpec


def fingerprint(engine: LLMEngine, generation: str) -> str:
    """Model architecture + serving generation: what must match for two workers to pair."""
    blob = f"{engine.runner.model_config.fingerprint()}:{generation}".encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def kv_spec(engine: LLMEngine, backend: str, generation: str) -> KVSpec:
    mc = engine.runner.model_config
    return KVSpec(
        model_fingerprint=fingerprint(engine, generation),
        dtype=dtype_name(engine.runner.dtype),
        num_layers=mc.num_layers,
        num_kv_heads=mc.num_kv_heads,
        head_dim=mc.head_dim,
        block_size=engine.runner.block_size,
        backend=backend,
    )
