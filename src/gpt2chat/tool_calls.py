"""Tool calls as text: the one place that writes an assistant's ``tool_calls`` and ``tools`` into a prompt and
reads generated text back into tool calls.

The format (plain-text tags, no special tokens; every chat template and its Jinja export use it):

* An assistant turn with tool calls is its content (may be empty), then one block per call::

      {content}\\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\\n<tool_call>...

  The ``"\\n"`` before a block is left out when it is the first thing in the turn (empty content). The JSON is
  ``json.dumps({"name": ..., "arguments": {...}}, ensure_ascii=False)`` (Python's default separators), which
  is what transformers' ``tojson`` filter writes, so the Jinja export gives the same text.
* ``tools`` (OpenAI's ``[{"type": "function", "function": {name, description, parameters}}]``) render as
  `TOOLS_INTRO` then one line per tool: ``json.dumps(tool["function"], ensure_ascii=False)``. The templates
  put that text in the system part (after the system message's content and a blank line, or alone).

API:

``check_tools(tools, field="tools") -> list[dict]``
    validate a tools list (OpenAI shape); ``ToolCallError`` names the index and field.
``check_tool_calls(tool_calls, field="tool_calls") -> list[dict]``
    validate an assistant's ``tool_calls`` (OpenAI shape, or HF's ``{"name", "arguments"}`` without the
    ``function`` wrapper); returns ``[{"id", "type": "function", "function": {"name", "arguments": dict}}]``:
    an arguments JSON *string* (what OpenAI clients send) is parsed to an object.
``render_tools(tools) -> str``, ``render_assistant(content, tool_calls) -> str``
    the prompt text; ``render_assistant`` is exactly the content when there are no calls.
``parse_assistant(text, make_id=new_call_id) -> ParsedReply``
    generated text -> (content, OpenAI-shape tool_calls with ``arguments`` re-serialized as a JSON string).
    ``parse_assistant(render_assistant(c, calls))`` gives back ``c`` and the calls (ids aside). Malformed
    blocks raise ``ToolCallError`` saying which call and what is wrong.

A message's content that itself spells ``<tool_call>`` is rendered as written; parsing such text reads it as
a call (the tags are plain text, like any chat format's role names).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from gpt2chat.errors import Gpt2ChatError

__all__ = [
    "TOOL_CALL_OPEN",
    "TOOL_CALL_CLOSE",
    "TOOLS_INTRO",
    "ToolCallError",
    "ParsedReply",
    "check_tools",
    "check_tool_calls",
    "render_tools",
    "render_assistant",
    "parse_assistant",
    "new_call_id",
]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOLS_INTRO = (
    "You can call these tools. To call one, reply with "
    '<tool_call>{"name": <tool name>, "arguments": <arguments object>}</tool_call>.'
)


class ToolCallError(Gpt2ChatError):
    """Malformed tools, tool_calls, or generated tool-call text. The message is ``"FIELD: what is wrong"``
    (``field`` and ``detail`` give the two parts, e.g. for a data loader's own error format)."""

    @property
    def field(self) -> str:
        return str(self).partition(": ")[0]

    @property
    def detail(self) -> str:
        return str(self).partition(": ")[2]


@dataclass(frozen=True)
class ParsedReply:
    """Generated assistant text split into its content and its tool calls (OpenAI shape)."""

    content: str
    tool_calls: list[dict] = field(default_factory=list)


def new_call_id() -> str:
    """A fresh tool-call id in OpenAI's style (``call_`` + 24 hex digits)."""
    return "call_" + secrets.token_hex(12)


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _name(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ToolCallError(f"{where}: expected a non-empty string, got {_type_name(value)} {value!r:.60}")
    return value


def _arguments(value, where: str) -> dict:
    """An arguments object, or a JSON string holding one -> the object."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise ToolCallError(f"{where}: not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(value, Mapping):
        raise ToolCallError(f"{where}: expected a JSON object, got {_type_name(value)}")
    return dict(value)


def _list(value, where: str) -> list:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise ToolCallError(f"{where}: expected a list, got {_type_name(value)}")
    return list(value)


def check_tools(tools, field: str = "tools") -> list[dict]:
    """Validate OpenAI-shape tool definitions; returns them as a list of dicts."""
    out = []
    for i, tool in enumerate(_list(tools, field)):
        where = f"{field}[{i}]"
        if not isinstance(tool, Mapping):
            raise ToolCallError(f"{where}: expected an object, got {_type_name(tool)}")
        kind = tool.get("type", "function")
        if kind != "function":
            raise ToolCallError(f"{where}.type: only 'function' tools are supported, got {kind!r}")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise ToolCallError(f"{where}.function: expected an object with 'name', got {_type_name(function)}")
        _name(function.get("name"), f"{where}.function.name")
        params = function.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise ToolCallError(f"{where}.function.parameters: expected a JSON Schema object, got "
                                f"{_type_name(params)}")
        out.append(dict(tool))
    return out


def check_tool_calls(tool_calls, field: str = "tool_calls") -> list[dict]:
    """Validate an assistant's tool calls; arguments strings become objects (see the module docstring)."""
    out = []
    for i, call in enumerate(_list(tool_calls, field)):
        where = f"{field}[{i}]"
        if not isinstance(call, Mapping):
            raise ToolCallError(f"{where}: expected an object, got {_type_name(call)}")
        kind = call.get("type", "function")
        if kind != "function":
            raise ToolCallError(f"{where}.type: only 'function' calls are supported, got {kind!r}")
        if "function" in call:
            function, fwhere = call["function"], f"{where}.function"
            if not isinstance(function, Mapping):
                raise ToolCallError(f"{fwhere}: expected an object with 'name' and 'arguments', got "
                                    f"{_type_name(function)}")
        else:
            function, fwhere = call, where
        name = _name(function.get("name"), f"{fwhere}.name")
        arguments = _arguments(function.get("arguments", {}), f"{fwhere}.arguments")
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise ToolCallError(f"{where}.id: expected a string, got {_type_name(call_id)}")
        out.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    return out


def render_tools(tools) -> str:
    """The text that tells the model which tools it has (goes in the system part of the prompt)."""
    lines = [_dumps(tool["function"]) for tool in check_tools(tools)]
    return "\n".join([TOOLS_INTRO, *lines])


def render_assistant(content: str | None, tool_calls=None) -> str:
    """An assistant turn's text: content, then one ``<tool_call>`` block per call."""
    text = content or ""
    for call in check_tool_calls(tool_calls or []):
        function = call["function"]
        block = TOOL_CALL_OPEN + _dumps({"name": function["name"], "arguments": function["arguments"]}) + TOOL_CALL_CLOSE
        text += ("\n" if text else "") + block
    return text


def parse_assistant(text: str, make_id: Callable[[], str] = new_call_id) -> ParsedReply:
    """Generated assistant text -> ParsedReply. Text without ``<tool_call>`` is all content.

    Blocks may be separated by whitespace; after the first block only whitespace and further blocks may come.
    """
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return ParsedReply(content=text)
    content = text[:start]
    if content.endswith("\n"):
        content = content[:-1]
    decoder = json.JSONDecoder()
    calls = []
    pos = start
    while True:
        k = len(calls) + 1
        body = pos + len(TOOL_CALL_OPEN)
        while body < len(text) and text[body].isspace():
            body += 1
        try:
            value, end = decoder.raw_decode(text, body)
        except json.JSONDecodeError as e:
            raise ToolCallError(f"tool call {k}: the text after {TOOL_CALL_OPEN} is not valid JSON "
                                f"({e.msg} at character {e.pos})") from None
        if not isinstance(value, dict):
            raise ToolCallError(f"tool call {k}: expected a JSON object with 'name' and 'arguments', got "
                                f"{_type_name(value)}")
        extra = sorted(set(value) - {"name", "arguments"})
        if extra:
            raise ToolCallError(f"tool call {k}: unexpected keys {extra}; a call has 'name' and 'arguments' only")
        name = _name(value.get("name"), f"tool call {k}: name")
        if "arguments" not in value:
            raise ToolCallError(f"tool call {k}: 'arguments' is missing")
        arguments = _arguments(value["arguments"], f"tool call {k}: arguments")
        rest = text[end:].lstrip()
        if not rest.startswith(TOOL_CALL_CLOSE):
            raise ToolCallError(f"tool call {k}: expected {TOOL_CALL_CLOSE} after the JSON object, got "
                                f"{rest[:30]!r}" if rest else f"tool call {k}: {TOOL_CALL_CLOSE} is missing")
        calls.append({"id": make_id(), "type": "function",
                      "function": {"name": name, "arguments": _dumps(arguments)}})
        after = len(text) - len(rest) + len(TOOL_CALL_CLOSE)
        tail = text[after:].lstrip()
        if not tail:
            return ParsedReply(content=content, tool_calls=calls)
        if not tail.startswith(TOOL_CALL_OPEN):
            raise ToolCallError(f"text after tool call {k}: only further {TOOL_CALL_OPEN} blocks may follow a "
                                f"call, got {tail[:30]!r}")
        pos = len(text) - len(tail)
