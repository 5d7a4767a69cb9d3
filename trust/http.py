"""The internal HTTP credential: a header the router sends to workers, and the workers' guard.

The header carries a token derived from the secret (``InternalSecret.key("http")``), not the
secret itself: it crosses the network on every request, and what a sniffer learns from it opens
no KV port and forges no registry entry. Workers answer only ``/health`` without it (kubelet
probes and ``splitserve up``'s readiness wait carry no credentials); everything else, ``/load``
and ``/metrics`` included unless metrics are made public, is a 401.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterable
from typing import Any

from .secret import InternalSecret

log = logging.getLogger(__name__)

HEADER = "x-splitserve-internal-auth"
PURPOSE = "http"
OPEN_PATHS = frozenset({"/health"})


def header_value(secret: InternalSecret) -> str:
    return secret.sign(PURPOSE, "router->worker")


def auth_headers(secret: InternalSecret | None) -> dict[str, str]:
    """The headers every router -> worker request carries (none without a secret)."""
    return {HEADER: header_value(secret)} if secret is not None else {}


class InternalAuthMiddleware:
    """ASGI middleware: 401 for any request without the internal header, except ``open_paths``.
    A plain ASGI class, not Starlette's BaseHTTPMiddleware, which would sit on every streamed
    token. ``on_reject(path)`` counts refusals."""

    def __init__(
        self, app: Any, secret: InternalSecret, open_paths: Iterable[str] = OPEN_PATHS,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.expected = header_value(secret).encode()
        self.open_paths = frozenset(open_paths)
        self.on_reject = on_reject
        self._name = HEADER.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            got = next((v for k, v in scope["headers"] if k == self._name), b"")
            if not hmac.compare_digest(got, self.expected):
                if self.on_reject is not None:
                    self.on_reject(scope["path"])
                await _unauthorized(send)
                return
        await self.app(scope, receive, send)


async def _unauthorized(send: Any) -> None:
    body = b'{"error":"internal authentication required (router -> worker header missing or wrong)"}'
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def warn_unauthenticated(component: str) -> None:
    """The loud warning of a component started without a secret."""
    log.warning(
        "%s: NO INTERNAL SECRET CONFIGURED: its internal ports (HTTP, KV, registry) accept "
        "anyone who can connect. Set --internal-secret-file or SPLITSERVE_INTERNAL_SECRET_FILE "
        "(`splitserve up` does this by itself).", component,
    )
