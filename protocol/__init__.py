"""The worker protocol: every message that crosses a process boundary between the router, prefill
workers and decode workers, as typed classes (``messages``), and the sampling parameters they
carry (``sampling``); and the names both sides give a prompt's KV blocks (``prefix_hash``: the
router's prefix-aware policy predicts hits in the workers' prefix caches with them).

This is the only place a key of those messages is spelled; the router, both workers and the test
stub read and write them through these classes. It imports nothing but the standard library (no
torch, no engine, no router), so every side can import it, and imports point at it, never from it.
The OpenAI-facing request bodies are another protocol, the router's (``router/openai_api.py``).
"""

from splitserve.protocol.messages import (
    ERROR_FINISH,
    DrainReply,
    ErrorReply,
    GenerateRequest,
    Health,
    InvalidMessage,
    LoadReport,
    LogprobEntry,
    PrefillRequest,
    PrefillResult,
    TokenLine,
    TransferMeta,
    WorkerRequest,
)
from splitserve.protocol.sampling import MAX_LOGPROBS, SamplingParams

__all__ = [
    "ERROR_FINISH",
    "MAX_LOGPROBS",
    "DrainReply",
    "ErrorReply",
    "GenerateRequest",
    "Health",
    "InvalidMessage",
    "LoadReport",
    "LogprobEntry",
    "PrefillRequest",
    "PrefillResult",
    "SamplingParams",
    "TokenLine",
    "TransferMeta",
    "WorkerRequest",
]
