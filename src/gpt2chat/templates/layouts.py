"""The four layouts, each as a Python renderer and its Jinja twin side by side (they must agree token for token).

A Python layout takes flattened messages (``messages.flatten``: at most one system message first, the system
part; assistant content with its tool calls already written in) and returns pieces. A Jinja twin takes the raw
messages and ``tools`` as transformers passes them and applies the same flattening (``JINJA_PRELUDE``,
``JINJA_TEXT``) inline.

Where each role goes:

=================  ==============================  =================================  ==========================
role               llama3-context                  user-assistant                     plain / guanaco
=================  ==============================  =================================  ==========================
system part        system header turn, first       ``<|SYSTEM|> {c} `` first          ``{c}\\n\\n`` first
later system       system header turn, in place    ``<|SYSTEM|> {c} `` in place       ``System: {c}\\n`` /
                                                                                      ``### System: {c}\\n``
tool               ``tool`` header turn            ``<|USER|> Tool: {c} ``            ``Tool: {c}\\n`` /
                                                                                      ``### Tool: {c}\\n``
=================  ==============================  =================================  ==========================
"""

from __future__ import annotations

from collections.abc import Callable

from gpt2chat.templates.messages import JINJA_PRELUDE, JINJA_TEXT, jinja_str

__all__ = ["EOS", "Piece", "layout_llama3", "layout_user_assistant", "colon_layout", "JINJA_LLAMA3",
           "JINJA_USER_ASSISTANT", "jinja_colon"]

EOS = "<|endoftext|>"

# A rendered piece: (is_control_token, text, trained). Text pieces between two control tokens are joined and
# tokenized as one segment.
Piece = tuple[bool, str, bool]

_NAMESPACE = "{%- set ns = namespace(sys='', has_sys=false, nsys=0, lead=true, text='', prev='', last_user=-1) -%}"


def _trained_index(msgs: list[dict]) -> int:
    """Index of the message whose reply is trained: the last message when it is an assistant's, else -1."""
    return len(msgs) - 1 if msgs[-1]["role"] == "assistant" else -1


# ---------------------------------------------------------------------------------------------- llama3-context
def layout_llama3(msgs: list[dict], add_generation_prompt: bool) -> list[Piece]:
    trained = _trained_index(msgs)
    out: list[Piece] = [(True, "<|begin_of_text|>", False)]

    def turn(i: int, m: dict) -> None:
        out.extend([(True, "<|start_header_id|>", False), (False, m["role"], False),
                    (True, "<|end_header_id|>", False)])
        t = i == trained
        out.extend([(False, m["content"], t), (True, "<|eot_id|>", t)])

    start = 0
    if msgs[0]["role"] == "system":
        turn(0, msgs[0])
        start = 1
    last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    if last_user > start:
        out.append((True, "<|start_context|>", False))
        for i in range(start, last_user):
            turn(i, msgs[i])
        out.append((True, "<|end_context|>", False))
    for i in range(last_user, len(msgs)):
        turn(i, msgs[i])
    if add_generation_prompt:
        out.extend([(True, "<|start_header_id|>", False), (False, "assistant", False),
                    (True, "<|end_header_id|>", False)])
    return out


# transformers renders these with trim_blocks/lstrip_blocks; every tag here also strips whitespace ("-").
JINJA_LLAMA3 = (
    _NAMESPACE + JINJA_PRELUDE
    + "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.last_user < 0 -%}{{- raise_exception('the conversation has no user message') -}}{%- endif -%}"
    "{{- '<|begin_of_text|>' -}}"
    "{%- if ns.has_sys -%}{{- '<|start_header_id|>system<|end_header_id|>' + ns.sys + '<|eot_id|>' -}}{%- endif -%}"
    "{%- if ns.last_user > ns.nsys -%}"
    "{{- '<|start_context|>' -}}"
    "{%- for m in messages[ns.nsys:ns.last_user] -%}" + JINJA_TEXT
    + "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>' + ns.text + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{{- '<|end_context|>' -}}"
    "{%- endif -%}"
    "{%- for m in messages[ns.last_user:] -%}" + JINJA_TEXT
    + "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>' -}}"
    "{%- if loop.last and m['role'] == 'assistant' -%}"
    "{%- generation -%}{{- ns.text + '<|eot_id|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- ns.text + '<|eot_id|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>' -}}{%- endif -%}"
)


