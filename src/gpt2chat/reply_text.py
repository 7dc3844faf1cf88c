"""The text side of generation, shared by every front end: prompts that fit, stop ids, replies as text.

One copy of each rule, used by `ChatSession`, the HTTP server, the Telegram bot, the report card's replies
and `gpt2chat generate` (fitting the conversation into the context is `gpt2chat.context_fit`'s, shared with
training):

* `stop_token_ids(tokenizer, template)`: the ids that end a reply (the template's end-of-turn tokens,
  end-of-text among them); without a template, end-of-text alone.
* `ReplyDecoder`: the token ids of one reply in, the text to show out: UTF-8-safe incremental decoding
  (a character split over tokens is held back until whole), the template's reply prefix removed, and stop
  strings cut with hold-back (text that could still become a stop string is not shown until it cannot).
* `token_text(tokenizer, id)`: how one token is spelled where a client sees single tokens (logprobs).

`gpt2chat.pipeline` assembles these into the one pipeline the front ends use (and its `ReplyStream`, the
one per-token loop around a `ReplyDecoder`).

It knows tokenizers and templates; it knows nothing about how tokens are computed, HTTP or terminals.
"""

from __future__ import annotations

from collections.abc import Iterable

from gpt2chat.errors import Gpt2ChatError
from gpt2chat.templates import ChatTemplate, get_template
from gpt2chat.tokenizer import IncrementalDecoder, Tokenizer

__all__ = [
    "ReplyDecoder",
    "StopStrings",
    "chat_template",
    "stop_token_ids",
    "token_text",
]


def chat_template(tokenizer: Tokenizer, template: str | ChatTemplate | None = None) -> ChatTemplate:
    """The template to chat with: the one named, else the checkpoint's, else llama3-context.

    Raises when the tokenizer lacks the template's control tokens (the checkpoint was saved with another
    template, or none), which would otherwise fail on the first message."""
    chosen = get_template(template or tokenizer.template_name or "llama3-context")
    missing = [t for t in chosen.special_tokens if tokenizer.token_to_id(t) is None]
    if missing:
        raise Gpt2ChatError(
            f"the tokenizer lacks the control tokens of chat template {chosen.name!r}: {missing}; "
            "use the template the checkpoint was saved with"
        )
    return chosen


def stop_token_ids(tokenizer: Tokenizer, template: str | ChatTemplate | None = None) -> tuple[int, ...]:
    """Ids that end a reply: the template's stop tokens (the checkpoint's template when None) and
    end-of-text. They are the `eos_token_id` list a saved checkpoint's generation_config.json holds."""
    name = template or tokenizer.template_name
    ids = [tokenizer.eos_token_id]
    if name:
        ids += get_template(name).stop_token_ids(tokenizer)
    return tuple(dict.fromkeys(int(i) for i in ids))


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """One token's text; a token that is not whole UTF-8 (part of a character) is spelled as its bytes,
    `bytes:\\xe2\\x80`, so that distinct tokens never share a spelling (OpenAI's convention)."""
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class StopStrings:
    """Cuts streamed text at the first stop string, holding back any tail that could still start one."""

    def __init__(self, stop_strings: Iterable[str]):
        self.stop_strings = tuple(dict.fromkeys(s for s in stop_strings if s))
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to show now, whether a stop string was hit); after a hit the rest is dropped."""
        self._pending += text
        if not self.stop_strings:
            out, self._pending = self._pending, ""
            return out, False
        hits = [i for i in (self._pending.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
            return out, True
        keep = 0
        for stop in self.stop_strings:
            for length in range(min(len(stop) - 1, len(self._pending)), keep, -1):
                if self._pending.endswith(stop[:length]):
                    keep = length
                    break
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


class ReplyDecoder:
    """Token ids of one reply in (`push`), the text to show out; `finish()` at the end of the stream.

    `text` is everything shown so far; `stopped` is True once a stop string ended the reply (later pushes
    are ignored). `decoded_chars` counts the characters decoded before the prefix and stop strings are
    applied: the offset of the next token in the raw continuation (logprobs' `text_offset`).
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: Iterable[str] = (), reply_prefix: str = "",
                 skip_special_tokens: bool = True):
        self._decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
        self._stops = StopStrings(stop_strings)
        self._prefix = reply_prefix
        self._head = ""  # decoded text that may still turn out to be the reply prefix
        self.text = ""
        self.stopped = False
        self.decoded_chars = 0

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        decoded = self._decoder.push(token_id)
        self.decoded_chars += len(decoded)
        return self._show(self._without_prefix(decoded))

    def finish(self) -> str:
        """What is still held back once the stream has ended (a partial stop string is shown)."""
        if self.stopped:
            return ""
        decoded = self._decoder.flush()
        self.decoded_chars += len(decoded)
        text = self._head + decoded if self._prefix else decoded
        if self._prefix and text.startswith(self._prefix):
            text = text[len(self._prefix):]
        self._head = self._prefix = ""
        out = self._show(text)
        if not self.stopped:
            tail = self._stops.flush()
            self.text += tail
            out += tail
        return out

    def _without_prefix(self, text: str) -> str:
        if not self._prefix:
            return text
        self._head += text
        if len(self._head) < len(self._prefix) and self._prefix.startswith(self._head):
            return ""  # could still be the prefix: wait for more
        head, prefix = self._head, self._prefix
        self._head = self._prefix = ""
        return head[len(prefix):] if head.startswith(prefix) else head

    def _show(self, text: str) -> str:
        out, self.stopped = self._stops.push(text)
        self.text += out
        return out
