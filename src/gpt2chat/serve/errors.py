"""The server's one error path: every failure becomes an OpenAI-style body with a status a client can act on.

`{"error": {"message", "type", "param", "code"}}`: 4xx for anything the client got wrong, 500 only for our
own bugs (logged with their traceback, never shown). A `Gpt2ChatError` carries its own `status_code`
(default 400), `param` and `code`. A body pydantic rejects becomes one plain sentence that names the field
and says what it accepts (the `description` of the field in `schemas.py`), e.g.
`stop must be a string or a list of at most 4 strings; got a list of 5 items.`
This module knows nothing about models, tokens or streaming.
"""

from __future__ import annotations

import json
import logging
import types
import typing
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt2chat.errors import Gpt2ChatError
from gpt2chat.serve import schemas

log = logging.getLogger("gpt2chat.serve")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}

__all__ = ["ModelNotFoundError", "error_response", "install_error_handlers", "validation_message"]


class ModelNotFoundError(Gpt2ChatError):
    """A request naming a model this server does not serve: 404 `model_not_found`, as OpenAI and vLLM answer."""

    status_code = 404
    param = "model"
    code = "model_not_found"

    def __init__(self, asked: str, served: str):
        super().__init__(f"the model '{asked}' does not exist: this server serves '{served}' "
                         "(send that name, or leave model out)")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    type_ = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(schemas.error_body(message, type_, param, code).model_dump(), status_code=status)


def install_error_handlers(app: FastAPI, body_models: dict[str, type[BaseModel]]) -> None:
    """`body_models` maps a route's path to its request model, to describe a rejected field."""

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors(), body_models.get(request.url.path))
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI says only "error parsing the body"
            bad = exc.__cause__
            return error_response(400, f"the request body is not valid {bad.encoding.upper()}: byte "
                                       f"0x{bad.object[bad.start]:02x} at offset {bad.start} cannot be decoded "
                                       "(send the JSON encoded as UTF-8)")
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Gpt2ChatError)
    async def on_bad_input(request: Request, exc: Gpt2ChatError) -> JSONResponse:
        return error_response(getattr(exc, "status_code", 400), str(exc), getattr(exc, "param", None),
                              getattr(exc, "code", None))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error (the server log has the details)")


# ---- pydantic errors -> one sentence ---------------------------------------------------------------


def validation_message(errors: typing.Sequence[dict[str, Any]], model: type[BaseModel] | None
                       ) -> tuple[str, str | None]:
    """(sentence, param) for pydantic's errors on a request body of `model`."""
    if not errors:
        return "the request body is invalid", None
    if errors[0].get("type") == "json_invalid":
        detail = errors[0].get("ctx", {}).get("error", errors[0].get("msg"))
        return f"the request body is not valid JSON: {detail}", None
    described = [_describe(error, model) for error in errors]
    # A union field fails once per member ("stop" as a string and as a list): the member that got furthest
    # into the value (most fields deep, e.g. `content[0].type`) says best what is wrong.
    best = max(range(len(errors)), key=lambda i: (described[i][2], -i))
    error, (path, allowed, _) = errors[best], described[best]
    if not path:
        return "the request body must be a JSON object with the fields of the OpenAI API", None
    if error.get("type") == "missing":
        sentence = f"{path} is required: give {allowed}." if allowed else f"{path} is required."
    else:
        value = _value(error.get("input"))
        sentence = f"{path} must be {allowed}; got {value}." if allowed else f"{path}: {error.get('msg')}; got {value}."
    top = _top_field(path)
    others = list(dict.fromkeys(_top_field(p) for p, _, _ in described if p and _top_field(p) != top))
    if others:
        sentence += f" Also invalid: {', '.join(others)}."
    return sentence, path


def _top_field(path: str) -> str:
    return path.split(".")[0].split("[")[0]


def _describe(error: dict[str, Any], model: type[BaseModel] | None) -> tuple[str, str | None, int]:
    """(field path like `messages[0].role`, what that field accepts, how many fields deep) for one error."""
    loc = [part for part in error.get("loc", ()) if part != "body"]
    path, allowed, models, depth = "", None, [model] if model is not None else [], 0
    field = None
    for part in loc:
        if isinstance(part, int):  # an element of a list field: what one element may be
            path += f"[{part}]"
            depth += 1  # `stop[0]` says more than `stop` does
            extra = field.json_schema_extra if field is not None and isinstance(field.json_schema_extra, dict) else {}
            allowed = extra.get("item", allowed)
            continue
        named = next((m.model_fields[part] for m in models if part in m.model_fields), None)
        if named is None:
            if model is None and not path:  # no model to walk: trust pydantic's location
                path, depth = str(part), 1
            continue  # a union member's tag ("str", "list[str]") rather than a field
        field = named
        path += f".{part}" if path else part
        allowed, models, depth = field.description, _models_in(field.annotation), depth + 1
    return path, allowed, depth


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, unions, lists, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    if typing.get_origin(annotation) is not None or isinstance(annotation, types.UnionType):
        for arg in typing.get_args(annotation):
            found += _models_in(arg)
    return found


def _value(value: Any) -> str:
    """A short description of what the client sent."""
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, dict):
        return "an object"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."
