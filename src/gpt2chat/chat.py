"""A multi-turn chat on top of the engine: text in, streamed text out, history carried as context.

`ChatSession` renders the system message + history + the new user message through a chat template (with
the generation prompt), streams the reply's tokens from the engine, decodes them UTF-8-safely, and stops
on the template's stop tokens or stop strings (a stop string is never shown). When a prompt would not
leave room for a reply in the model's context, the oldest turns are dropped first.

This module knows text and templates; it knows nothing about terminals, HTTP or how tokens are computed.
"""

from __future__ import annotations

from collections.abc import Iterator

from gpt2chat.errors import Gpt2ChatError
from gpt2chat.sampling import SAMPLING_PRESETS, SamplingParams
from gpt2chat.templates import ChatTemplate, get_template
from gpt2chat.tokenizer import IncrementalDecoder, Tokenizer

__all__ = ["ChatSession", "DEFAULT_CHAT_PARAMS"]

DEFAULT_CHAT_PARAMS = SAMPLING_PRESETS["chat"]


class ChatSession:
    """One conversation with a model. `engine` is an `Engine` (`.stream`) or a `BatchedEngine` (`.submit`).

    `params` default to seed 004's sampling preset; the template's stop tokens are always added to them.
    `reply_reserve` tokens of the context are kept free for the reply when old turns must be trimmed
    (default: a quarter of the context, at most `max_new_tokens`).
    """

    def __init__(
        self,
        engine,
        tokenizer: Tokenizer,
        template: str | ChatTemplate | None = None,
        system: str | None = None,
        params: SamplingParams | None = None,
        reply_reserve: int | None = None,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.template = get_template(template or tokenizer.template_name or "llama3-context")
        missing = [t for t in self.template.special_tokens if tokenizer.token_to_id(t) is None]
        if missing:
            raise Gpt2ChatError(
                f"the tokenizer lacks the control tokens of template {self.template.name!r}: {missing}; "
                "use the template the checkpoint was saved with"
            )
        params = params or DEFAULT_CHAT_PARAMS
        stops = tuple(dict.fromkeys([*params.stop_token_ids, *self.template.stop_token_ids(tokenizer)]))
        self.params = params.replace(stop_token_ids=stops)
        self.context = engine.config.n_positions
        if reply_reserve is None:
            reply_reserve = min(self.params.max_new_tokens, self.context // 4)
        self.reply_reserve = max(1, min(reply_reserve, self.context - 1))
        self.system = system or None
        self._history: list[dict] = []
        self.trimmed_turns = 0  # user/assistant pairs dropped so far to fit the context
        self.last_finish_reason: str | None = None

    # ------------------------------------------------------------------ state
    @property
    def history(self) -> list[dict]:
        """The user / assistant messages so far (a copy; the system message is `.system`)."""
        return [dict(m) for m in self._history]

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self._history.clear()
        self.trimmed_turns = 0

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def messages(self, user_text: str | None = None) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        user = [{"role": "user", "content": user_text}] if user_text is not None else []
        return system + self._history + user

    # ------------------------------------------------------------------ one turn
    def prompt_ids(self, text: str) -> list[int]:
        """The prompt for `text` as the next user message, dropping the oldest turns until it fits."""
        budget = self.context - self.reply_reserve
        while True:
            ids, _ = self.template.render(self.tokenizer, self.messages(text), add_generation_prompt=True)
            if len(ids) <= budget or not self._history:
                break
            del self._history[:2]  # the oldest user message and its reply
            self.trimmed_turns += 1
        if len(ids) >= self.context:
            raise Gpt2ChatError(
                f"the message is too long: the prompt is {len(ids)} tokens but the model's context is "
                f"{self.context} tokens"
            )
        return ids

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to `text` as pieces of text; history is updated when the stream ends.

        The prompt is built (and checked) at once, so a message too long for the context raises here.
        """
        if not isinstance(text, str):
            raise Gpt2ChatError(f"a chat message must be text, got {type(text).__name__}")
        prompt = self.prompt_ids(text)
        if hasattr(self.engine, "stream"):
            tokens = self.engine.stream(prompt, self.params)
        else:
            tokens = self.engine.submit(prompt, self.params)
        return self._reply(text, tokens)

    def _reply(self, text: str, tokens) -> Iterator[str]:
        decoder = IncrementalDecoder(self.tokenizer, skip_special_tokens=True)
        stop_strings = [s for s in self.template.stop_strings if s]
        reply = ""  # decoded so far, leading whitespace removed
        shown = 0  # characters of `reply` already yielded
        started = False
        stopped_by_string = False
        token_iter = iter(tokens)
        try:
            for token in token_iter:
                piece = decoder.push(token)
                if not piece:
                    continue
                reply += piece
                if not started:  # leading whitespace (the template's reply prefix among it) is not shown
                    if not reply.strip():
                        continue
                    reply, started = reply.lstrip(), True
                cut = _find_stop(reply, stop_strings, max(0, shown - _longest(stop_strings)))
                if cut is not None:
                    reply = reply[:cut]
                    stopped_by_string = True
                    if cut > shown:
                        yield reply[shown:cut]
                    shown = len(reply)
                    break
                safe = len(reply) - _held_back(reply, stop_strings)
                if safe > shown:
                    yield reply[shown:safe]
                    shown = safe
            else:
                reply += decoder.flush()
                if not started:
                    reply = reply.lstrip()
                cut = _find_stop(reply, stop_strings, 0)
                if cut is not None:
                    reply, stopped_by_string = reply[:cut], True
                if len(reply) > shown:
                    yield reply[shown:]
                    shown = len(reply)
        finally:
            self._close(token_iter, tokens)
            reason = getattr(tokens, "finish_reason", None)
            self.last_finish_reason = "stop" if stopped_by_string else reason
            self._history.append({"role": "user", "content": text})
            self._history.append({"role": "assistant", "content": reply[:shown].strip()})

    @staticmethod
    def _close(token_iter, tokens) -> None:
        """Stop the engine working on a reply nobody reads any more."""
        if getattr(tokens, "finish_reason", None) is not None:
            return
        for obj in (tokens, token_iter):
            for name in ("cancel", "close"):
                method = getattr(obj, name, None)
                if method is not None:
                    method()
                    return


def _longest(stop_strings: list[str]) -> int:
    return max((len(s) for s in stop_strings), default=0)


def _find_stop(text: str, stop_strings: list[str], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stop_strings) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stop_strings: list[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    best = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
