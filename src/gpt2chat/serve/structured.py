"""Structured output on the server: a request's `logit_bias`, `response_format` and `tools` become what the
sampler applies (a bias, a grammar), and a reply with tool calls is read back into OpenAI's `tool_calls`.

`structure_of(body, ...)` checks those fields (a 400 naming the bad key, value or schema) and returns a
`Structure`: the logit bias pairs, the `Constraint` (a JSON Schema, any JSON object, or the tool-call
grammar of `Constraint.tool_calls`), the tools to render into the prompt and whether the reply is read
for calls. `tool_choice`: "none" renders the tools and decodes freely; "auto" lets the reply be free text
or calls; "required" forces one call (one or more with `parallel_tool_calls`, OpenAI's default true);
a named function forces calls of that one. The text format of a call is `gpt2chat.tool_calls`'s.

`ToolCallStream` splits a streamed reply into content and tool-call deltas (index, id and name first, then
argument text as it comes), as OpenAI streams them; a whole reply is read by `tool_calls.parse_assistant`.
This module knows nothing about HTTP or the engine.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpt2chat.grammar import Constraint, GrammarError
from gpt2chat.sampling import MAX_LOGIT_BIAS
from gpt2chat.serve.service import ServiceError
from gpt2chat.tool_calls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, new_call_id

__all__ = ["Structure", "structure_of", "logit_bias_pairs", "ToolCallStream"]


@dataclass(frozen=True)
class Structure:
    """What a request's structured-output fields ask of one generation."""

    logit_bias: tuple[tuple[int, float], ...] = ()
    constraint: Constraint | None = None
    tools: list[dict] | None = None  # rendered into the prompt (even with tool_choice "none")
    reads_tool_calls: bool = False  # the reply is read for <tool_call> blocks


