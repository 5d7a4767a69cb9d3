"""What two workers must agree on to pair: the model, the KV layout and the serving generation;
and the KV connector each worker opens (always the negotiating "auto" backend, its
``--kv-backend`` being the request: see ``splitserve.kvtransfer.negotiate``).

Kept apart from the worker's HTTP plumbing so benchmarks and the profiler can build the same
KV-transfer spec with only torch installed.
"""

from __future__ import annotations

import hashlib
from typing import Any

from splitserve.engine.engine import LLMEngine
from splitserve.engine.worker_options import WorkerOptions


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


def kv_sender(engine: LLMEngine, options: WorkerOptions, secret: Any):
    """A prefill worker's KV sender: negotiates with each decode worker, honouring
    ``--kv-backend`` where the peer can do it too (else tcp, with a warning)."""
    from splitserve.kvtransfer import create_sender

    return create_sender("auto", kv_spec(engine, "auto", options.generation),
                         requested=options.kv_backend, gpu=engine.runner.device.type == "cuda",
                         secret=secret)


def kv_receiver(engine: LLMEngine, options: WorkerOptions, secret: Any):
    """A decode worker's KV receiver: one endpoint serving every backend it offers."""
    from splitserve.kvtransfer import create_receiver

    return create_receiver("auto", kv_spec(engine, "auto", options.generation),
                           engine.runner.kv_cache, host=options.host, port=options.kv_port,
                           requested=options.kv_backend, secret=secret)