# ---------------------------------------------------------------------------------------------- user-assistant
def layout_user_assistant(msgs: list[dict], add_generation_prompt: bool) -> list[Piece]:
    trained = _trained_index(msgs)
    out: list[Piece] = []
    for i, m in enumerate(msgs):
        if m["role"] == "system":
            out.extend([(True, "<|SYSTEM|>", False), (False, " " + m["content"] + " ", False)])
        elif m["role"] == "user":
            out.extend([(True, "<|USER|>", False), (False, " " + m["content"] + " ", False)])
        elif m["role"] == "tool":
            out.extend([(True, "<|USER|>", False), (False, " Tool: " + m["content"] + " ", False)])
        else:
            t = i == trained
            out.extend([(True, "<|ASSISTANT|>", False), (False, " " + m["content"], t), (True, "<|End|>", t)])
    if add_generation_prompt:
        out.append((True, "<|ASSISTANT|>", False))
    return out


JINJA_USER_ASSISTANT = (
    _NAMESPACE + JINJA_PRELUDE
    + "{%- if ns.has_sys -%}{{- '<|SYSTEM|> ' + ns.sys + ' ' -}}{%- endif -%}"
    "{%- for m in messages[ns.nsys:] -%}" + JINJA_TEXT
    + "{%- if m['role'] == 'system' -%}{{- '<|SYSTEM|> ' + ns.text + ' ' -}}"
    "{%- elif m['role'] == 'user' -%}{{- '<|USER|> ' + ns.text + ' ' -}}"
    "{%- elif m['role'] == 'tool' -%}{{- '<|USER|> Tool: ' + ns.text + ' ' -}}"
    "{%- else -%}{{- '<|ASSISTANT|>' -}}"
    "{%- if loop.last -%}{%- generation -%}{{- ' ' + ns.text + '<|End|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- ' ' + ns.text + '<|End|>' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|ASSISTANT|>' -}}{%- endif -%}"
)


# ---------------------------------------------------------------------------------------------- plain / guanaco
def colon_layout(user_tag: str, assistant_tag: str, system_tag: str, tool_tag: str
                 ) -> Callable[[list[dict], bool], list[Piece]]:
    """A layout of ``{tag} {content}\\n`` lines; the system part is a paragraph before the first line."""
    line_tags = {"user": user_tag, "system": system_tag, "tool": tool_tag}

    def layout(msgs: list[dict], add_generation_prompt: bool) -> list[Piece]:
        trained = _trained_index(msgs)
        out: list[Piece] = []
        prev = None
        for i, m in enumerate(msgs):
            role = m["role"]
            sep = "\n" if prev == "assistant" else ""
            if role == "system" and i == 0:
                out.append((False, m["content"] + "\n\n", False))
            elif role == "assistant":
                t = i == trained
                out.extend([(False, sep + assistant_tag, False), (False, " " + m["content"], t), (True, EOS, t)])
            else:
                out.append((False, sep + line_tags[role] + " " + m["content"] + "\n", False))
            prev = role
        if add_generation_prompt:
            sep = "\n" if prev == "assistant" else ""
            out.append((False, sep + assistant_tag, False))
        return out

    return layout


def jinja_colon(user_tag: str, assistant_tag: str, system_tag: str, tool_tag: str) -> str:
    """The Jinja twin of `colon_layout` with the same tags."""
    def line(tag: str) -> str:
        return "{{- " + jinja_str(tag + " ") + " + ns.text + '\\n' -}}"

    return (
        _NAMESPACE + JINJA_PRELUDE
        + "{%- if ns.has_sys -%}{{- ns.sys + '\\n\\n' -}}{%- endif -%}"
        "{%- for m in messages[ns.nsys:] -%}" + JINJA_TEXT
        + "{%- if ns.prev == 'assistant' -%}{{- '\\n' -}}{%- endif -%}"
        "{%- if m['role'] == 'user' -%}" + line(user_tag)
        + "{%- elif m['role'] == 'system' -%}" + line(system_tag)
        + "{%- elif m['role'] == 'tool' -%}" + line(tool_tag)
        + "{%- else -%}{{- " + jinja_str(assistant_tag) + " -}}"
        "{%- if loop.last -%}{%- generation -%}{{- ' ' + ns.text + '" + EOS + "' -}}{%- endgeneration -%}"
        "{%- else -%}{{- ' ' + ns.text + '" + EOS + "' -}}{%- endif -%}"
        "{%- endif -%}"
        "{%- set ns.prev = m['role'] -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{%- if ns.prev == 'assistant' -%}{{- '\\n' -}}{%- endif -%}{{- " + jinja_str(assistant_tag) + " -}}"
        "{%- endif -%}"
    )
