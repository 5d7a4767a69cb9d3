"""What two workers must agree on to pair: the model, the KV layout and the serving generation.

Kept apart from the worker's HTTP plumbing so benchmarks and the profiler can build the same
KV-transfer spec with only torch installed.
"""

from __future__ import annotations

import hashlib

from splitserve.engine.engine import LLMEngine


def fingerprint(engine: LLMEngine, generation: str) -> str:
    """Model architecture + serving generation: what must match for two workers to pair."""
    blob = f"{engine.runner.model_config.fingerprint()}:{generation}".encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def kv_spec(engine: LLMEngine, backend: str, generation: str):
    from splitserve.engine.config import dtype_name
    from splitserve.kvtransfer import KVSpec

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
