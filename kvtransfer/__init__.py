"""splitserve.kvtransfer: move a request's KV cache from a prefill worker to a decode worker.

One role-split interface (:class:`KVSender`, :class:`KVReceiver`; ``base.py`` has the contract
and the block-ownership rule), backends registered by name (``registry.py``: "tcp", "shm",
"cuda_ipc", "nixl", and "auto", which negotiates one of them per peer: ``negotiate.py`` decides,
``auto.py`` runs it), one wire format (``wire.py``), one socket engine per side (``sender.py``,
``receiver.py``: a transfer table, connection threads and one session per connection) that every
backend shares, the paged-cache <-> wire translation (``layout.py``)
and the Prometheus metrics (``metrics.py``, prefix ``splitserve_kv_``). What an end keeps per peer
(negotiated backend, failure counts, per-peer series) is bounded and ages out (``peers.py``).

Decode side::

    rx = create_receiver("tcp", spec, kv_cache, host="0.0.0.0", port=0)  # rx.endpoint
    fut = rx.expect(request_id, num_tokens, block_table, timeout=30.0)    # blocks allocated
    result = await asyncio.wrap_future(fut)   # TransferError(reason=...) -> free the blocks
    rx.reject(request_id, "no_space")         # no blocks: the prefill side fails at once

Prefill side::

    tx = create_sender("tcp", spec)           # streams=4 for big payloads on fast links
    tx.send(request_id, endpoint, layer_iterable, first_token_or_callable, meta,  # SampledToken: with logprobs
            num_tokens=n)                     # handshake before layer 0 exists
"""

from .base import (
    FailureReason,
    KVReceiver,
    KVSender,
    KVSpec,
    SampledToken,
    TransferError,
    TransferResult,
    TransferState,
)
from .registry import available_backends, create_receiver, create_sender, register_backend

__all__ = [
    "FailureReason",
    "KVReceiver",
    "KVSender",
    "KVSpec",
    "SampledToken",
    "TransferError",
    "TransferResult",
    "TransferState",
    "available_backends",
    "create_receiver",
    "create_sender",
    "register_backend",
]
