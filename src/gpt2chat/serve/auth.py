"""API-key protection: `Authorization: Bearer KEY` on every route but /health and the static page.

`ApiKeyMiddleware` compares what a request sends with the key in constant time (SHA-256 digests of both,
then `hmac.compare_digest`, so neither the content nor the length of the key shows in the timing). The key
is never logged or echoed: a refusal says only that the key is missing or wrong. The page (/, /static/)
is public because it holds no data and a browser cannot send a header to load it; its API calls carry
the key. Pure ASGI middleware, so streaming responses and disconnects pass through untouched. This
module knows nothing about routes beyond which paths are public.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from gpt2chat.serve.errors import error_response

PUBLIC_PATHS = ("/health", "/", "/favicon.ico")  # the page itself is static; its API calls carry the key
PUBLIC_PREFIXES = ("/static/",)

__all__ = ["ApiKeyMiddleware", "PUBLIC_PATHS", "PUBLIC_PREFIXES"]


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = _digest(f"Bearer {api_key}".encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(_digest(given), self.expected):
            message = "missing API key: send 'Authorization: Bearer KEY'" if not given else "invalid API key"
            return await error_response(401, message, code="invalid_api_key")(scope, receive, send)
        await self.app(scope, receive, send)
