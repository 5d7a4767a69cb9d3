"""The KV connector each worker opens: always the negotiating "auto" backend, its
``--kv-backend`` being the request (see ``splitserve.kvtransfer.negotiate``), over the spec the
engine describes (``splitserve.engine.kv_spec``: model, KV layout, serving generation)."""

from __future__ import annotations

from typing import Any

from splitserve.engine.engine import LLMEngine
from splitserve.engine.kv_spec import kv_spec
from splitserve.worker.options import WorkerOptions


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
