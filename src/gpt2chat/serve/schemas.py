"""Pydantic models of the OpenAI request and response bodies the server speaks.

Requests are validated strictly where a wrong type would otherwise be coerced silently (a string for
`max_tokens`, a bool for `n`): a malformed body is a 400, never a guess. Each field's `description` says
what it accepts; the error path (`serve/errors.py`) quotes it when a client sends something else.

Fields OpenAI defines that this server does not implement fall in two groups. Those whose answer would
differ if ignored are declared here and rejected by `unsupported()` with a 400 naming them
(`response_format` other than text, `tools` / `tool_choice` / `functions` / `function_call`, `logit_bias`,
non-zero `presence_penalty` / `frequency_penalty`, `audio`, non-text `modalities`, completions' `suffix`
and `best_of` > `n`). The others (`user`, `metadata`, `store`, `service_tier`, `parallel_tool_calls`,
`prediction`, `reasoning_effort`, ...) change nothing in the answer and are accepted and ignored, as
llama.cpp's server does, so that stock clients (the `openai` package, LangChain) work unchanged.
This module knows nothing about models, tokens or HTTP routing.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictStr

from gpt2chat.sampling import MAX_LOGPROBS  # most alternatives per token: the engine's limit and OpenAI's

MAX_CHOICES = 8  # upper bound on `n`; each choice is one engine slot
MAX_STOP_STRINGS = 4

# strict float takes JSON integers too, never bools or strings; one JSON-schema "number" with real bounds
# (a union of float and int would put pydantic's `gt` / `le` into /openapi.json, which JSON Schema ignores)
Temperature = Annotated[float, Field(strict=True, ge=0.0, le=2.0)]
TopP = Annotated[float, Field(strict=True, gt=0.0, le=1.0)]


def _whole_number(value: Any) -> Any:
    """JSON has one number type: 638.0 is the whole number 638, as JSON Schema's "integer" (what
    /openapi.json announces) says. A bool, a string or 638.5 is not one."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError("not a whole number")


def whole_number(**bounds: int) -> Any:
    """An int field taking JSON's whole numbers; `bounds` (ge, le) go into /openapi.json as minimum / maximum."""
    return Annotated[int, Field(**bounds), BeforeValidator(_whole_number)]


WholeNumber = whole_number()
PositiveTokens = whole_number(ge=1)
LogprobCount = whole_number(ge=0, le=MAX_LOGPROBS)
StopField = StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP_STRINGS)] | None

ROLES = "'system', 'developer', 'user', 'assistant' or 'tool'"


def _allowed(text: str, item: str | None = None) -> Any:
    """An optional field's default and what it accepts (`item`: what one element of a list may be)."""
    return Field(default=None, description=text, json_schema_extra={"item": item} if item else None)


class _Lenient(BaseModel):
    """Unknown fields are ignored (OpenAI keeps adding optional ones; clients send them)."""

    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"] = Field(description="\"text\" (this server reads text parts only)")
    text: StrictStr = Field(description="a string")


class ChatMessage(_Lenient):
    """One message. System messages may stand anywhere; an assistant's `tool_calls` and a tool message's
    `tool_call_id` are checked by the chat template (`templates.validate_messages`), which names the field."""

    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(description=f"one of {ROLES}")
    content: StrictStr | list[TextPart] | None = _allowed("a string or a list of text parts",
                                                          item='a text part like {"type": "text", "text": "..."}')
    name: StrictStr | None = _allowed("a string")
    tool_calls: list[Any] | None = _allowed("a list of tool calls",
                                            item='a call like {"id": "call_1", "type": "function", "function": '
                                                 '{"name": "f", "arguments": "{}"}}')
    tool_call_id: StrictStr | None = _allowed("a string")

    def text(self) -> str:
        """The message's text: content parts are joined, a missing content is empty."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def template_message(self) -> dict[str, Any]:
        """The message as the chat template takes it (`developer` is a system message)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class StreamOptions(_Lenient):
    include_usage: StrictBool = Field(default=False, description="true or false")


def _set(value: Any) -> bool:
    """Whether an optional field asks for something (None, "", 0, [] and {} ask for nothing)."""
    return value not in (None, "", 0, [], {})