def logit_bias_pairs(bias: dict[str, Any] | None, vocab: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} -> (id, bias) pairs; a 400 names the first bad key or value."""
    pairs = []
    for key, value in (bias or {}).items():
        if not key.strip().isdigit() or not 0 <= int(key) < vocab:
            raise ServiceError(f"logit_bias key {key!r} is not a token id: keys are token ids from 0 to "
                               f"{vocab - 1}, written as strings", param="logit_bias")
        if (not isinstance(value, int | float) or isinstance(value, bool)
                or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS):
            raise ServiceError(f"logit_bias[{key!r}] = {value!r}: a bias is a number from {-MAX_LOGIT_BIAS:g} to "
                               f"{MAX_LOGIT_BIAS:g}", param="logit_bias")
        pairs.append((int(key), float(value)))
    return tuple(pairs)


def structure_of(body: Any, tokenizer: Any, width: int, vocab: int) -> Structure:
    """The `Structure` of a chat or completion request body (`schemas`' models); `width` is the model's
    logits width, `vocab` the tokenizer's size."""
    bias = logit_bias_pairs(body.logit_bias, vocab)
    constraint = _format_constraint(body.response_format, tokenizer, width)
    tools = [tool.model_dump(exclude_none=True) for tool in getattr(body, "tools", None) or []]
    choice = getattr(body, "tool_choice", None) or ("auto" if tools else "none")
    if choice == "none":
        return Structure(bias, constraint, tools or None)
    if not tools:
        raise ServiceError(f"tool_choice {_choice_text(choice)} needs tools: send the tools it may call",
                           param="tool_choice")
    if constraint is not None:
        raise ServiceError("response_format constrains the reply to JSON and tools to tool calls: send one, or "
                           'tool_choice "none" with response_format', param="response_format")
    callable_tools = tools
    if not isinstance(choice, str):
        callable_tools = [t for t in tools if t["function"]["name"] == choice.function.name]
        if not callable_tools:
            names = ", ".join(t["function"]["name"] for t in tools)
            raise ServiceError(f"tool_choice names the function {choice.function.name!r}, which is not one of the "
                               f"tools ({names})", param="tool_choice")
    parallel = getattr(body, "parallel_tool_calls", None) is not False
    try:
        constraint = Constraint.tool_calls(callable_tools, tokenizer, width, free_text=choice == "auto",
                                           parallel=parallel)
    except GrammarError as exc:
        raise ServiceError(str(exc), param="tools") from None
    return Structure(bias, constraint, tools, reads_tool_calls=True)


def _choice_text(choice: Any) -> str:
    return repr(choice) if isinstance(choice, str) else f"{{function: {choice.function.name!r}}}"


def _format_constraint(fmt: Any, tokenizer: Any, width: int) -> Constraint | None:
    if fmt is None or fmt.type == "text":
        return None
    try:
        if fmt.type == "json_object":
            return Constraint.json_object(tokenizer, width)
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise ServiceError('response_format of type "json_schema" needs json_schema.schema: '
                               '{"type": "json_schema", "json_schema": {"name": "answer", "schema": {...}}}',
                               param="response_format")
        return Constraint.json_schema(fmt.json_schema.schema_, tokenizer, width,
                                      what="response_format.json_schema.schema")
    except GrammarError as exc:
        raise ServiceError(f"{exc} (this server cannot constrain replies to that schema)",
                           param="response_format") from None


# ---- streamed tool calls -------------------------------------------------------------------------------
_AFTER_NAME = ', "arguments": '  # what follows the name in a call's JSON (tool_calls' format)


class ToolCallStream:
    """Streamed reply text -> (content, [(index, id or None, name or None, argument text)]) per push.

    The text follows the tool-call grammar: content, then `<tool_call>{"name": N, "arguments": {...}}
    </tool_call>` blocks separated by newlines. Text that may be the start of a block is held back until
    it is known; argument text is passed on as it comes (its JSON is tracked, so a `}` inside a string
    does not end it). `calls` is how many calls were started."""

    def __init__(self, make_id: Callable[[], str] = new_call_id):
        self._make_id = make_id
        self._buffer = ""
        self._state = "content"  # content | head | args | close | between
        self.calls = 0
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def push(self, text: str) -> tuple[str, list[tuple[int, str | None, str | None, str]]]:
        self._buffer += text
        content, deltas = "", []
        while self._buffer:
            if self._state == "content":
                start = self._buffer.find(TOOL_CALL_OPEN)
                if start < 0:
                    keep = _held_back(self._buffer, ("\n" + TOOL_CALL_OPEN, TOOL_CALL_OPEN))
                    content += self._buffer[:len(self._buffer) - keep]
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    break
                before = self._buffer[:start]
                content += before[:-1] if before.endswith("\n") else before  # the block's own newline
                self._buffer, self._state = self._buffer[start + len(TOOL_CALL_OPEN):], "head"
            elif self._state == "head":
                end = self._buffer.find(_AFTER_NAME)
                if end < 0:
                    break
                name = json.loads(self._buffer[:end].lstrip() + "}")["name"]
                deltas.append((self.calls, self._make_id(), name, ""))
                self.calls += 1
                self._buffer, self._state = self._buffer[end + len(_AFTER_NAME):], "args"
                self._depth, self._in_string, self._escaped = 0, False, False
            elif self._state == "args":
                cut = self._scan_arguments()
                deltas.append((self.calls - 1, None, None, self._buffer[:cut]))
                self._buffer = self._buffer[cut:]
                if self._depth:
                    break
                self._state = "close"
            elif self._state == "close":  # the call's `}</tool_call>`
                closing = "}" + TOOL_CALL_CLOSE
                if self._buffer.startswith(closing):
                    self._buffer, self._state = self._buffer[len(closing):], "between"
                elif closing.startswith(self._buffer):
                    break
                else:  # not the grammar's text: pass it on rather than lose it
                    content, self._buffer, self._state = content + self._buffer, "", "content"
            else:  # "between": whitespace, then another block
                rest = self._buffer.lstrip()
                if rest.startswith(TOOL_CALL_OPEN):
                    self._buffer, self._state = rest[len(TOOL_CALL_OPEN):], "head"
                elif TOOL_CALL_OPEN.startswith(rest):
                    self._buffer = rest
                    break
                else:
                    content, self._buffer, self._state = content + rest, "", "content"
        merged: list[tuple[int, str | None, str | None, str]] = []
        for delta in deltas:  # one delta per call and push: the header and its first argument text together
            if merged and merged[-1][0] == delta[0] and delta[1] is None:
                merged[-1] = (*merged[-1][:3], merged[-1][3] + delta[3])
            elif delta[1] is not None or delta[3]:
                merged.append(delta)
        return content, merged

    def _scan_arguments(self) -> int:
        """How much of the buffer belongs to the arguments object (all of it while it is still open)."""
        for i, char in enumerate(self._buffer):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return len(self._buffer)

    def finish(self) -> str:
        """Text still held back at the end (a reply cut inside what looked like a tag's start)."""
        held, self._buffer = (self._buffer if self._state == "content" else ""), ""
        return held


def _held_back(text: str, markers: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that is the start of one of `markers`."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker), len(text)), best, -1):
            if text.endswith(marker[:k]):
                best = k
                break
    return best
