"""The server's limits, in one place: how many requests run and wait, tokens per request, body size.

`ServerLimits` is checked once, when the server is built (a bad value is a `Gpt2ChatError` naming the
command-line option); `ChatService` enforces the request limits and `BodyLimitMiddleware` the body size.
This module knows nothing about models or routes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpt2chat.errors import Gpt2ChatError

__all__ = ["ServerLimits", "BodyLimitMiddleware"]


@dataclass(frozen=True)
class ServerLimits:
    max_batch_size: int = 16  # sequences decoded together (engine cache rows)
    max_queue: int = 64  # requests that may wait for a row before new ones get 429
    max_tokens_limit: int = 1024  # most tokens one request may generate
    max_body_bytes: int = 1 << 20  # largest request body

    def __post_init__(self) -> None:
        least = {"max_batch_size": 1, "max_queue": 0, "max_tokens_limit": 1, "max_body_bytes": 1024}
        for item in fields(self):
            value = getattr(self, item.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least[item.name]:
                option = "--max-batch" if item.name == "max_batch_size" else "--" + item.name.replace("_", "-")
                raise Gpt2ChatError(f"{option} must be a whole number of at least {least[item.name]}, got {value!r}")

    @property
    def capacity(self) -> int:
        """Requests the server holds at once, running or waiting."""
        return self.max_batch_size + self.max_queue


class BodyLimitMiddleware:
    """Answers 413 to a body over `max_bytes`, whether announced by Content-Length or sent chunked.

    Pure ASGI, so streaming responses and disconnects pass through untouched."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        from gpt2chat.serve.errors import error_response

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_response(413, f"the request body is larger than this server accepts ({self.max_bytes} bytes)",
                                 code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await error_response(400, "invalid Content-Length header")(scope, receive, send)
            if declared > self.max_bytes:
                return await too_big(scope, receive, send)
            return await self.app(scope, receive, send)
        # no length announced: read (at most max_bytes of) the body here, then replay it to the app
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await too_big(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
