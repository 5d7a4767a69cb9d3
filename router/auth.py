"""Optional API key: with one configured, every ``/v1/*`` request without
``Authorization: Bearer <key>`` gets 401 before anything else is looked at (even its body), and
so do ``/metrics`` (unless made public) and the API docs (when served at all).

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which would sit on the streaming
path of every response).
"""

from __future__ import annotations

import hmac
from typing import Any

from splitserve.router.errors import error_body
from starlette.responses import JSONResponse


class APIKeyMiddleware:
    def __init__(
        self, app: Any, api_key: str, on_reject: Any = None, guarded: frozenset[str] = frozenset()
    ) -> None:
        """``guarded``: exact paths outside ``/v1/`` that need the key too."""
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.on_reject = on_reject
        self.guarded = guarded

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path.startswith("/v1/") or path in self.guarded):
            got = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(got, self.expected):
                if self.on_reject is not None:
                    self.on_reject(scope["path"])
                body = error_body("Invalid or missing API key (Authorization: Bearer <key>).", code="invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)