class _SamplingRequest(_Lenient):
    model: StrictStr | None = _allowed("a string: the served model's name (/v1/models)")
    temperature: Temperature | None = _allowed("a number from 0 to 2")
    top_p: TopP | None = _allowed("a number above 0 and at most 1")
    max_tokens: PositiveTokens | None = _allowed("a whole number of at least 1")
    stop: StopField = _allowed(f"a string or a list of at most {MAX_STOP_STRINGS} strings", item="a string")
    n: whole_number(ge=1, le=MAX_CHOICES) = Field(
        default=1, description=f"a whole number from 1 to {MAX_CHOICES}")
    seed: WholeNumber | None = _allowed("a whole number")
    stream: StrictBool = Field(default=False, description="true or false")
    stream_options: StreamOptions | None = _allowed('an object like {"include_usage": true}')
    # Our extension: drop the oldest turns instead of answering 400 when a conversation is too long.
    truncate: StrictBool = Field(default=False, description="true or false")
    # OpenAI fields we do not implement and that would change the answer: declared so they can be refused.
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for the first field this server does not implement and must not ignore."""
        if _set(self.logit_bias):
            return "logit_bias", "logit_bias is not supported by this server: remove it"
        for name in ("presence_penalty", "frequency_penalty"):
            if _set(getattr(self, name)):
                return name, f"{name} is not supported by this server: remove it or send 0"
        return None


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)] = Field(
        description=f"a non-empty list of messages, each with a role ({ROLES}) and a string content",
        json_schema_extra={"item": 'a message like {"role": "user", "content": "Hi"}'})
    max_completion_tokens: PositiveTokens | None = _allowed("a whole number of at least 1")
    logprobs: StrictBool = Field(default=False, description="true or false")
    top_logprobs: LogprobCount | None = _allowed(f"a whole number from 0 to {MAX_LOGPROBS}")
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def top_logprob_count(self) -> int | None:
        """The engine's `logprobs` setting: None (off) or how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> tuple[str, str] | None:
        fmt = self.response_format
        if _set(fmt) and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            return "response_format", ('response_format is not supported by this server except {"type": "text"}: '
                                       "it cannot constrain replies to JSON")
        for name in ("tools", "functions"):
            if _set(getattr(self, name)):
                return name, f"{name} is not supported by this server: it cannot call tools or functions"
        for name in ("tool_choice", "function_call"):
            if _set(getattr(self, name)) and getattr(self, name) != "none":
                return name, f"{name} is not supported by this server: it cannot call tools or functions"
        if _set(self.audio) or (_set(self.modalities) and self.modalities != ["text"]):
            name = "audio" if _set(self.audio) else "modalities"
            return name, f"{name}: this server answers with text only"
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        return super().unsupported()


class CompletionRequest(_SamplingRequest):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1)] | Annotated[
        list[WholeNumber], Field(min_length=1)
    ] | Annotated[list[Annotated[list[WholeNumber], Field(min_length=1)]], Field(min_length=1)] = Field(
        description="a string, a list of strings, a list of token ids or a list of token-id lists",
        json_schema_extra={"item": "a string, a token id (a whole number) or a non-empty list of token ids"})
    echo: StrictBool = Field(default=False, description="true or false")
    logprobs: LogprobCount | None = _allowed(f"a whole number from 0 to {MAX_LOGPROBS}")
    suffix: Any = None
    best_of: Any = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts: each a string or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]

    def unsupported(self) -> tuple[str, str] | None:
        if _set(self.suffix):
            return "suffix", "suffix is not supported by this server: it only continues a prompt"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of is not supported by this server: use n for several completions"
        if self.truncate:
            return "truncate", "truncate applies to chat messages only: shorten the prompt instead"
        return super().unsupported()


# ---- responses -------------------------------------------------------------------------------------
# The one definition of every answer's shape: `streaming.py` builds these models and serializes them with
# `exclude_unset=True` (a field it does not set is left out, as OpenAI leaves it out: a chunk's delta
# carries only what it adds, `usage` is there only when the client asked for it).


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens read from the prompt cache instead of computed")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
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
    refusal: None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
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
    logprobs: CompletionLogprobs | None = None
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


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> ErrorBody:
    return ErrorBody(error=ErrorDetail(message=message, type=type_, param=param, code=code))
