"""One parser per row format: a raw row dict -> `Conversation` or `PreferencePair`, or a `RowError`.

Formats (the `FORMAT` of a spec): `alpaca`, `guanaco`, `openorca`, `sharegpt`, `messages`, `ultrafeedback`,
and `oasst1` / `oasst2` (a whole message table, handled in `oasst.py`). Every parser checks each field it
reads (present, right type, non-empty, valid UTF-8, not absurdly long) and every message list (known roles,
user / assistant alternating; system messages anywhere: leading ones are merged and later ones rendered in
place by the templates), so what comes out can be rendered by any template.

Tool use (the `messages` format in TRL's layout; `sharegpt` in LLaMA-Factory's, with `function_call` and
`observation` turns): a row may have `tools` (OpenAI's list, or that list as a JSON
string), assistant messages with `tool_calls` (content null or empty allowed) and `role: "tool"` messages.
Turn order then is user -> assistant; an assistant with calls -> tool results -> assistant. The conversation
comes out flattened by `templates.flatten` (tools in the system message, calls written into the assistant's
content), so every later step (per-turn targets, context fitting, masks) handles plain messages: the loss falls
on the assistant's calls and replies, never on tool results or tool definitions.

This module knows rows and messages only: nothing about files (rows.py) or tokens (examples.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from gpt2chat.data.types import PreferencePair
from gpt2chat.templates import flatten
from gpt2chat.tool_calls import ToolCallError, check_tool_calls, check_tools

DEFAULT_MAX_CHARS = 200_000  # ~50k tokens: far past any GPT-2 context; a 10 MB string is a broken row


@dataclass
class FormatOptions:
    lang: str | None = "en"  # oasst: keep only this language (None = all)
    all_paths: bool = False  # oasst: every root-to-leaf path instead of the best-ranked one
    max_chars: int = DEFAULT_MAX_CHARS

    def key(self) -> dict:
        return {"lang": self.lang, "all_paths": self.all_paths, "max_chars": self.max_chars}


class RowError(Exception):
    """A row that cannot become a conversation: `reason` is the counter key, `field` the JSON path."""

    def __init__(self, reason: str, field: str | None, detail: str):
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail

    def message(self, where) -> str:
        place = f"{where}: field '{self.field}'" if self.field else f"{where}"
        return f"{place}: {self.detail}"


def parsed_rows(rows, parse, report, strict: bool):
    """(parsed, raw row) for each row `parse(raw)` accepts. A row the reader flagged, or one whose parse
    raised RowError, is a problem on `report` (counted, or raised at once when `strict`)."""
    for raw in rows:
        report.rows += 1
        if raw.problem:
            report.problem(raw.problem[0], raw.problem[1], strict)
            continue
        try:
            parsed = parse(raw)
        except RowError as exc:
            report.problem(exc.reason, exc.message(raw.where), strict)
            continue
        yield parsed, raw


def _type_name(value) -> str:
    return "null" if value is None else {dict: "object", list: "array", str: "string", bool: "boolean",
                                         int: "integer", float: "number"}.get(type(value), type(value).__name__)


def check_text(value, field: str, max_chars: int, *, missing_ok: bool = False) -> str:
    """A usable text field, stripped; RowError naming `field` otherwise."""
    if value is None:
        if missing_ok:
            return ""
        raise RowError("missing field", field, "missing (or null)")
    if not isinstance(value, str):
        raise RowError("wrong type", field, f"expected a string, got {_type_name(value)}")
    if len(value) > max_chars:
        raise RowError("text too long", field, f"{len(value):,} characters (limit {max_chars:,})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowError("invalid UTF-8", field, f"invalid UTF-8 / unpaired surrogate at character {exc.start}") from None
    text = value.strip()
    if not text and not missing_ok:
        raise RowError("empty text", field, "empty text")
    return text


def get_field(row: dict, name: str, prefix: str = ""):
    if name not in row:
        raise RowError("missing field", prefix + name, "missing")
    return row[name]


def check_list(value, field: str) -> list:
    if value is None:
        raise RowError("missing field", field, "missing (or null)")
    if not isinstance(value, list):
        raise RowError("wrong type", field, f"expected an array, got {_type_name(value)}")
    if not value:
        raise RowError("empty text", field, "empty list")
    return value


def _next_roles(message: dict | None) -> tuple[str, ...]:
    """The roles that may follow `message` (None: the start of the body)."""
    if message is None or message["role"] == "assistant" and not message.get("tool_calls"):
        return ("user",)
    if message["role"] == "user":
        return ("assistant",)
    return ("tool",) if message["role"] == "assistant" else ("tool", "assistant")


def check_messages(messages: list[dict], field: str, *, end: str) -> list[dict]:
    """Validate turn order: user/assistant alternating starting with user (an assistant's tool calls are
    followed by one or more tool results, then the assistant again); system messages may stand anywhere.

    end="assistant": a conversation to train on (trailing user / tool turns are dropped; needs one reply);
    end="user": a preference prompt (must end with the user turn the replies answer).
    """
    lead = 0
    while lead < len(messages) and messages[lead]["role"] == "system":
        lead += 1
    body = messages[lead:]
    previous = None
    for index, message in enumerate(body):
        if message["role"] == "system":  # a later system message stands in place (templates render it there)
            continue
        expected = _next_roles(previous)
        if message["role"] not in expected:
            why = ("an assistant's tool calls are answered by tool messages" if expected == ("tool",)
                   else "turns must alternate, user first")
            raise RowError("bad turn order", f"{field}[{index + lead}]",
                           f"expected {' or '.join(expected)} next, got {message['role']} ({why})")
        previous = message
    if end == "assistant":
        while messages and messages[-1]["role"] != "assistant":
            messages = messages[:-1]
        if not messages:
            raise RowError("no assistant reply", field, "no assistant reply to train on")
    elif not body or body[-1]["role"] != "user":  # (a system message after the question is refused too)
        raise RowError("bad turn order", field, "the prompt must end with a user turn")
    return messages


ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
}


def parse_message_list(value, field: str, max_chars: int, *, role_key="role", content_key="content",
                       aliases: dict | None = None, tool_turns: bool = False) -> list[dict]:
    """A list of {role, content} (or {from, value}) dicts -> normalised messages; roles checked.
    `tool_turns`: also `role: "tool"` messages and assistant `tool_calls` (kept, checked)."""
    items = check_list(value, field)
    messages = []
    table = aliases or {name: name for name in ("system", "user", "assistant", *(("tool",) if tool_turns else ()))}
    for index, item in enumerate(items):
        place = f"{field}[{index}]"
        if not isinstance(item, dict):
            raise RowError("wrong type", place, f"expected an object, got {_type_name(item)}")
        role = get_field(item, role_key, place + ".")
        if not isinstance(role, str):
            raise RowError("wrong type", f"{place}.{role_key}", f"expected a string, got {_type_name(role)}")
        if role.strip().lower() not in table:
            raise RowError("unknown role", f"{place}.{role_key}",
                           f"unknown role {role[:40]!r} (expected one of {', '.join(sorted(table))})")
        role = table[role.strip().lower()]
        calls = _tool_calls(item, role, place) if tool_turns else None
        content = item.get(content_key) if calls or role == "tool" else get_field(item, content_key, place + ".")
        if isinstance(content, list):  # OpenAI content parts: [{"type": "text", "text": ...}]
            content = _join_text_parts(content, f"{place}.{content_key}")
        if role == "tool" and content is None:
            raise RowError("missing field", f"{place}.{content_key}", "missing (or null): a tool message has the tool's result")
        text = check_text(content, f"{place}.{content_key}", max_chars, missing_ok=bool(calls) or role == "tool")
        messages.append({"role": role, "content": text, **({"tool_calls": calls} if calls else {})})
    return messages


def _tool_calls(item: dict, role: str, place: str) -> list[dict] | None:
    """An assistant message's checked tool calls (None when it has none)."""
    calls = item.get("tool_calls")
    if calls is None or calls == []:
        return None
    if role != "assistant":
        raise RowError("bad tool call", f"{place}.tool_calls", f"only an assistant message may have tool_calls "
                                                                f"(role is {role!r})")
    try:
        return check_tool_calls(calls, f"{place}.tool_calls")
    except ToolCallError as exc:
        raise RowError("bad tool call", exc.field, exc.detail) from None


