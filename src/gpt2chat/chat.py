"""A multi-turn chat on top of the engine: text in, streamed text out, history carried as context.

`ChatSession` keeps the system message and the history and runs each turn through the one text pipeline
(`gpt2chat.pipeline.TextPipeline`): the prompt is fitted to the context (the oldest turns go first, and
`last_dropped_turns` says how many went, so a front end can tell the user), the template's stop ids are
added to the sampling parameters, and the reply's tokens are shown through a `ReplyStream` (UTF-8 safe,
reply prefix removed, stop strings cut and never shown).

This module knows conversations; it knows nothing about terminals, HTTP or how tokens are computed.
"""

from __future__ import annotations

from collections.abc import Iterator

from gpt2chat.context_fit import reply_reserve as default_reply_reserve
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.pipeline import TextPipeline
from gpt2chat.sampling import SAMPLING_PRESETS, SamplingParams
from gpt2chat.templates import ChatTemplate
from gpt2chat.tokenizer import Tokenizer

__all__ = ["ChatSession", "DEFAULT_CHAT_PARAMS"]

DEFAULT_CHAT_PARAMS = SAMPLING_PRESETS["chat"]


class ChatSession:
    """One conversation with a model. `engine` is an `Engine` or a `BatchedEngine`.

    `params` default to seed 004's sampling preset; the template's stop tokens are always added to them.
    `reply_reserve` tokens of the context are kept free for the reply when old turns must be dropped
    (default `gpt2chat.context_fit.reply_reserve`: the reply's budget, at most a quarter of the context).
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
        self.pipeline = TextPipeline.for_chat(tokenizer, engine.config.n_positions, template)
        self.template = self.pipeline.template
        self.context = self.pipeline.context
        params = params or DEFAULT_CHAT_PARAMS
        self.params = params.replace(stop_token_ids=self.pipeline.params(params, 0).stop_token_ids)
        if reply_reserve is None:
            reply_reserve = default_reply_reserve(self.context, self.params.max_new_tokens)
        self.reply_reserve = max(1, min(reply_reserve, self.context - 1))
        self.system = system or None
        self._history: list[dict] = []
        self.trimmed_turns = 0  # turns dropped so far to fit the context
        self.last_dropped_turns = 0  # turns the last prompt dropped (0: the whole history fitted)
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
        self.last_dropped_turns = 0

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def messages(self, user_text: str | None = None) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        user = [{"role": "user", "content": user_text}] if user_text is not None else []
        return system + self._history + user

    # ------------------------------------------------------------------ one turn
    def prompt_ids(self, text: str) -> list[int]:
        """The prompt for `text` as the next user message; the oldest turns are dropped (from the history
        too) until it fits. Nothing changes when even the message alone is too long."""
        fitted = self.pipeline.fit(self.messages(text), self.params.max_new_tokens, reserve=self.reply_reserve)
        self.last_dropped_turns = fitted.dropped_turns
        if fitted.dropped_turns:
            self._history = [m for m in fitted.messages[:-1] if m["role"] != "system"]
            self.trimmed_turns += fitted.dropped_turns
        return fitted.ids

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to `text` as pieces of text; history is updated when the stream ends.

        The prompt is built (and checked) at once, so a message too long for the context raises here.
        """
        if not isinstance(text, str):
            raise Gpt2ChatError(f"a chat message must be text, got {type(text).__name__}")
        prompt = self.prompt_ids(text)
        tokens = self.engine.submit(prompt, self.pipeline.params(self.params, len(prompt)))
        return self._reply(text, tokens)

    def _reply(self, text: str, tokens) -> Iterator[str]:
        reply = self.pipeline.reply()
        try:
            yield from reply.pieces(tokens)
        finally:
            if tokens.finish_reason is None:
                tokens.cancel()  # stop the engine working on a reply nobody reads any more
            self.last_finish_reason = "stop" if reply.done else tokens.finish_reason
            self._history.append({"role": "user", "content": text})
            self._history.append({"role": "assistant", "content": reply.text.strip()})
