"""The bridge between the HTTP front ends and the engine: conversations in, streamed text out.

`ChatService` fits OpenAI-style messages to the context (the one policy, `gpt2chat.context_fit.fit_messages`),
enforces the request limits (`ServerLimits`: tokens per request, requests running and waiting), submits
token ids to the `BatchedEngine` (continuous batching: concurrent requests share decode steps) and turns
each token stream back into text with `gpt2chat.reply.ReplyDecoder`. A `Generation` also keeps the
engine's logprobs (`TokenLogprob`s, per the engine's contract) for the token ids it delivered.

It knows nothing about HTTP, JSON or Telegram: errors are `Gpt2ChatError`s with a `status_code` (400
unless said otherwise), `param` and `code` that the front ends map to their answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gpt2chat.context_fit import PromptTooLongError, fit_messages, reply_reserve
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.reply import ReplyDecoder, chat_template
from gpt2chat.reply import stop_token_ids as template_stop_ids
from gpt2chat.serve.limits import ServerLimits

log = logging.getLogger("gpt2chat.serve")

SEED_MODULUS = 2**63  # torch generators take seeds in [0, 2**64); OpenAI clients may send any integer

__all__ = ["ChatService", "Generation", "GenerationSettings", "ServiceError", "TooManyTokensError",
           "ServerBusyError", "PromptTooLongError"]


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


class TooManyTokensError(ServiceError):
    param = "max_tokens"


class ServerBusyError(ServiceError):
    """The queue is full: the client should retry later (HTTP 429)."""

    status_code = 429
    code = "queue_full"


@dataclass(frozen=True)
class GenerationSettings:
    """What one request asks for, already checked against the limits."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: off; k: the chosen token's logprob and the k most likely
    prompt_logprobs: int | None = None  # the same for every prompt token (completions' echo)


class Generation:
    """One running request: iterate (async) for text pieces; then read finish_reason and token counts.

    `token_ids` are the tokens the engine delivered (never a stop token); `logprobs[i]` is token i's
    `TokenLogprob` when logprobs were asked for, and `text_offsets[i]` where token i starts in the raw
    decoded continuation. At `deadline` (a `time.monotonic()` value) the generation ends with what it
    has (finish_reason "length") and `limit_hit` says "request_timeout"; a front end that drops a client
    for a limit says which in `limit_hit` before it cancels."""

    def __init__(self, service: ChatService, engine_request: Any, prompt_ids: list[int],
                 decoder: ReplyDecoder, first_choice: bool = True, stop_ids: frozenset[int] = frozenset(),
                 deadline: float | None = None):
        self._service = service
        self.deadline = deadline
        self.limit_hit: str | None = None
        # stop ids the engine was not given (completions' logprobs report the stop token, as OpenAI does)
        self._stop_ids = stop_ids
        self._stop_token = False
        self.first_choice = first_choice  # the n choices of one prompt share it: usage counts it once
        self._request = engine_request
        self.decoder = decoder
        self.prompt_ids = prompt_ids
        self.token_ids: list[int] = []
        self.text_offsets: list[int] = []
        self.finish_reason: str | None = None
        self._released = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        """Tokens the model produced for this reply, the stop token that ended it included."""
        return len(self.token_ids) + (getattr(self._request, "finish_reason", None) == "stop")

    @property
    def logprobs(self) -> list:
        return list(getattr(self._request, "logprobs", None) or [])[: len(self.token_ids)]

    @property
    def prompt_logprobs(self) -> list:
        return list(getattr(self._request, "prompt_logprobs", None) or [])

    @property
    def ttft_s(self) -> float | None:
        return getattr(self._request, "ttft_s", None)

    @property
    def decode_s(self) -> float | None:
        return getattr(self._request, "decode_s", None)

    async def _tokens(self) -> AsyncIterator[int]:
        """The engine's token ids until it ends or the deadline passes (then the row is freed at once)."""
        tokens = aiter(self._request)
        try:
            while True:
                left = None if self.deadline is None else self.deadline - time.monotonic()
                try:
                    # at the deadline wait_for cancels the pending read: the engine request sees its reader
                    # go and cancels itself, which gives its cache row back before the next step
                    token_id = await asyncio.wait_for(anext(tokens), left)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    self.limit_hit = "request_timeout"
                    log.warning("a request reached --request-timeout (%g s) after %d tokens: it ends there",
                                self._service.limits.request_timeout_s, len(self.token_ids))
                    return
                yield token_id
        finally:
            close = getattr(tokens, "aclose", None)
            if close is not None:
                await close()

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async with contextlib.aclosing(self._tokens()) as tokens:
                async for token_id in tokens:
                    self.text_offsets.append(self.decoder.decoded_chars)
                    self.token_ids.append(token_id)
                    if token_id in self._stop_ids:
                        self._stop_token = True
                        break
                    text = self.decoder.push(token_id)
                    if text:
                        yield text
                    if self.decoder.stopped:
                        break
            if not self.decoder.stopped:
                tail = self.decoder.finish()
                if tail:
                    yield tail
            reason = getattr(self._request, "finish_reason", None)
            stopped = self.decoder.stopped or self._stop_token or reason == "stop"
            self.finish_reason = "stop" if stopped else "length"
        finally:
            self.cancel()

    async def text(self) -> str:
        return "".join([piece async for piece in self])

    def cancel(self) -> None:
        """Frees the engine row now (idempotent); called on completion, stop string or disconnect."""
        if self._released:
            return
        self._released = True
        if getattr(self._request, "finish_reason", None) is None:
            self._request.cancel()
        self._service._finished(self)


