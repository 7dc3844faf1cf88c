"""The one text pipeline every front end uses: a conversation or a raw prompt in, the text a user sees out.

`TextPipeline` holds what a model's replies are built from: the tokenizer, the chat template (None for raw
continuations), the context length and the stop ids. It assembles each stage once:

    messages -> template -> fit (`fit`)  |  raw text or ids -> checked ids (`encode`)
             -> sampling params with the stop ids, the budget capped by the room left (`params`)
             -> the engine's token ids (`engine.submit`, the same for `Engine` and `BatchedEngine`)
             -> a `ReplyStream` (`reply`): token ids in, text out

`ReplyStream` is the one per-token loop: it records the token ids delivered and where each starts in the
decoded text (logprobs' `text_offset`), ends at a stop string (the template's and the caller's) or at a
stop id the engine was not told about (scored completions report their stop token), and says why the
reply ended. `pieces` (a blocking iterable of ids) and `apieces` (an async one, ids or lists of ids) only
drive it. The terminal chat, the HTTP server, the Telegram bot (through the server's service), the report
card's replies and `gpt2chat generate` all go through here.

It knows tokenizers, templates and the engine's call; nothing about HTTP, terminals or tensors.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable, Iterator, Sequence
from typing import Any

from gpt2chat.context_fit import FittedPrompt, fit_messages, prompt_too_long, reply_reserve
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.reply_text import ReplyDecoder, chat_template, stop_token_ids
from gpt2chat.sampling import SamplingParams
from gpt2chat.templates import ChatTemplate
from gpt2chat.tokenizer import Tokenizer

__all__ = ["TextPipeline", "ReplyStream", "BadPromptError"]


class BadPromptError(Gpt2ChatError):
    """A raw prompt the model cannot read (a token id outside its vocabulary)."""

    status_code = 400
    param = "prompt"
    code = None


class ReplyStream:
    """One reply: feed it the engine's token ids (`push`), show what it returns, `finish()` at the end.

    `token_ids` are the ids delivered (a stop id the engine was not told about is kept, as the last one);
    `text_offsets[i]` is where token i starts in the raw decoded continuation; `done` is True once a stop
    string or such a stop id ended the reply (later ids are ignored); `text` is everything shown."""

    def __init__(self, decoder: ReplyDecoder, text_stop_ids: frozenset[int] = frozenset()):
        self.decoder = decoder
        self._text_stop_ids = text_stop_ids
        self.token_ids: list[int] = []
        self.text_offsets: list[int] = []
        self.stop_token = False

    @property
    def done(self) -> bool:
        return self.decoder.stopped or self.stop_token

    @property
    def text(self) -> str:
        return self.decoder.text

    def push(self, token_ids: Iterable[int]) -> str:
        """The text the next token ids add (held-back text is shown once it cannot start a stop string)."""
        out = ""
        decoder = self.decoder
        for token_id in token_ids:
            if self.done:
                break
            self.text_offsets.append(decoder.decoded_chars)
            self.token_ids.append(token_id)
            if token_id in self._text_stop_ids:
                self.stop_token = True
                break
            out += decoder.push(token_id)
        return out

    def finish(self) -> str:
        """What is still held back once the engine has ended (nothing after a stop string)."""
        return self.decoder.finish()

    def finish_reason(self, engine_reason: str | None) -> str:
        """"stop" when a stop string, a stop id or the engine's stop token ended it, else "length"."""
        return "stop" if self.done or engine_reason == "stop" else "length"

    # ---- the two drivers: a blocking and an async source of token ids ---------------------------
    def pieces(self, tokens: Iterable[int]) -> Iterator[str]:
        """The text pieces for a blocking stream of ids, ending early at a stop; then `finish()`'s tail."""
        for token_id in tokens:
            piece = self.push((token_id,))
            if piece:
                yield piece
            if self.done:
                return
        tail = self.finish()
        if tail:
            yield tail

    async def apieces(self, tokens: AsyncIterable[int | Sequence[int]]):
        """The same for an async stream of ids or of lists of ids (one engine step's worth)."""
        async for item in tokens:
            piece = self.push((item,) if isinstance(item, int) else item)
            if piece:
                yield piece
            if self.done:
                return
        tail = self.finish()
        if tail:
            yield tail


