"""Messages before layout: validation, and the one rule for the system part, tools and tool calls.

``validate_messages(messages, tools)`` checks OpenAI-style messages (roles ``system``, ``user``,
``assistant``, ``tool``) and names the index and field of anything wrong. ``flatten(messages, tools)`` turns
them into plain ``{"role", "content": str}`` messages that every layout renders the same way:

* **The system part.** The leading run of system messages (``[system, system, user]``) is merged into one,
  their contents joined by ``"\\n\\n"``; ``tools`` (``tool_calls.render_tools``) join that text as its last
  paragraph, or form the system part alone when there is no system message. A system message later in the
  conversation (``[user, system, user]``) stays where it is: each template renders it in place
  (see ``layouts``).
* **Assistant turns** with ``tool_calls`` get ``tool_calls.render_assistant(content, tool_calls)`` as their
  content (content may be null or empty then).
* ``role: "tool"`` messages keep their content; ``tool_call_id`` is checked, not rendered.

``flatten`` is idempotent, so the data loaders store flattened conversations and render them with no tools
argument: ``render(flatten(m, tools)) == render(m, tools=tools)``.

``JINJA_PRELUDE`` / ``JINJA_TEXT`` are the same rules in Jinja for the exported ``chat_template``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gpt2chat.errors import Gpt2ChatError
from gpt2chat.tool_calls import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOLS_INTRO,
    ToolCallError,
    check_tool_calls,
    check_tools,
    render_assistant,
    render_tools,
)

__all__ = ["ChatFormatError", "ROLES", "validate_messages", "flatten", "JINJA_PRELUDE", "JINJA_TEXT", "jinja_str"]

ROLES = ("system", "user", "assistant", "tool")


class ChatFormatError(Gpt2ChatError):
    """Messages that do not form a valid conversation (the message says which index and field)."""


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def validate_messages(messages, tools=None) -> list[dict]:
    """Check OpenAI-style messages (and `tools`); returns the messages as a list. Raises ChatFormatError."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatFormatError(f"messages: expected a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    msgs = list(messages)
    if not msgs:
        raise ChatFormatError("messages: the conversation is empty")
    try:
        if tools is not None:
            check_tools(tools)
        has_user = False
        for i, m in enumerate(msgs):
            _check_message(i, m)
            has_user = has_user or m["role"] == "user"
    except ToolCallError as e:
        raise ChatFormatError(str(e)) from None
    if not has_user:
        raise ChatFormatError("messages: the conversation has no user message")
    return msgs


def _check_message(i: int, m) -> None:
    where = f"messages[{i}]"
    if not isinstance(m, Mapping):
        raise ChatFormatError(f"{where}: expected a dict with 'role' and 'content', got {type(m).__name__}")
    if "role" not in m:
        raise ChatFormatError(f"{where}.role: missing")
    role = m["role"]
    if role not in ROLES:
        raise ChatFormatError(f"{where}.role: expected one of {', '.join(ROLES)}, got {role!r}")
    calls = m.get("tool_calls")
    if calls is not None and role != "assistant":
        raise ChatFormatError(f"{where}.tool_calls: only an assistant message may have tool_calls (role is {role!r})")
    if calls:
        check_tool_calls(calls, f"{where}.tool_calls")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise ChatFormatError(f"{where}.content: expected a string or null, got {type(content).__name__}")
    else:
        if "content" not in m:
            raise ChatFormatError(f"{where}.content: missing")
        if not isinstance(m["content"], str):
            raise ChatFormatError(f"{where}.content: expected a string, got {_type_name(m['content'])}")
    if role == "tool" and m.get("tool_call_id") is not None and not isinstance(m["tool_call_id"], str):
        raise ChatFormatError(f"{where}.tool_call_id: expected a string, got {_type_name(m['tool_call_id'])}")


def flatten(messages, tools=None) -> list[dict]:
    """Validated messages as plain {"role", "content"} dicts (the rules in the module docstring)."""
    msgs = validate_messages(messages, tools)
    lead = 0
    while lead < len(msgs) and msgs[lead]["role"] == "system":
        lead += 1
    parts = [m["content"] for m in msgs[:lead]]
    if tools:
        parts.append(render_tools(tools))
    out = [{"role": "system", "content": "\n\n".join(parts)}] if parts else []
    for m in msgs[lead:]:
        if m["role"] == "assistant":
            out.append({"role": "assistant", "content": render_assistant(m.get("content"), m.get("tool_calls"))})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def jinja_str(text: str) -> str:
    """`text` as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# Sets ns.sys (the system part's text), ns.has_sys and ns.nsys (how many leading system messages it merged).
# The template's namespace must declare sys, has_sys, nsys, lead and text.
JINJA_PRELUDE = (
    "{%- for m in messages -%}"
    "{%- if ns.lead and m['role'] == 'system' -%}"
    "{%- set ns.sys = ns.sys + ('\\n\\n' if ns.nsys > 0 else '') + m['content'] -%}{%- set ns.nsys = ns.nsys + 1 -%}"
    "{%- else -%}{%- set ns.lead = false -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set ns.has_sys = ns.nsys > 0 -%}"
    "{%- if tools -%}"
    "{%- set ns.sys = ns.sys + ('\\n\\n' if ns.has_sys else '') + " + jinja_str(TOOLS_INTRO) + " -%}"
    "{%- for t in tools -%}"
    "{%- set ns.sys = ns.sys + '\\n' + ((t['function'] if t['function'] is defined else t) | tojson) -%}"
    "{%- endfor -%}"
    "{%- set ns.has_sys = true -%}"
    "{%- endif -%}"
)

# Sets ns.text to message m's rendered content (an assistant's tool calls appended as <tool_call> blocks; an
# arguments *string* is inserted as written, an object through tojson).
JINJA_TEXT = (
    "{%- set ns.text = m['content'] if m['content'] is string else '' -%}"
    "{%- if m['role'] == 'assistant' and m['tool_calls'] is defined and m['tool_calls'] -%}"
    "{%- for tc in m['tool_calls'] -%}"
    "{%- set f = tc['function'] if tc['function'] is defined else tc -%}"
    "{%- set a = f['arguments'] if f['arguments'] is string else (f['arguments'] | tojson) -%}"
    "{%- set ns.text = ns.text + ('\\n' if ns.text else '') + " + jinja_str(TOOL_CALL_OPEN + '{"name": ')
    + " + (f['name'] | tojson) + ', \"arguments\": ' + a + " + jinja_str("}" + TOOL_CALL_CLOSE) + " -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
)
