"""splitserve.kvtransfer: move a request's KV cache from a prefill worker to a decode worker.

One role-split interface (:class:`KVSender`, :class:`KVReceiver`, see ``base.py`` for the
contract and the block-ownership rule), backends registered by name (``registry.py``), one wire
format (``wire.py``) and one socket engine (``stream.py``) shared by the TCP and shared-memory
backends.
"""

from .base import (
    FailureReason,
    KVReceiver,
    KVSender,
    KVSpec,
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
    "TransferError",
    "TransferResult",
    "TransferState",
    "available_backends",
    "create_receiver",
    "create_sender",
    "register_backend",
]