class TextPipeline:
    """Prompts, sampling parameters and reply decoders for one model (see the module docstring).

    `template` is a `ChatTemplate` for chat (use `for_chat` to resolve a name) or None for raw
    continuations; the stop ids are the template's (the checkpoint's when None) and end-of-text."""

    def __init__(self, tokenizer: Tokenizer, context: int, template: ChatTemplate | None = None,
                 vocab_size: int | None = None):
        self.tokenizer = tokenizer
        self.context = int(context)
        self.template = template
        self.vocab_size = min(len(tokenizer), vocab_size or len(tokenizer))
        self.stop_ids: tuple[int, ...] = stop_token_ids(tokenizer, template)

    @classmethod
    def for_chat(cls, tokenizer: Tokenizer, context: int, template: str | ChatTemplate | None = None,
                 vocab_size: int | None = None) -> TextPipeline:
        """A chat pipeline: the template named, else the checkpoint's, else llama3-context (checked
        against the tokenizer's control tokens)."""
        return cls(tokenizer, context, chat_template(tokenizer, template), vocab_size)

    @classmethod
    def for_model(cls, model: Any, tokenizer: Tokenizer, template: str | ChatTemplate | None = None,
                  chat: bool = True) -> TextPipeline:
        """The pipeline of a model: its context and vocabulary."""
        config = model.config
        context, vocab = int(config.n_positions), int(getattr(config, "vocab_size", len(tokenizer)))
        if chat:
            return cls.for_chat(tokenizer, context, template, vocab)
        return cls(tokenizer, context, None, vocab)

    # ---- prompts -----------------------------------------------------------------------------------
    def fit(self, messages: Sequence[dict], max_new_tokens: int, *, truncate: bool = True, hint: str = "",
            reserve: int | None = None) -> FittedPrompt:
        """Messages -> the prompt ending with the assistant header; the oldest turns go first when it does
        not fit with room for the reply (`reserve`, default `reply_reserve` of `max_new_tokens`)."""
        if self.template is None:
            raise Gpt2ChatError("this pipeline continues raw text: it has no chat template to render messages")
        if reserve is None:
            reserve = reply_reserve(self.context, max_new_tokens)
        reserve = max(1, min(reserve, self.context - 1))
        return fit_messages(self.tokenizer, self.template, messages, context=self.context, reserve=reserve,
                            truncate=truncate, hint=hint)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """A raw continuation's prompt (text or token ids, no template) -> ids checked against the
        vocabulary and the context. An empty prompt starts from end-of-text, as OpenAI's models do."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise BadPromptError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
            ids = list(prompt)
        if not ids:
            ids = [self.tokenizer.eos_token_id]
        if len(ids) >= self.context:
            error = prompt_too_long(len(ids), self.context, "it")
            error.param = "prompt"
            raise error
        return ids

    # ---- sampling ----------------------------------------------------------------------------------
    def params(self, base: SamplingParams, prompt_tokens: int, *, stop: bool = True) -> SamplingParams:
        """`base` with this pipeline's stop ids added (unless `stop` is False: no stop id at all) and its
        budget capped by the room the prompt leaves in the context."""
        stops = tuple(dict.fromkeys([*base.stop_token_ids, *self.stop_ids])) if stop else ()
        room = max(1, self.context - prompt_tokens)
        return base.replace(stop_token_ids=stops, max_new_tokens=min(base.max_new_tokens, room))

    # ---- replies -----------------------------------------------------------------------------------
    def reply(self, *, chat: bool = True, stop_strings: Iterable[str] = (),
              text_stop_ids: Iterable[int] = (), show_control_tokens: bool = False) -> ReplyStream:
        """A `ReplyStream` for one reply. A `chat` reply loses the template's reply prefix and ends at its
        stop strings too; a raw one is the continuation as decoded. `text_stop_ids` end the reply in the
        stream rather than in the engine (the id is kept in `token_ids`); `show_control_tokens` spells
        control tokens out, as `tokenizer.decode` does."""
        strings = [*stop_strings]
        prefix = ""
        if chat and self.template is not None:
            strings += self.template.stop_strings
            prefix = self.template.reply_prefix
        decoder = ReplyDecoder(self.tokenizer, strings, prefix, skip_special_tokens=not show_control_tokens)
        return ReplyStream(decoder, frozenset(text_stop_ids))

    def decode(self, token_ids: Iterable[int], *, chat: bool = True) -> tuple[str, bool]:
        """A whole reply's text (what streaming would have shown) and whether a stop ended it."""
        stream = self.reply(chat=chat)
        text = "".join(stream.pieces(token_ids))
        return text, stream.done
