"""The bridge between the HTTP front ends and the engine: text in, streamed text out.

`ChatService` renders OpenAI-style messages through the chat template, enforces the limits (context
length, max tokens per request, how many requests may wait), submits token ids to the `BatchedEngine`
(continuous batching: concurrent requests share decode steps) and turns the token stream back into text,
stopping at the template's end-of-turn tokens and at the client's stop strings.

It knows nothing about HTTP, JSON or Telegram: errors are `Gpt2ChatError` subclasses the front ends map
to status codes, and everything it returns is plain Python.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from gpt2chat.errors import Gpt2ChatError

log = logging.getLogger("gpt2chat.serve")

SEED_MODULUS = 2**63  # torch generators take seeds in [0, 2**64); OpenAI clients may send any integer


class ServiceError(Gpt2ChatError):
    """A request the service cannot take as it is (HTTP 400 unless a subclass says otherwise)."""

    status_code = 400
    param: str | None = None
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code


class PromptTooLongError(ServiceError):
    code = "context_length_exceeded"


class TooManyTokensError(ServiceError):
    pass


class ServerBusyError(ServiceError):
    """The queue is full: the client should retry later (HTTP 429)."""

    status_code = 429


@dataclass(frozen=True)
class GenerationSettings:
    """What one request asks for, already checked against the limits."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None


