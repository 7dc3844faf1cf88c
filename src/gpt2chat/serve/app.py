"""The OpenAI-compatible HTTP API (FastAPI): the routes, wired to a `ChatService`.

`create_app(service)` serves `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`,
`/metrics` (Prometheus) and the web chat page at `/`. Each route checks its body (`schemas`), refuses a
field it does not implement when ignoring it would change the answer, asks the service for generations
and hands them to `streaming` (SSE or one body). Errors take one path (`errors`); limits live in
`limits`, the API key in `auth`, the counters in `metrics`. A client that goes away frees its rows at once.
This module knows nothing about tokens or templates: the service does that.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from gpt2chat import __version__
from gpt2chat.serve import schemas
from gpt2chat.serve.auth import ApiKeyMiddleware
from gpt2chat.serve.errors import ERROR_TYPES, ModelNotFoundError, error_response, install_error_handlers
from gpt2chat.serve.limits import BodyLimitMiddleware, ConcurrencyLimitMiddleware
from gpt2chat.serve.prometheus import CONTENT_TYPE_LATEST, MetricsMiddleware, ServerMetrics
from gpt2chat.serve.service import ChatService, Generation, ServiceError
from gpt2chat.serve.streaming import (
    Answer,
    Echo,
    chat_body,
    chat_events,
    collect_unless_disconnected,
    completion_body,
    completion_events,
    streaming_response,
)

__all__ = ["create_app", "error_response", "ERROR_TYPES"]

# Every refusal has OpenAI's error body: 4XX (a bad request, a missing key, a full queue ...) and 503 (more
# requests at once than --max-connections). Declaring the range also keeps FastAPI from announcing a 422
# that this server never sends (validation errors are 400s, as OpenAI's).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": schemas.ErrorBody, "description": "the request was refused: the body says why"},
    503: {"model": schemas.ErrorBody, "description": "the server is at --max-connections: retry later"},
}
CLIENT_GONE = 499  # nginx's "client closed request": nobody reads this answer


def _check_request(body: schemas._SamplingRequest, service: ChatService) -> None:
    # vLLM's rule: no model (or "") is the served one, any other name is a 404 like OpenAI's
    if body.model and body.model != service.model_name:
        raise ModelNotFoundError(body.model, service.model_name)
    refused = body.unsupported()
    if refused is not None:
        field, why = refused
        raise ServiceError(why, param=field, code="unsupported_parameter")


def create_app(service: ChatService, *, api_key: str | None = None, cors_origins: Sequence[str] = ()) -> FastAPI:
    """The ASGI app serving `service`; `api_key` protects every route but /health and the page;
    `cors_origins` are the web origins whose pages may call the API (none: no CORS headers at all)."""
    app = FastAPI(title="gpt2chat", version=__version__,
                  description="OpenAI-compatible chat and text completions from a GPT-2 chat model.")
    app.state.service = service
    app.state.metrics = metrics = ServerMetrics(service)
    web_dir = resources.files("gpt2chat.serve") / "web"
    install_error_handlers(app, {"/v1/chat/completions": schemas.ChatCompletionRequest,
                                 "/v1/completions": schemas.CompletionRequest})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.model_name, "outstanding_requests": service.outstanding}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=schemas.ModelList, responses=ERROR_RESPONSES)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(service)]}

    @app.get("/v1/models/{model_id:path}", response_model=schemas.ModelCard, responses=ERROR_RESPONSES)
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != service.model_name:
            raise ModelNotFoundError(model_id, service.model_name)
        return _model_card(service)

    @app.post("/v1/chat/completions", response_model=schemas.ChatCompletion,
              responses={200: {"content": {"text/event-stream": {}}}, **ERROR_RESPONSES})
    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request) -> Any:
        _check_request(body, service)
        messages = [m.template_message() for m in body.messages]
        max_tokens = body.requested_max_tokens()
        prompt_ids = service.render_messages(messages, truncate=body.truncate, max_tokens=max_tokens)
        settings = service.settings(len(prompt_ids), max_tokens, body.temperature, body.top_p, body.stop_list(),
                                    body.seed, logprobs=body.top_logprob_count())
        generations = service.start(prompt_ids, settings, n=body.n, chat=True)
        answer = Answer("chat.completion", service.model_name, generations, service.tokenizer,
                        logprobs=body.logprobs, include_usage=body.include_usage())
        if body.stream:
            return streaming_response(chat_events(answer), generations, service.limits.stall_timeout_s)
        texts = await collect_unless_disconnected(request, generations)
        if texts is None:
            return JSONResponse({}, status_code=CLIENT_GONE)
        return chat_body(answer, texts)

    @app.post("/v1/completions", response_model=schemas.Completion,
              responses={200: {"content": {"text/event-stream": {}}}, **ERROR_RESPONSES})
    async def completions(body: schemas.CompletionRequest, request: Request) -> Any:
        _check_request(body, service)
        prompts = [service.encode_text_prompt(p) for p in body.prompts()]
        if len(prompts) * body.n > schemas.MAX_CHOICES:
            raise ServiceError(f"{len(prompts)} prompts x n={body.n} is more than {schemas.MAX_CHOICES} "
                               "completions per request", param="n")
        scored_prompt = body.logprobs if body.echo else None
        generations: list[Generation] = []
        try:
            for ids in prompts:
                settings = service.settings(len(ids), body.max_tokens, body.temperature, body.top_p,
                                            body.stop_list(), body.seed, logprobs=body.logprobs,
                                            prompt_logprobs=scored_prompt)
                generations += service.start(ids, settings, n=body.n, chat=False)
        except BaseException:
            for generation in generations:
                generation.cancel()
            raise
        echoes = [Echo.of(service.tokenizer, g.prompt_ids) for g in generations] if body.echo else []
        answer = Answer("text_completion", service.model_name, generations, service.tokenizer,
                        logprobs=body.logprobs is not None, include_usage=body.include_usage(), echoes=echoes)
        if body.stream:
            return streaming_response(completion_events(answer), generations, service.limits.stall_timeout_s)
        texts = await collect_unless_disconnected(request, generations)
        if texts is None:
            return JSONResponse({}, status_code=CLIENT_GONE)
        return completion_body(answer, texts)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(str(web_dir / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(web_dir)), name="static")

    # the last added runs first: metrics see every answer; CORS answers preflights (which carry no key) and
    # labels refusals too, so that a page can read them; a request without the key takes no connection slot
    app.add_middleware(BodyLimitMiddleware, max_bytes=service.limits.max_body_bytes)
    app.add_middleware(ConcurrencyLimitMiddleware, max_requests=service.limits.max_connections)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _model_card(service: ChatService) -> dict[str, Any]:
    return {"id": service.model_name, "object": "model", "created": 0, "owned_by": "gpt2chat"}