class ChatService:
    """Owns the engine and the tokenizer; turns requests into `Generation`s.

    `observers` are called with each `Generation` once it has ended (finished, stopped or cancelled): the
    metrics hang there."""

    def __init__(self, model: Any, tokenizer: Any, *, template: Any = None, model_name: str = "gpt2chat",
                 limits: ServerLimits | None = None, engine: Any = None, device: Any = None, dtype: Any = None):
        self.model = model
        self.tokenizer = tokenizer
        self.template = chat_template(tokenizer, template)
        self.model_name = model_name
        self.limits = limits or ServerLimits()
        self.context_length = int(model.config.n_positions)
        if engine is None:
            from gpt2chat.engine import BatchedEngine

            # the service admits at most `capacity` requests (running + waiting): the engine's own queue bound
            # is set past that so that it never refuses one the limits allow (every request waits there first)
            engine = BatchedEngine(model, max_batch_size=self.limits.max_batch_size,
                                   max_queue=self.limits.capacity, device=device, dtype=dtype)
        self.engine = engine
        self.outstanding = 0  # requests submitted and not yet finished or cancelled
        self.stop_token_ids = template_stop_ids(tokenizer, self.template)
        self.observers: list[Callable[[Generation], None]] = []

    # ---- prompts ---------------------------------------------------------------------------------

    def render_messages(self, messages: list[dict[str, str]], truncate: bool = False,
                        max_tokens: int | None = None) -> list[int]:
        """Messages -> prompt ids ending with the assistant header; drops the oldest turns if `truncate`
        (keeping room for `max_tokens`, at most a quarter of the context)."""
        reserve = reply_reserve(self.context_length, max_tokens or self.limits.max_tokens_limit)
        hint = "" if truncate else ' (or send "truncate": true to drop the oldest turns)'
        return fit_messages(self.tokenizer, self.template, messages, context=self.context_length,
                            reserve=reserve, truncate=truncate, hint=hint).ids

    def encode_text_prompt(self, prompt: str | list[int]) -> list[int]:
        """A plain completion prompt (no template) -> ids, checked against the vocabulary and context."""
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
        if len(ids) >= self.context_length:
            error = PromptTooLongError(
                f"the prompt is too long: {len(ids)} tokens, but the model's context is {self.context_length} "
                "tokens and at least one must be left for the reply: shorten it")
            error.param = "prompt"
            raise error
        return ids

    # ---- limits ----------------------------------------------------------------------------------

    def settings(self, prompt_len: int, max_tokens: int | None, temperature: float | None = None,
                 top_p: float | None = None, stop: Sequence[str] = (), seed: int | None = None,
                 logprobs: int | None = None, prompt_logprobs: int | None = None) -> GenerationSettings:
        """Checks the request's token budget; the reply is capped by the room left in the context."""
        limit = self.limits.max_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            raise TooManyTokensError(f"max_tokens={max_tokens} is more than this server allows per request ({limit})")
        budget = min(max_tokens or limit, limit, self.context_length - prompt_len)
        return GenerationSettings(
            max_new_tokens=max(1, budget),
            temperature=1.0 if temperature is None else float(temperature),
            top_p=1.0 if top_p is None else float(top_p),
            stop_strings=tuple(dict.fromkeys(stop)),
            seed=None if seed is None else seed % SEED_MODULUS,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    def _reserve(self, count: int) -> None:
        capacity = self.limits.capacity
        if self.outstanding + count > capacity:
            raise ServerBusyError(
                f"the server is busy ({self.outstanding} requests running or queued, limit {capacity}): retry later")
        self.outstanding += count

    def _finished(self, generation: Generation) -> None:
        self.outstanding = max(0, self.outstanding - 1)
        for observer in self.observers:
            try:
                observer(generation)
            except Exception:  # noqa: BLE001 - a metrics bug must not fail a reply
                log.exception("generation observer failed")

    # ---- generation ------------------------------------------------------------------------------

    def start(self, prompt_ids: list[int], settings: GenerationSettings, n: int = 1,
              chat: bool = True) -> list[Generation]:
        """Submits `n` sampled continuations of one prompt; all or none are admitted. `chat` replies
        lose the template's reply prefix and stop at its stop strings too; raw completions do not."""
        from gpt2chat.sampling import SamplingParams

        self._reserve(n)
        stop_strings = [*settings.stop_strings, *(self.template.stop_strings if chat else ())]
        reply_prefix = self.template.reply_prefix if chat else ""
        # A scored text completion reports its stop token with its logprob (OpenAI's and vLLM's shape, what
        # lm-eval's echo scoring counts on): the engine is not told to stop there, the Generation stops.
        scored = not chat and settings.logprobs is not None
        engine_stops = () if scored else self.stop_token_ids
        own_stops = frozenset(self.stop_token_ids) if scored else frozenset()
        prompt = list(prompt_ids)  # one list shared by the n choices: usage counts the prompt once
        deadline = time.monotonic() + self.limits.request_timeout_s
        generations: list[Generation] = []
        try:
            for index in range(n):
                params = SamplingParams(
                    max_new_tokens=settings.max_new_tokens,
                    temperature=settings.temperature,
                    top_p=settings.top_p,
                    stop_token_ids=engine_stops,
                    seed=None if settings.seed is None else (settings.seed + index) % SEED_MODULUS,
                    logprobs=settings.logprobs,
                    prompt_logprobs=settings.prompt_logprobs,
                )
                request = self.engine.submit(prompt, params)
                # each Generation owns one reserved slot and releases it when it ends or is cancelled
                decoder = ReplyDecoder(self.tokenizer, stop_strings, reply_prefix, skip_special_tokens=True)
                generations.append(Generation(self, request, prompt, decoder, first_choice=index == 0,
                                              stop_ids=own_stops, deadline=deadline))
        except BaseException as exc:
            self.outstanding = max(0, self.outstanding - (n - len(generations)))
            for generation in generations:
                generation.cancel()
            if type(exc).__name__ == "QueueFullError":
                raise ServerBusyError(str(exc)) from exc
            raise
        return generations

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()
