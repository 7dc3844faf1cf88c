"""Chat templates: messages -> (token ids, assistant mask), and the same layout as a Jinja `chat_template`.

Why one module of ~425 lines (over ~400): four templates, each a renderer and its Jinja twin, which
must be read side by side to see that they agree.

Four templates (``TEMPLATES``):

``llama3-context`` (default, seed 000)
    ``<|begin_of_text|>`` [``<|start_header_id|>system<|end_header_id|>{system}<|eot_id|>``]
    [``<|start_context|>`` every earlier turn as ``<|start_header_id|>{role}<|end_header_id|>{content}<|eot_id|>``
    ``<|end_context|>``] then the last user turn and what follows, in the same header form.
    Generation prompt: ``<|start_header_id|>assistant<|end_header_id|>``. End of turn: ``<|eot_id|>``.
``user-assistant`` (seed 001)
    [``<|SYSTEM|> {system} ``] ``<|USER|> {user} <|ASSISTANT|> {reply}<|End|>`` ...
    Generation prompt ends with ``<|ASSISTANT|>``. End of turn: ``<|End|>``.
``plain`` (seed 002)
    [``{system}\\n\\n``] ``User: {user}\\nAssistant: {reply}<|endoftext|>\\nUser: ...``
    Generation prompt ends with ``Assistant:``. End of turn: ``<|endoftext|>``; stop string ``"\\nUser:"``.
``guanaco`` (seed 004)
    [``{system}\\n\\n``] ``### Human: {user}\\n### Assistant: {reply}<|endoftext|>\\n### Human: ...``
    Generation prompt ends with ``### Assistant:``. End of turn: ``<|endoftext|>``; stop string ``"### Human:"``.

**Token boundaries (prefix invariant).** For messages ``m`` ending in a user turn,
``render(m + [reply]).ids`` starts with ``render(m, add_generation_prompt=True).ids``. GPT-2's BPE merges
across the point where a prompt stops if the text on both sides can join into one pre-token (``"Assistant: "``
then ``"Hello"`` gives ``": "`` + ``"Hello"`` while the full text gives ``":"`` + ``" Hello"``; a trailing
``"\\n\\n"`` is one token alone but two before a word). So every generation prompt ends where a token
boundary always falls:

* ``llama3-context`` and ``user-assistant`` end the prompt with a control token (a hard boundary). For that
  reason ``llama3-context`` has **no** ``"\\n\\n"`` after ``<|end_header_id|>`` (LLaMA-3's own tokenizer keeps
  ``"\\n\\n"`` whole; GPT-2's does not), and ``user-assistant`` has no trailing space after ``<|ASSISTANT|>``:
  the reply is rendered as ``" " + content``, so the model writes the space itself.
* ``plain`` and ``guanaco`` end the prompt with ``":"`` and the reply is rendered as ``" " + content``: the
  space can never join the colon's pre-token, whatever the reply holds.

The chat layer therefore strips one leading space from a generated reply for the last three templates
(``ChatTemplate.reply_prefix``).

**Tokenization.** The renderer produces exactly what ``transformers`` produces for the rendered string: it
splits at the control tokens the template writes, tokenizes each text run between them as one contiguous
segment with plain GPT-2 BPE, and derives the mask from character offsets. Message content is always plain
text: a message spelling ``"<|eot_id|>"`` or ``"<|endoftext|>"`` gets the characters, never the control id.
(``transformers``' ``apply_chat_template`` parses such spellings in content as control tokens unless
``sanitize_control_tokens=True``; our Jinja export matches our renderer for ordinary text.)

**Mask.** ``assistant_mask`` is 1 exactly on the tokens of the *last* message's reply — its content (with
the leading space where the template has one) and its end-of-turn token — when the last message is an
assistant message, 0 elsewhere: earlier assistant turns are context. A conversation ending in a user turn
gives an all-zero mask. The Jinja export wraps that same span in ``{% generation %}``, so
``apply_chat_template(..., return_assistant_tokens_mask=True)`` gives the same mask.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gpt2chat.errors import Gpt2ChatError

if TYPE_CHECKING:
    from gpt2chat.tokenizer import Tokenizer

__all__ = [
    "ChatTemplate",
    "TEMPLATES",
    "DEFAULT_TEMPLATE",
    "get_template",
    "render_chat",
    "render_text",
    "validate_messages",
    "ChatFormatError",
]

EOS = "<|endoftext|>"
PAD = "<|pad|>"
ROLES = ("system", "user", "assistant")
DEFAULT_TEMPLATE = "llama3-context"


class ChatFormatError(Gpt2ChatError):
    """Messages that do not form a valid conversation (the message says which index and field)."""


# A rendered piece: (is_control_token, text, trained). Text pieces between two control tokens are joined and
# tokenized as one segment.
_Piece = tuple[bool, str, bool]


def validate_messages(messages) -> list[dict]:
    """Check OpenAI-style messages; returns them as a list. Raises ChatFormatError naming index and field."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatFormatError(f"messages: expected a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    msgs = list(messages)
    if not msgs:
        raise ChatFormatError("messages: the conversation is empty")
    has_user = False
    for i, m in enumerate(msgs):
        if not isinstance(m, Mapping):
            raise ChatFormatError(f"messages[{i}]: expected a dict with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m:
            raise ChatFormatError(f"messages[{i}].role: missing")
        role = m["role"]
        if role not in ROLES:
            raise ChatFormatError(f"messages[{i}].role: expected one of {', '.join(ROLES)}, got {role!r}")
        if "content" not in m:
            raise ChatFormatError(f"messages[{i}].content: missing")
        if not isinstance(m["content"], str):
            raise ChatFormatError(f"messages[{i}].content: expected a string, got {type(m['content']).__name__}")
        if role == "system" and i != 0:
            raise ChatFormatError(f"messages[{i}].role: a system message may only be the first message")
        has_user = has_user or role == "user"
    if not has_user:
        raise ChatFormatError("messages: the conversation has no user message")
    return msgs


def _mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose first character falls inside a trained span (spans sorted, disjoint)."""
    mask = []
    k = 0
    for start, _ in offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        mask.append(1 if k < len(spans) and spans[k][0] <= start else 0)
    return mask


def _trained_index(msgs: list[dict]) -> int:
    """Index of the message whose reply is trained: the last message when it is an assistant's, else -1."""
    return len(msgs) - 1 if msgs[-1]["role"] == "assistant" else -1


# ---------------------------------------------------------------------------------------------- layouts
def _layout_llama3(msgs: list[dict], add_generation_prompt: bool) -> list[_Piece]:
    trained = _trained_index(msgs)
    out: list[_Piece] = [(True, "<|begin_of_text|>", False)]

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


def _layout_user_assistant(msgs: list[dict], add_generation_prompt: bool) -> list[_Piece]:
    trained = _trained_index(msgs)
    out: list[_Piece] = []
    for i, m in enumerate(msgs):
        if m["role"] == "system":
            out.extend([(True, "<|SYSTEM|>", False), (False, " " + m["content"] + " ", False)])
        elif m["role"] == "user":
            out.extend([(True, "<|USER|>", False), (False, " " + m["content"] + " ", False)])
        else:
            t = i == trained
            out.extend([(True, "<|ASSISTANT|>", False), (False, " " + m["content"], t), (True, "<|End|>", t)])
    if add_generation_prompt:
        out.append((True, "<|ASSISTANT|>", False))
    return out


def _make_colon_layout(user_tag: str, assistant_tag: str) -> Callable[[list[dict], bool], list[_Piece]]:
    def layout(msgs: list[dict], add_generation_prompt: bool) -> list[_Piece]:
        trained = _trained_index(msgs)
        out: list[_Piece] = []
        prev = None
        for i, m in enumerate(msgs):
            role = m["role"]
            if role == "system":
                out.append((False, m["content"] + "\n\n", False))
            elif role == "user":
                sep = "\n" if prev == "assistant" else ""
                out.append((False, sep + user_tag + " " + m["content"] + "\n", False))
            else:
                t = i == trained
                sep = "\n" if prev == "assistant" else ""
                out.extend([(False, sep + assistant_tag, False), (False, " " + m["content"], t), (True, EOS, t)])
            prev = role
        if add_generation_prompt:
            sep = "\n" if prev == "assistant" else ""
            out.append((False, sep + assistant_tag, False))
        return out

    return layout


# ---------------------------------------------------------------------------------------------- Jinja
# transformers renders these with trim_blocks/lstrip_blocks; every tag here also strips whitespace ("-").
_JINJA_LLAMA3 = (
    "{%- set ns = namespace(start=0, last_user=-1) -%}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set ns.start = 1 -%}{%- endif -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.last_user < 0 -%}{{- raise_exception('the conversation has no user message') -}}{%- endif -%}"
    "{{- '<|begin_of_text|>' -}}"
    "{%- if ns.start == 1 -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>' + messages[0]['content'] + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- if ns.last_user > ns.start -%}"
    "{{- '<|start_context|>' -}}"
    "{%- for m in messages[ns.start:ns.last_user] -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>' + m['content'] + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{{- '<|end_context|>' -}}"
    "{%- endif -%}"
    "{%- for m in messages[ns.last_user:] -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>' -}}"
    "{%- if loop.last and m['role'] == 'assistant' -%}"
    "{%- generation -%}{{- m['content'] + '<|eot_id|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- m['content'] + '<|eot_id|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>' -}}{%- endif -%}"
)

_JINJA_USER_ASSISTANT = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{- '<|SYSTEM|> ' + m['content'] + ' ' -}}"
    "{%- elif m['role'] == 'user' -%}{{- '<|USER|> ' + m['content'] + ' ' -}}"
    "{%- else -%}{{- '<|ASSISTANT|>' -}}"
    "{%- if loop.last -%}{%- generation -%}{{- ' ' + m['content'] + '<|End|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- ' ' + m['content'] + '<|End|>' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|ASSISTANT|>' -}}{%- endif -%}"
)