def parse_tools(row: dict) -> list[dict] | None:
    """A row's `tools` (a list, or a list as a JSON string) checked; None when it has none."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as exc:
            raise RowError("bad tools", "tools", f"a string that is not valid JSON ({exc.msg} at character "
                                                 f"{exc.pos})") from None
    if tools is None or tools == []:
        return None
    try:
        return check_tools(tools)
    except ToolCallError as exc:
        raise RowError("bad tools", exc.field, exc.detail) from None


def _join_text_parts(parts: list, field: str) -> str:
    texts = []
    for index, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RowError("wrong type", f"{field}[{index}]", "only text content parts are supported")
        texts.append(part["text"])
    return "\n".join(texts)


# ---------------------------------------------------------------- SFT formats


def parse_alpaca(row: dict, options: FormatOptions) -> list[dict]:
    instruction = check_text(get_field(row, "instruction"), "instruction", options.max_chars)
    extra = check_text(row.get("input"), "input", options.max_chars, missing_ok=True)
    output = check_text(get_field(row, "output"), "output", options.max_chars)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    system = check_text(row.get("system"), "system", options.max_chars, missing_ok=True)
    return ([{"role": "system", "content": system}] if system else []) + messages


GUANACO_MARKER = re.compile(r"###\s*(Human|Assistant)\s*:")


def parse_guanaco(row: dict, options: FormatOptions) -> list[dict]:
    text = check_text(get_field(row, "text"), "text", options.max_chars)
    pieces = GUANACO_MARKER.split(text)
    if pieces[0].strip():
        raise RowError("bad turn order", "text", "text must start with '### Human:'")
    messages = []
    for speaker, content in zip(pieces[1::2], pieces[2::2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        content = content.strip()
        if not content:
            raise RowError("empty text", "text", f"empty '### {speaker}:' turn {len(messages) + 1}")
        messages.append({"role": role, "content": content})
    if not messages:
        raise RowError("missing field", "text", "no '### Human:' / '### Assistant:' turns found")
    return check_messages(messages, "text", end="assistant")


def parse_openorca(row: dict, options: FormatOptions) -> list[dict]:
    """system_prompt becomes a system message of its own, never text glued to the question (seed 004's bug)."""
    system = check_text(row.get("system_prompt"), "system_prompt", options.max_chars, missing_ok=True)
    question = check_text(get_field(row, "question"), "question", options.max_chars)
    response = check_text(get_field(row, "response"), "response", options.max_chars)
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": question}, {"role": "assistant", "content": response}]


def parse_sharegpt(row: dict, options: FormatOptions) -> list[dict]:
    if "chosen" in row and "rejected" in row:  # preference layout: train on the chosen reply
        pair = parse_sharegpt_preference(row, options)
        return pair.prompt + [{"role": "assistant", "content": pair.chosen}]
    tools = parse_tools(row)
    messages = _sharegpt_turns(row, options, SHAREGPT_TOOL_ALIASES)
    messages = check_messages([_sharegpt_call(m, i) for i, m in enumerate(messages)], "conversations", end="assistant")
    if tools or any(m["role"] == "tool" or "tool_calls" in m for m in messages):
        messages = flatten(messages, tools)
    return messages


# LLaMA-Factory's ShareGPT tool layout: a `function_call` turn (the assistant's call(s) as JSON) and an
# `observation` turn (the tool's result), with the tool list in the row's `tools`.
SHAREGPT_TOOL_ALIASES = {**ROLE_ALIASES, "function_call": "function_call", "observation": "tool"}


def _sharegpt_call(message: dict, index: int) -> dict:
    """A `function_call` turn -> an assistant message with tool_calls; other turns unchanged."""
    if message["role"] != "function_call":
        return message
    place = f"conversations[{index}].value"
    try:
        value = json.loads(message["content"])
    except json.JSONDecodeError as exc:
        raise RowError("bad tool call", place, f"a function_call turn holds JSON ({exc.msg} at character "
                                               f"{exc.pos})") from None
    try:
        calls = check_tool_calls(value if isinstance(value, list) else [value], place)
    except ToolCallError as exc:
        raise RowError("bad tool call", exc.field, exc.detail) from None
    return {"role": "assistant", "content": "", "tool_calls": calls}


def _sharegpt_turns(row: dict, options: FormatOptions, aliases: dict = ROLE_ALIASES) -> list[dict]:
    messages = parse_message_list(get_field(row, "conversations"), "conversations", options.max_chars,
                                  role_key="from", content_key="value", aliases=aliases)
    system = check_text(row.get("system"), "system", options.max_chars, missing_ok=True)
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def parse_messages(row: dict, options: FormatOptions) -> list[dict]:
    tools = parse_tools(row)
    messages = parse_message_list(get_field(row, "messages"), "messages", options.max_chars, tool_turns=True)
    messages = check_messages(messages, "messages", end="assistant")
    if tools or any(m["role"] == "tool" or "tool_calls" in m for m in messages):
        messages = flatten(messages, tools)
    return messages


def parse_ultrafeedback_conversation(row: dict, options: FormatOptions) -> list[dict]:
    pair = parse_ultrafeedback(row, options)
    return pair.prompt + [{"role": "assistant", "content": pair.chosen}]


# ---------------------------------------------------------------- preference formats


def _reply(value, field: str, options: FormatOptions, prompt: list[dict] | None) -> tuple[list[dict] | None, str]:
    """A reply given as a string, a one-message list, or a whole conversation -> (its prompt or None, text)."""
    if isinstance(value, str) or value is None:
        return None, check_text(value, field, options.max_chars)
    if isinstance(value, dict):  # {"role": "assistant", "content": ...} / {"from": "gpt", "value": ...}
        value = [value]
    keys = ("from", "value") if isinstance(value, list) and value and isinstance(value[0], dict) \
        and "from" in value[0] else ("role", "content")
    messages = parse_message_list(value, field, options.max_chars, role_key=keys[0], content_key=keys[1],
                                  aliases=ROLE_ALIASES)
    if messages[-1]["role"] != "assistant":
        raise RowError("bad turn order", f"{field}[{len(messages) - 1}]", "the last message must be the assistant reply")
    if len(messages) == 1:
        return None, messages[0]["content"]
    return messages[:-1], messages[-1]["content"]


def _same_prompt(a: list[dict], b: list[dict]) -> bool:
    return [(m["role"], m["content"]) for m in a] == [(m["role"], m["content"]) for m in b]


def parse_ultrafeedback(row: dict, options: FormatOptions) -> PreferencePair:
    """trl-lib/ultrafeedback_binarized (chosen / rejected message lists sharing the prompt), TRL's explicit
    prompt layout (prompt messages + one-message replies), and flat prompt / chosen / rejected strings."""
    prompt_value = row.get("prompt")
    prompt: list[dict] | None = None
    if isinstance(prompt_value, list):
        prompt = parse_message_list(prompt_value, "prompt", options.max_chars, aliases=ROLE_ALIASES)
    chosen_prompt, chosen = _reply(get_field(row, "chosen"), "chosen", options, prompt)
    rejected_prompt, rejected = _reply(get_field(row, "rejected"), "rejected", options, prompt)
    if chosen_prompt is not None and rejected_prompt is not None and not _same_prompt(chosen_prompt, rejected_prompt):
        raise RowError("prompt mismatch", "rejected", "chosen and rejected do not share the same prompt turns")
    embedded = chosen_prompt if chosen_prompt is not None else rejected_prompt
    if prompt is None and embedded is not None:
        prompt = embedded
        if isinstance(prompt_value, str) and prompt_value.strip() and prompt_value.strip() != prompt[-1]["content"]:
            raise RowError("prompt mismatch", "prompt", "the prompt string differs from the user turn in chosen")
    elif prompt is not None and embedded is not None and not _same_prompt(prompt, embedded):
        raise RowError("prompt mismatch", "chosen", "the chosen conversation does not start with the prompt")
    if prompt is None:
        prompt = [{"role": "user", "content": check_text(prompt_value, "prompt", options.max_chars)}]
    prompt = check_messages(prompt, "prompt", end="user")
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, source="")


def parse_sharegpt_preference(row: dict, options: FormatOptions) -> PreferencePair:
    """LLaMA-Factory's layout: `conversations` ending with a human turn + `chosen` / `rejected` gpt turns."""
    prompt = check_messages(_sharegpt_turns(row, options), "conversations", end="user")
    _, chosen = _reply(get_field(row, "chosen"), "chosen", options, prompt)
    _, rejected = _reply(get_field(row, "rejected"), "rejected", options, prompt)
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, source="")


CONVERSATION_PARSERS = {
    "alpaca": parse_alpaca,
    "guanaco": parse_guanaco,
    "openorca": parse_openorca,
    "sharegpt": parse_sharegpt,
    "messages": parse_messages,
    "ultrafeedback": parse_ultrafeedback_conversation,
}
PREFERENCE_PARSERS = {
    "ultrafeedback": parse_ultrafeedback,
    "sharegpt": parse_sharegpt_preference,
}
TABLE_FORMATS = ("oasst1", "oasst2")  # whole-table formats (message trees)
FORMATS = (*TABLE_FORMATS, *CONVERSATION_PARSERS)
