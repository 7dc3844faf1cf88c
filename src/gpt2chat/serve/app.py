"""The OpenAI-compatible HTTP API (FastAPI): routes, server-sent events, errors, auth and body limits.

`create_app(service)` wires a `ChatService` to `/v1/chat/completions`, `/v1/completions`, `/v1/models`,
`/health` and the web chat page at `/`. Every error is an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}`: 4xx for anything the client got wrong, 500 only for
our own bugs (logged with their traceback). A client that goes away frees its engine slot at once.
This module knows nothing about tokens or templates: the service does that.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpt2chat import __version__
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.serve import schemas
from gpt2chat.serve.service import ChatService, Generation, ServiceError

log = logging.getLogger("gpt2chat.serve")

DEFAULT_MAX_BODY_BYTES = 1 << 20
PUBLIC_PATHS = ("/health", "/", "/favicon.ico")  # the page itself is static; its API calls carry the key
PUBLIC_PREFIXES = ("/static/",)
FINGERPRINT = f"fp_gpt2chat_{__version__}"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    type_ = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(schemas.error_body(message, type_, param, code), status_code=status)


# ---- ASGI middleware (pure ASGI: streaming responses and disconnects pass through untouched) ----------


class BodyLimitMiddleware:
    """Answers 413 to a body over `max_bytes`, whether announced by Content-Length or sent chunked."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        too_big = error_response(413, f"the request body is larger than this server accepts ({self.max_bytes} bytes)",
                                 code="request_too_large")
        length = headers.get(b"content-length")
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


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer KEY` on every route but /health and the static page."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            message = "missing API key: send 'Authorization: Bearer KEY'" if not given else "invalid API key"
            return await error_response(401, message, code="invalid_api_key")(scope, receive, send)
        await self.app(scope, receive, send)


# ---- helpers ------------------------------------------------------------------------------------------


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    param = ".".join(loc) or None
    where = f"field '{param}'" if param else "the request body"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid value')}{more}", param


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect_unless_disconnected(request: Request, generations: list[Generation]) -> list[str] | None:
    """Runs the generations to the end; returns None (and frees their slots) if the client leaves first."""
    collect = asyncio.ensure_future(asyncio.gather(*(g.text() for g in generations)))
    watch = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
        if collect in done:
            return collect.result()
        return None
    finally:
        watch.cancel()
        if not collect.done():
            collect.cancel()
        for generation in generations:
            generation.cancel()


def _usage(generations: list[Generation], prompt_tokens: int | None = None) -> dict[str, int]:
    prompt = prompt_tokens if prompt_tokens is not None else (generations[0].prompt_tokens if generations else 0)
    completion = sum(g.completion_tokens for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _merged(generations: list[Generation]) -> AsyncIterator[tuple[int, str | None]]:
    """(choice index, text) from all generations as they come; (index, None) when one finishes."""
    if len(generations) == 1:
        async for text in generations[0]:
            yield 0, text
        yield 0, None
        return
    queue: asyncio.Queue[tuple[int, str | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for text in generation:
                await queue.put((index, text, None))
            await queue.put((index, None, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which reports it
            await queue.put((index, None, exc))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generations)]
    try:
        remaining = len(generations)
        while remaining:
            index, text, exc = await queue.get()
            if exc is not None:
                raise exc
            if text is None:
                remaining -= 1
            yield index, text
    finally:
        for task in tasks:
            task.cancel()


def _streaming(events: AsyncIterator[str], generations: list[Generation]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band, as OpenAI does
            log.exception("error while streaming a reply")
            yield _sse(schemas.error_body(f"internal error while generating: {exc}", "server_error"))
        finally:
            for generation in generations:
                generation.cancel()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- the app ------------------------------------------------------------------------------------------


def create_app(service: ChatService, *, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The ASGI app serving `service`; `api_key` protects every route but /health and the page."""
    app = FastAPI(title="gpt2chat", version=__version__,
                  description="OpenAI-compatible chat and text completions from a GPT-2 chat model.")
    app.state.service = service
    web_dir = resources.files("gpt2chat.serve") / "web"

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(ServiceError)
    async def on_service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status_code, str(exc), exc.param, exc.code)

    @app.exception_handler(Gpt2ChatError)
    async def on_bad_input(request: Request, exc: Gpt2ChatError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error (the server log has the details)")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.model_name, "outstanding_requests": service.outstanding}

    @app.get("/v1/models", response_model=schemas.ModelList)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(service)]}

    @app.get("/v1/models/{model_id:path}", response_model=schemas.ModelCard)
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != service.model_name:
            raise StarletteHTTPException(404, f"model '{model_id}' does not exist; this server has '{service.model_name}'")
        return _model_card(service)

    @app.post("/v1/chat/completions", response_model=schemas.ChatCompletion,
              responses={200: {"content": {"text/event-stream": {}}}, 400: {"model": schemas.ErrorBody},
                         401: {"model": schemas.ErrorBody}, 413: {"model": schemas.ErrorBody},
                         429: {"model": schemas.ErrorBody}})
    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request) -> Any:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        prompt_ids = service.render_messages(messages, truncate=body.truncate)
        settings = service.settings(len(prompt_ids), body.requested_max_tokens(), body.temperature, body.top_p,
                                    body.stop_list(), body.seed)
        generations = service.start(prompt_ids, settings, n=body.n, chat=True)
        model = body.model or service.model_name  # like llama.cpp: any model name is served by our model
        completion_id, created = schemas.new_id("chatcmpl"), schemas.now()
        if body.stream:
            events = _chat_events(generations, completion_id, created, model, body.include_usage())
            return _streaming(events, generations)
        texts = await _collect_unless_disconnected(request, generations)
        if texts is None:
            return JSONResponse({}, status_code=499)  # nobody is listening any more
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": g.finish_reason}
                        for i, (g, text) in enumerate(zip(generations, texts, strict=True))],
            "usage": _usage(generations),
        }

    @app.post("/v1/completions", response_model=schemas.Completion,
              responses={200: {"content": {"text/event-stream": {}}}, 400: {"model": schemas.ErrorBody}})
    async def completions(body: schemas.CompletionRequest, request: Request) -> Any:
        prompts = [service.encode_text_prompt(p, truncate=body.truncate) for p in body.prompts()]
        if len(prompts) * body.n > schemas.MAX_CHOICES:
            raise ServiceError(f"{len(prompts)} prompts x n={body.n} is more than {schemas.MAX_CHOICES} "
                               "completions per request", param="n")
        generations: list[Generation] = []
        try:
            for ids in prompts:
                settings = service.settings(len(ids), body.requested_max_tokens(), body.temperature, body.top_p,
                                            body.stop_list(), body.seed)
                generations += service.start(ids, settings, n=body.n, chat=False)
        except BaseException:
            for generation in generations:
                generation.cancel()
            raise
        echoes = [service.tokenizer.decode(ids) if body.echo else "" for ids in prompts for _ in range(body.n)]
        model = body.model or service.model_name
        completion_id, created = schemas.new_id("cmpl"), schemas.now()
        prompt_tokens = sum(len(ids) for ids in prompts)
        if body.stream:
            events = _completion_events(generations, echoes, completion_id, created, model,
                                        body.include_usage(), prompt_tokens)
            return _streaming(events, generations)
        texts = await _collect_unless_disconnected(request, generations)
        if texts is None:
            return JSONResponse({}, status_code=499)
        return {
            "id": completion_id, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": [{"index": i, "text": echo + text, "logprobs": None, "finish_reason": g.finish_reason}
                        for i, (g, echo, text) in enumerate(zip(generations, echoes, texts, strict=True))],
            "usage": _usage(generations, prompt_tokens),
        }

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(str(web_dir / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(web_dir)), name="static")

    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)  # added last = runs first
    return app


def _model_card(service: ChatService) -> dict[str, Any]:
    return {"id": service.model_name, "object": "model", "created": 0, "owned_by": "gpt2chat"}


def _chunk_writer(object_name: str, completion_id: str, created: int, model: str, include_usage: bool
                  ) -> Callable[..., str]:
    """`chunk(choices, usage=None)` -> one SSE event of a streamed completion (usage only when asked for)."""

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        payload: dict[str, Any] = {"id": completion_id, "object": object_name, "created": created,
                                   "model": model, "system_fingerprint": FINGERPRINT, "choices": choices}
        if include_usage:
            payload["usage"] = usage
        return _sse(payload)

    return chunk


async def _chat_events(generations: list[Generation], completion_id: str, created: int, model: str,
                       include_usage: bool) -> AsyncIterator[str]:
    chunk = _chunk_writer("chat.completion.chunk", completion_id, created, model, include_usage)

    for index in range(len(generations)):
        yield chunk([{"index": index, "delta": {"role": "assistant", "content": "", "refusal": None},
                      "logprobs": None, "finish_reason": None}])
    async for index, text in _merged(generations):
        if text is None:
            yield chunk([{"index": index, "delta": {}, "logprobs": None,
                          "finish_reason": generations[index].finish_reason}])
        else:
            yield chunk([{"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])
    if include_usage:
        yield chunk([], _usage(generations))
    yield "data: [DONE]\n\n"


async def _completion_events(generations: list[Generation], echoes: list[str], completion_id: str, created: int,
                             model: str, include_usage: bool, prompt_tokens: int) -> AsyncIterator[str]:
    chunk = _chunk_writer("text_completion", completion_id, created, model, include_usage)

    for index, echo in enumerate(echoes):
        if echo:
            yield chunk([{"index": index, "text": echo, "logprobs": None, "finish_reason": None}])
    async for index, text in _merged(generations):
        if text is None:
            yield chunk([{"index": index, "text": "", "logprobs": None,
                          "finish_reason": generations[index].finish_reason}])
        else:
            yield chunk([{"index": index, "text": text, "logprobs": None, "finish_reason": None}])
    if include_usage:
        yield chunk([], _usage(generations, prompt_tokens))
    yield "data: [DONE]\n\n"