class StopStringMatcher:
    """Cuts streamed text at the first stop string, holding back any tail that could start one."""

    def __init__(self, stop_strings: Sequence[str]):
        self.stop_strings = tuple(s for s in stop_strings if s)
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was hit)."""
        self._pending += text
        if not self.stop_strings:
            out, self._pending = self._pending, ""
            return out, False
        hits = [i for i in (self._pending.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            out = self._pending[: min(hits)]
            self._pending = ""
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


class Generation:
    """One running request: iterate (async) for text pieces; then read finish_reason and token counts."""

    def __init__(self, service: ChatService, engine_request: Any, prompt_tokens: int,
                 stop_token_ids: frozenset[int], stop_strings: Sequence[str], reply_prefix: str = ""):
        from gpt2chat.tokenizer import IncrementalDecoder

        self._service = service
        self._request = engine_request
        self._decoder = IncrementalDecoder(service.tokenizer, skip_special_tokens=True)
        self._stop_token_ids = stop_token_ids
        self._matcher = StopStringMatcher(stop_strings)
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._released = False
        self._reply_prefix = reply_prefix  # e.g. the space after "Assistant:": not part of the reply
        self._head = ""

    def _strip_reply_prefix(self, text: str) -> str:
        if not self._reply_prefix:
            return text
        self._head += text
        if len(self._head) < len(self._reply_prefix) and self._reply_prefix.startswith(self._head):
            return ""  # could still be the prefix: wait for more
        head, prefix = self._head, self._reply_prefix
        self._head = self._reply_prefix = ""
        return head[len(prefix):] if head.startswith(prefix) else head

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for token_id in self._request:
                self.completion_tokens += 1
                if token_id in self._stop_token_ids:
                    self.finish_reason = "stop"
                    break
                text, stopped = self._matcher.push(self._strip_reply_prefix(self._decoder.push(token_id)))
                if text:
                    yield text
                if stopped:
                    self.finish_reason = "stop"
                    break
            if self.finish_reason is None:
                reason = getattr(self._request, "finish_reason", None)
                self.finish_reason = reason if reason in ("stop", "length") else "length"
                flush = getattr(self._decoder, "flush", None)
                text, stopped = self._matcher.push(self._strip_reply_prefix(flush() if flush else ""))
                tail = text if stopped else text + self._matcher.flush()
                if stopped:
                    self.finish_reason = "stop"
                if tail:
                    yield tail
        finally:
            self.cancel()

    async def text(self) -> str:
        return "".join([piece async for piece in self])

    def cancel(self) -> None:
        """Frees the engine slot now (idempotent); called on completion, stop string or disconnect."""
        if self._released:
            return
        self._released = True
        if getattr(self._request, "finish_reason", None) is None:
            self._request.cancel()
        self._service._release(1)


class ChatService:
    """Owns the engine and the tokenizer; turns requests into `Generation`s."""

    def __init__(self, model: Any, tokenizer: Any, *, template: Any = None, model_name: str = "gpt2chat",
                 max_batch_size: int = 16, max_queue: int = 64, max_tokens_limit: int = 1024,
                 engine: Any = None, device: Any = None):
        self.model = model
        self.tokenizer = tokenizer
        if template is None or isinstance(template, str):
            from gpt2chat.templates import get_template

            template = get_template(template or getattr(tokenizer, "template_name", None) or "llama3-context")
        self.template = template
        missing = [t for t in getattr(template, "special_tokens", ()) or () if tokenizer.token_to_id(t) is None]
        if missing:
            raise Gpt2ChatError(f"chat template '{template.name}' needs the special tokens {missing}, which this "
                                "checkpoint's tokenizer does not have: pick the template it was trained with")
        self.model_name = model_name
        self.context_length = int(model.config.n_positions)
        self.max_tokens_limit = max_tokens_limit
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        if engine is None:
            from gpt2chat.engine import BatchedEngine

            engine = BatchedEngine(model, max_batch_size=max_batch_size, max_queue=max_queue, device=device)
        self.engine = engine
        self.outstanding = 0  # requests submitted and not yet finished or cancelled
        self.chat_stop_token_ids = frozenset(self._template_stop_ids() | {tokenizer.eos_token_id})
        self.text_stop_token_ids = frozenset({tokenizer.eos_token_id})

    # ---- prompts ---------------------------------------------------------------------------------

    def _template_stop_ids(self) -> set[int]:
        ids: set[int] = set()
        for token in getattr(self.template, "stop_tokens", ()) or ():
            token_id = token if isinstance(token, int) else self.tokenizer.token_to_id(token)
            if token_id is not None:
                ids.add(int(token_id))
        return ids

    def render_messages(self, messages: list[dict[str, str]], truncate: bool = False) -> list[int]:
        """Messages -> prompt ids ending with the assistant header; drops oldest turns if `truncate`."""
        messages = list(messages)
        while True:
            ids, _ = self.template.render(self.tokenizer, messages, add_generation_prompt=True)
            if len(ids) < self.context_length:
                return list(ids)
            turns = [i for i, m in enumerate(messages) if m["role"] != "system"]
            if not truncate or len(turns) <= 1:
                hint = "" if truncate else ' (or send "truncate": true to drop the oldest turns)'
                raise PromptTooLongError(
                    f"the prompt is {len(ids)} tokens but this model's context is {self.context_length} tokens "
                    f"and at least one must be left for the reply: shorten the messages{hint}",
                    param="messages",
                )
            del messages[turns[0]]
            # keep the history starting on a user turn: drop an assistant reply orphaned by the cut
            turns = [i for i, m in enumerate(messages) if m["role"] != "system"]
            if len(turns) > 1 and messages[turns[0]]["role"] == "assistant":
                del messages[turns[0]]

    def encode_text_prompt(self, prompt: str | list[int], truncate: bool = False) -> list[int]:
        """A plain completion prompt (no template) -> ids; keeps only the newest tokens if `truncate`."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            vocab = min(len(self.tokenizer), int(getattr(self.model.config, "vocab_size", len(self.tokenizer))))
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ServiceError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                                   param="prompt")
            ids = list(prompt)
        if not ids:
            ids = [self.tokenizer.eos_token_id]  # OpenAI's models also start an empty prompt from <|endoftext|>
        room = self.context_length - 1
        if len(ids) > room:
            if not truncate:
                raise PromptTooLongError(
                    f"the prompt is {len(ids)} tokens but this model's context is {self.context_length} tokens "
                    f'and at least one must be left for the reply: shorten it (or send "truncate": true)',
                    param="prompt",
                )
            ids = ids[-room:]
        return ids

    # ---- limits ----------------------------------------------------------------------------------

    def settings(self, prompt_len: int, max_tokens: int | None, temperature: float | None,
                 top_p: float | None, stop: Sequence[str], seed: int | None, extra_stops: Sequence[str] = ()
                 ) -> GenerationSettings:
        """Checks the request's token budget; the reply is capped by the room left in the context."""
        if max_tokens is not None and max_tokens > self.max_tokens_limit:
            raise TooManyTokensError(
                f"max_tokens={max_tokens} is more than this server allows per request ({self.max_tokens_limit})",
                param="max_tokens",
            )
        room = self.context_length - prompt_len
        budget = min(max_tokens or self.max_tokens_limit, self.max_tokens_limit, room)
        return GenerationSettings(
            max_new_tokens=max(1, budget),
            temperature=1.0 if temperature is None else float(temperature),
            top_p=1.0 if top_p is None else float(top_p),
            stop_strings=tuple(dict.fromkeys([*stop, *extra_stops])),
            seed=None if seed is None else seed % SEED_MODULUS,
        )

    def _reserve(self, count: int) -> None:
        capacity = self.max_batch_size + self.max_queue
        if self.outstanding + count > capacity:
            raise ServerBusyError(
                f"the server is busy ({self.outstanding} requests running or queued, limit {capacity}): "
                "retry later", code="queue_full",
            )
        self.outstanding += count

    def _release(self, count: int) -> None:
        self.outstanding = max(0, self.outstanding - count)

    # ---- generation ------------------------------------------------------------------------------

    def start(self, prompt_ids: list[int], settings: GenerationSettings, n: int = 1,
              chat: bool = True) -> list[Generation]:
        """Submits `n` sampled continuations of one prompt; all or none are admitted."""
        from gpt2chat.sampling import SamplingParams

        self._reserve(n)
        stop_ids = self.chat_stop_token_ids if chat else self.text_stop_token_ids
        stop_strings = [*settings.stop_strings, *(self.template.stop_strings if chat else ())]
        generations: list[Generation] = []
        try:
            for index in range(n):
                params = SamplingParams(
                    max_new_tokens=settings.max_new_tokens,
                    temperature=settings.temperature,
                    top_p=settings.top_p,
                    stop_token_ids=tuple(sorted(stop_ids)),
                    seed=None if settings.seed is None else (settings.seed + index) % SEED_MODULUS,
                )
                request = self.engine.submit(list(prompt_ids), params)
                # each Generation owns one reserved slot and releases it when it ends or is cancelled
                reply_prefix = getattr(self.template, "reply_prefix", "") if chat else ""
                generations.append(Generation(self, request, len(prompt_ids), stop_ids, stop_strings, reply_prefix))
        except BaseException as exc:
            self._release(n - len(generations))
            for generation in generations:
                generation.cancel()
            if type(exc).__name__ == "QueueFullError":
                raise ServerBusyError(str(exc), code="queue_full") from exc
            raise
        return generations

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()
