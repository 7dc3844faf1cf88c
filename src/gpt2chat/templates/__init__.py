"""Chat templates: messages -> (token ids, assistant mask), and the same layout as a Jinja `chat_template`.

A package of three modules, one idea each: ``messages`` (validation, and the one rule for the system part,
``tools`` and tool calls, in Python and Jinja), ``layouts`` (the four layouts, each beside its Jinja twin)
and this module (``ChatTemplate``: pieces -> token ids and mask; the registry).

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

**System messages, tools, tool calls** (``messages.flatten``). Leading system messages are merged into one
system part (joined by ``"\\n\\n"``); ``tools`` become its last paragraph (``tool_calls.render_tools``), or the
whole system part when there is no system message. A system message later in the conversation is rendered in
place (a ``system`` header turn, ``<|SYSTEM|>``, or a ``System:`` / ``### System:`` line). An assistant's
``tool_calls`` are written after its content as ``<tool_call>{...}</tool_call>`` blocks
(``tool_calls.render_assistant``); a ``role: "tool"`` message is its own turn (``tool`` header,
``<|USER|> Tool: ...``, or a ``Tool:`` / ``### Tool:`` line). The table is in ``layouts``.

**Token boundaries (prefix invariant).** For messages ``m`` ending in a user (or tool) turn,
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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gpt2chat.templates.layouts import (
    EOS,
    JINJA_LLAMA3,
    JINJA_USER_ASSISTANT,
    Piece,
    colon_layout,
    jinja_colon,
    layout_llama3,
    layout_user_assistant,
)
from gpt2chat.templates.messages import ROLES, ChatFormatError, flatten, validate_messages

if TYPE_CHECKING:
    from gpt2chat.tokenizer import Tokenizer

__all__ = [
    "ChatTemplate",
    "TEMPLATES",
    "DEFAULT_TEMPLATE",
    "ROLES",
    "get_template",
    "render_chat",
    "render_text",
    "validate_messages",
    "flatten",
    "ChatFormatError",
]

PAD = "<|pad|>"
DEFAULT_TEMPLATE = "llama3-context"


def _mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose first character falls inside a trained span (spans sorted, disjoint)."""
    mask = []
    k = 0
    for start, _ in offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        mask.append(1 if k < len(spans) and spans[k][0] <= start else 0)
    return mask



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
    _layout: Callable[[list[dict], bool], list[Piece]] = field(default=None, repr=False, compare=False)

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

    def render_text(self, messages, add_generation_prompt: bool = False, tools=None) -> str:
        """The rendered conversation as a string (what the Jinja export produces)."""
        msgs = flatten(messages, tools)
        return "".join(text for _, text, _ in self._layout(msgs, add_generation_prompt))

    def render(self, tokenizer: Tokenizer, messages, add_generation_prompt: bool = False, tools=None
               ) -> tuple[list[int], list[int]]:
        """Messages (and `tools`) -> (ids, assistant_mask). See the module docstring for the rules."""
        msgs = flatten(messages, tools)
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
        jinja=JINJA_LLAMA3,
        description="LLaMA-3 headers; earlier turns wrapped in <|start_context|> ... <|end_context|> (seed 000)",
        _layout=layout_llama3,
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
            jinja=JINJA_USER_ASSISTANT,
            description="<|USER|> ... <|ASSISTANT|> ... <|End|> (seed 001)",
            _layout=layout_user_assistant,
        ),
        ChatTemplate(
            name="plain",
            special_tokens=(),
            stop_tokens=(EOS,),
            stop_strings=("\nUser:",),
            end_of_turn=EOS,
            reply_prefix=" ",
            jinja=jinja_colon("User:", "Assistant:", "System:", "Tool:"),
            description="User: ...\\nAssistant: ... (seed 002)",
            _layout=colon_layout("User:", "Assistant:", "System:", "Tool:"),
        ),
        ChatTemplate(
            name="guanaco",
            special_tokens=(),
            stop_tokens=(EOS,),
            stop_strings=("### Human:",),
            end_of_turn=EOS,
            reply_prefix=" ",
            jinja=jinja_colon("### Human:", "### Assistant:", "### System:", "### Tool:"),
            description="### Human: ... ### Assistant: ... (seed 004)",
            _layout=colon_layout("### Human:", "### Assistant:", "### System:", "### Tool:"),
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
                add_generation_prompt: bool = False, tools=None) -> tuple[list[int], list[int]]:
    """Render OpenAI-style messages (and `tools`) to (ids, assistant_mask) with the named template."""
    return get_template(template).render(tokenizer, messages, add_generation_prompt, tools)


def render_text(messages, template: str | ChatTemplate = DEFAULT_TEMPLATE,
                add_generation_prompt: bool = False, tools=None) -> str:
    """Render messages to the template's text (for inspection; `render_chat` gives the ids)."""
    return get_template(template).render_text(messages, add_generation_prompt, tools)