def _jinja_colon(user_tag: str, assistant_tag: str) -> str:
    return (
        "{%- set ns = namespace(prev='') -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'system' -%}{{- m['content'] + '\\n\\n' -}}"
        "{%- else -%}"
        "{%- if ns.prev == 'assistant' -%}{{- '\\n' -}}{%- endif -%}"
        "{%- if m['role'] == 'user' -%}{{- '" + user_tag + " ' + m['content'] + '\\n' -}}"
        "{%- else -%}{{- '" + assistant_tag + "' -}}"
        "{%- if loop.last -%}{%- generation -%}{{- ' ' + m['content'] + '" + EOS + "' -}}{%- endgeneration -%}"
        "{%- else -%}{{- ' ' + m['content'] + '" + EOS + "' -}}{%- endif -%}"
        "{%- endif -%}"
        "{%- endif -%}"
        "{%- set ns.prev = m['role'] -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{%- if ns.prev == 'assistant' -%}{{- '\\n' -}}{%- endif -%}{{- '" + assistant_tag + "' -}}"
        "{%- endif -%}"
    )


# ---------------------------------------------------------------------------------------------- template
@dataclass(frozen=True)
class ChatTemplate:
    """One chat format: its control tokens, stop conditions, renderer and Jinja export."""

    name: str
    special_tokens: tuple[str, ...]   # control tokens this template adds to the tokenizer (besides eos / pad)
    stop_tokens: tuple[str, ...]      # generation stops on any of these tokens
    stop_strings: tuple[str, ...]     # ... or when the decoded reply contains one of these strings
    end_of_turn: str                  # the token that closes an assistant reply
    reply_prefix: str                 # text the template puts before a reply's content (strip it from output)
    jinja: str
    description: str = ""
    _layout: Callable[[list[dict], bool], list[_Piece]] = field(default=None, repr=False, compare=False)

    def ensure_tokens(self, tokenizer: Tokenizer) -> int:
        """Add this template's control tokens (and `<|pad|>`) to `tokenizer`; returns how many were new."""
        return tokenizer.add_special_tokens([PAD, *self.special_tokens])

    def stop_token_ids(self, tokenizer: Tokenizer) -> list[int]:
        ids = []
        for t in self.stop_tokens:
            i = tokenizer.token_to_id(t)
            if i is not None and i not in ids:
                ids.append(i)
        return ids

    def render_text(self, messages, add_generation_prompt: bool = False) -> str:
        """The rendered conversation as a string (what the Jinja export produces)."""
        msgs = validate_messages(messages)
        return "".join(text for _, text, _ in self._layout(msgs, add_generation_prompt))

    def render(self, tokenizer: Tokenizer, messages, add_generation_prompt: bool = False
               ) -> tuple[list[int], list[int]]:
        """Messages -> (ids, assistant_mask). See the module docstring for the rules."""
        msgs = validate_messages(messages)
        pieces = self._layout(msgs, add_generation_prompt)
        ids: list[int] = []
        mask: list[int] = []
        seg: list[tuple[str, bool]] = []
        special_ids = tokenizer.special_token_ids  # a set built from the vocabulary: once per render

        def flush() -> None:
            if not seg:
                return
            text = "".join(t for t, _ in seg)
            if text:
                spans = []
                pos = 0
                for t, trained in seg:
                    if trained:
                        spans.append((pos, pos + len(t)))
                    pos += len(t)
                if not spans:  # nothing trained here: no offsets needed (the fast plain encoder)
                    seg_ids = tokenizer.encode(text)
                    ids.extend(seg_ids)
                    mask.extend([0] * len(seg_ids))
                else:
                    seg_ids, offsets = tokenizer.encode_with_offsets(text)
                    ids.extend(seg_ids)
                    mask.extend(_mask_from_spans(offsets, spans))
            seg.clear()

        for is_control, text, trained in pieces:
            if is_control:
                flush()
                tid = tokenizer.token_to_id(text)
                if tid is None or tid not in special_ids:
                    raise ChatFormatError(
                        f"template {self.name!r}: the tokenizer has no special token {text!r}; "
                        f"call get_template({self.name!r}).ensure_tokens(tokenizer) first "
                        "(and resize the model's embeddings)"
                    )
                ids.append(tid)
                mask.append(1 if trained else 0)
            else:
                seg.append((text, trained))
        flush()
        return ids, mask


