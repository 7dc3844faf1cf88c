"""Pydantic models of the OpenAI request and response bodies the server speaks.

Requests are validated strictly where a wrong type would otherwise be coerced silently (a string for
`max_tokens`, a bool for `n`): a malformed body is a 400, never a guess. Fields OpenAI defines that this
server does not implement (`presence_penalty`, `logit_bias`, `user`, ...) are accepted and ignored, as
llama.cpp's server does, so that stock clients (the `openai` package, LangChain) work unchanged.
This module knows nothing about models, tokens or HTTP routing.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

MAX_CHOICES = 8  # upper bound on `n`; each choice is one engine slot

Temperature = Annotated[StrictFloat | StrictInt, Field(ge=0.0, le=2.0)]
TopP = Annotated[StrictFloat | StrictInt, Field(gt=0.0, le=1.0)]
PositiveTokens = Annotated[StrictInt, Field(ge=1)]
StopField = StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None


class _Lenient(BaseModel):
    """Unknown fields are ignored (OpenAI keeps adding optional ones; clients send them)."""

    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        """The message's text: content parts are joined, a missing content is empty."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Lenient):
    include_usage: StrictBool = False


class _SamplingRequest(_Lenient):
    model: StrictStr | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: PositiveTokens | None = None
    stop: StopField = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] = 1
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # Our extension: drop the oldest turns (or prompt tokens) instead of answering 400 when too long.
    truncate: StrictBool = False

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: PositiveTokens | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingRequest):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1)] | Annotated[
        list[StrictInt], Field(min_length=1)
    ] | Annotated[list[Annotated[list[StrictInt], Field(min_length=1)]], Field(min_length=1)]
    echo: StrictBool = False

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts: each a string or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]


# ---- responses -------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gpt2chat"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return ErrorBody(error=ErrorDetail(message=message, type=type_, param=param, code=code)).model_dump()
