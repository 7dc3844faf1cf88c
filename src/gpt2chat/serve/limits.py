"""The server's limits, in one place: requests running and waiting, tokens, body size, time, connections.

`ServerLimits` is checked once, when the server is built (a bad value is a `Gpt2ChatError` naming the
command-line option). Who enforces what: `ChatService` the request limits and the per-request timeout,
`streaming` the stall timeout of a client that stops reading, `BodyLimitMiddleware` the body size and
`ConcurrencyLimitMiddleware` the requests served at once.
This module knows nothing about models or routes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpt2chat.errors import Gpt2ChatError

__all__ = ["ServerLimits", "BodyLimitMiddleware", "ConcurrencyLimitMiddleware", "option_name"]

# the command-line option of each field whose name does not follow from the field's
OPTIONS = {"max_batch_size": "--max-batch", "request_timeout_s": "--request-timeout",
           "stall_timeout_s": "--stall-timeout"}


def option_name(field_name: str) -> str:
    return OPTIONS.get(field_name, "--" + field_name.replace("_", "-"))


@dataclass(frozen=True)
class ServerLimits:
    max_batch_size: int = 16  # sequences decoded together (engine cache rows)
    max_queue: int = 64  # requests that may wait for a row before new ones get 429
    max_tokens_limit: int = 1024  # most tokens one request may generate
    max_body_bytes: int = 1 << 20  # largest request body
    # Wall time one request may take, from its submission (a wait for a row included) to its last token;
    # then it ends with what it has, finish_reason "length", as llama.cpp's t_max_predict_ms does.
    request_timeout_s: float = 600.0
    # A streaming client that accepts no bytes for this long (it stopped reading, its network stalled) is
    # dropped: its request is cancelled, its row and its place in the queue freed, its connection closed.
    stall_timeout_s: float = 30.0
    max_connections: int = 256  # HTTP requests served at once (each holds a connection); beyond: 503

    def __post_init__(self) -> None:
        least = {"max_batch_size": 1, "max_queue": 0, "max_tokens_limit": 1, "max_body_bytes": 1024,
                 "request_timeout_s": 0.01, "stall_timeout_s": 0.01, "max_connections": 1}
        for item in fields(self):
            value, low = getattr(self, item.name), least[item.name]
            whole = isinstance(low, int)
            kinds = int if whole else (int, float)
            if (not isinstance(value, kinds) or isinstance(value, bool) or not value >= low
                    or value == float("inf")):
                kind = "a whole number" if whole else "a number of seconds"
                raise Gpt2ChatError(f"{option_name(item.name)} must be {kind} of at least {low}, got {value!r}")

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


class ConcurrencyLimitMiddleware:
    """Answers 503 (OpenAI's body, `Retry-After: 1`) to a request beyond `max_requests` served at once.

    Each HTTP/1.1 request in flight holds one connection, so this bounds the connections doing work; an
    idle keep-alive connection holds nothing and uvicorn closes it after a few seconds. /health is never
    refused, so that a load balancer can tell a busy server from a dead one."""

    def __init__(self, app: ASGIApp, max_requests: int, exempt: tuple[str, ...] = ("/health",)):
        self.app = app
        self.max_requests = max_requests
        self.exempt = exempt
        self.in_flight = 0  # one event loop serves the app: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        from gpt2chat.serve.errors import error_response

        if scope["type"] != "http" or scope.get("path") in self.exempt:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_requests:
            busy = error_response(503, f"the server is serving its limit of {self.max_requests} requests at once: "
                                       "retry later", code="too_many_connections")
            busy.headers["Retry-After"] = "1"
            return await busy(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