def _llama3() -> ChatTemplate:
    return ChatTemplate(
        name="llama3-context",
        special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                        "<|start_context|>", "<|end_context|>"),
        stop_tokens=("<|eot_id|>", EOS),
        stop_strings=(),
        end_of_turn="<|eot_id|>",
        reply_prefix="",
        jinja=_JINJA_LLAMA3,
        description="LLaMA-3 headers; earlier turns wrapped in <|start_context|> ... <|end_context|> (seed 000)",
        _layout=_layout_llama3,
    )


TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        _llama3(),
        ChatTemplate(
            name="user-assistant",
            special_tokens=("<|USER|>", "<|ASSISTANT|>", "<|SYSTEM|>", "<|End|>"),
            stop_tokens=("<|End|>", EOS),
            stop_strings=(),
            end_of_turn="<|End|>",
            reply_prefix=" ",
            jinja=_JINJA_USER_ASSISTANT,
            description="<|USER|> ... <|ASSISTANT|> ... <|End|> (seed 001)",
            _layout=_layout_user_assistant,
        ),
        ChatTemplate(
            name="plain",
            special_tokens=(),
            stop_tokens=(EOS,),
            stop_strings=("\nUser:",),
            end_of_turn=EOS,
            reply_prefix=" ",
            jinja=_jinja_colon("User:", "Assistant:"),
            description="User: ...\\nAssistant: ... (seed 002)",
            _layout=_make_colon_layout("User:", "Assistant:"),
        ),
        ChatTemplate(
            name="guanaco",
            special_tokens=(),
            stop_tokens=(EOS,),
            stop_strings=("### Human:",),
            end_of_turn=EOS,
            reply_prefix=" ",
            jinja=_jinja_colon("### Human:", "### Assistant:"),
            description="### Human: ... ### Assistant: ... (seed 004)",
            _layout=_make_colon_layout("### Human:", "### Assistant:"),
        ),
    )
}


def get_template(name: str | ChatTemplate) -> ChatTemplate:
    """A template by name (a ChatTemplate passes through). Unknown name -> ChatFormatError listing the known ones."""
    if isinstance(name, ChatTemplate):
        return name
    try:
        return TEMPLATES[name]
    except (KeyError, TypeError):
        raise ChatFormatError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}") from None


def render_chat(tokenizer: Tokenizer, messages, template: str | ChatTemplate = DEFAULT_TEMPLATE,
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Render OpenAI-style messages to (ids, assistant_mask) with the named template."""
    return get_template(template).render(tokenizer, messages, add_generation_prompt)


def render_text(messages, template: str | ChatTemplate = DEFAULT_TEMPLATE,
                add_generation_prompt: bool = False) -> str:
    """Render messages to the template's text (for inspection; `render_chat` gives the ids)."""
    return get_template(template).render_text(messages, add_generation_prompt)
