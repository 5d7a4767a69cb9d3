"""JSON on the router's hot path: orjson (several times faster than the standard library for the
small dicts of every request, and it produces bytes, which is what the sockets want).

orjson refuses integers beyond 64 bits (a client may send any ``seed``), so ``dumps`` falls back
to the standard library for exactly that case instead of failing the request.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

loads = orjson.loads  # bytes or str -> object; raises orjson.JSONDecodeError (a ValueError)


def dumps(obj: Any) -> bytes:
    """Compact JSON as UTF-8 bytes."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # an int beyond 64 bits (or a type orjson does not know): let json decide
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
