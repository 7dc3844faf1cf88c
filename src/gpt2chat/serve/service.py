"""The bridge between the HTTP front ends and the engine: conversations in, streamed text out.

`ChatService` runs requests through the one text pipeline (`gpt2chat.pipeline.TextPipeline`: messages fitted
to the context, raw prompts checked, stop ids, the reply's `ReplyStream`), enforces the request limits
(`ServerLimits`: tokens per request, requests running and waiting) and submits token ids to the
`BatchedEngine` (continuous batching: concurrent requests share decode steps). A `Generation` also keeps
the engine's logprobs (`TokenLogprob`s, per the engine's contract) for the token ids it delivered.

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

from gpt2chat.context_fit import PromptTooLongError
from gpt2chat.engine import QueueFullError
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.pipeline import ReplyStream, TextPipeline
from gpt2chat.sampling import SamplingParams
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
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs, OpenAI's -100 .. 100
    constraint: Any = None  # a gpt2chat.grammar.Constraint the reply must match (serve/structured.py)


class Generation:
    """One running request: iterate (async) for text pieces; then read finish_reason and token counts.

    `token_ids` are the tokens the engine delivered (never a stop token the engine was told about);
    `logprobs[i]` is token i's `TokenLogprob` when logprobs were asked for, and `text_offsets[i]` where
    token i starts in the raw decoded continuation. At `deadline` (a `time.monotonic()` value) the
    generation ends with what it has (finish_reason "length") and `limit_hit` says "request_timeout"; a
    front end that drops a client for a limit says which in `limit_hit` before it cancels."""

    def __init__(self, service: ChatService, engine_request: Any, prompt_ids: list[int], reply: ReplyStream,
                 first_choice: bool = True, deadline: float | None = None):
        self._service = service
        self.deadline = deadline
        self.limit_hit: str | None = None
        self.first_choice = first_choice  # the n choices of one prompt share it: usage counts it once
        self._request = engine_request
        self.reply = reply
        self.prompt_ids = prompt_ids
        self.finish_reason: str | None = None
        self._released = False

    @property
    def token_ids(self) -> list[int]:
        return self.reply.token_ids

    @property
    def text_offsets(self) -> list[int]:
        return self.reply.text_offsets

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        """Tokens the model produced for this reply, the stop token that ended it included."""
        return len(self.token_ids) + (self._request.finish_reason == "stop")

    @property
    def logprobs(self) -> list:
        return self._request.logprobs[: len(self.token_ids)]

    @property
    def prompt_logprobs(self) -> list:
        return list(self._request.prompt_logprobs)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the engine's prompt cache supplied (known once the request has a row)."""
        return self._request.cached_tokens

    @property
    def ttft_s(self) -> float | None:
        return self._request.ttft_s

    @property
    def decode_s(self) -> float | None:
        return self._request.decode_s

    async def _tokens(self) -> AsyncIterator[int]:
        """The engine's token ids until it ends or the deadline passes (then the row is freed at once)."""
        async with contextlib.aclosing(aiter(self._request)) as tokens:
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

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async with contextlib.aclosing(self._tokens()) as tokens, \
                    contextlib.aclosing(self.reply.apieces(tokens)) as pieces:
                async for piece in pieces:
                    yield piece
            self.finish_reason = self.reply.finish_reason(self._request.finish_reason)
        finally:
            self.cancel()

    async def text(self) -> str:
        return "".join([piece async for piece in self])

    def cancel(self) -> None:
        """Frees the engine row now (idempotent); called on completion, stop string or disconnect."""
        if self._released:
            return
        self._released = True
        if self._request.finish_reason is None:
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
        self.pipeline = TextPipeline.for_model(model, tokenizer, template)
        self.template = self.pipeline.template
        self.model_name = model_name
        self.limits = limits or ServerLimits()
        self.context_length = self.pipeline.context
        self.logits_width = int(getattr(model.config, "vocab_size", len(tokenizer)))  # a grammar's mask width
        if engine is None:
            from gpt2chat.engine import BatchedEngine

            # the service admits at most `capacity` requests (running + waiting): the engine's own queue bound
            # is set past that so that it never refuses one the limits allow (every request waits there first)
            engine = BatchedEngine(model, max_batch_size=self.limits.max_batch_size,
                                   max_queue=self.limits.capacity, device=device, dtype=dtype)
        self.engine = engine
        self.outstanding = 0  # requests submitted and not yet finished or cancelled
        self.observers: list[Callable[[Generation], None]] = []

    # ---- prompts ---------------------------------------------------------------------------------

    def render_messages(self, messages: list[dict[str, Any]], truncate: bool = False,
                        max_tokens: int | None = None, tools: list[dict] | None = None) -> list[int]:
        """Messages (and `tools`, rendered into the system part) -> prompt ids ending with the assistant
        header; drops the oldest turns if `truncate` (keeping room for `max_tokens`, at most a quarter of
        the context; the system part is never dropped)."""
        hint = "" if truncate else ' (or send "truncate": true to drop the oldest turns)'
        if tools:
            from gpt2chat.templates import flatten

            messages = flatten(messages, tools)
        return self.pipeline.fit(messages, max_tokens or self.limits.max_tokens_limit, truncate=truncate,
                                 hint=hint).ids

    def encode_text_prompt(self, prompt: str | list[int]) -> list[int]:
        """A plain completion prompt (no template) -> ids, checked against the vocabulary and context."""
        return self.pipeline.encode(prompt)

    # ---- limits ----------------------------------------------------------------------------------

    def settings(self, prompt_len: int, max_tokens: int | None, temperature: float | None = None,
                 top_p: float | None = None, stop: Sequence[str] = (), seed: int | None = None,
                 logprobs: int | None = None, prompt_logprobs: int | None = None,
                 logit_bias: tuple[tuple[int, float], ...] = (), constraint: Any = None) -> GenerationSettings:
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
            logit_bias=tuple(logit_bias),
            constraint=constraint,
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
        self._reserve(n)
        # A scored text completion reports its stop token with its logprob (OpenAI's and vLLM's shape, what
        # lm-eval's echo scoring counts on): the engine is not told to stop there, the reply stream stops.
        scored = not chat and settings.logprobs is not None
        prompt = list(prompt_ids)  # one list shared by the n choices: usage counts the prompt once
        deadline = time.monotonic() + self.limits.request_timeout_s
        base = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                              top_p=settings.top_p, logprobs=settings.logprobs,
                              prompt_logprobs=settings.prompt_logprobs, logit_bias=settings.logit_bias,
                              constraint=settings.constraint)
        generations: list[Generation] = []
        try:
            for index in range(n):
                seed = None if settings.seed is None else (settings.seed + index) % SEED_MODULUS
                params = self.pipeline.params(base.replace(seed=seed), len(prompt), stop=not scored)
                request = self.engine.submit(prompt, params)
                # each Generation owns one reserved slot and releases it when it ends or is cancelled
                reply = self.pipeline.reply(chat=chat, stop_strings=settings.stop_strings,
                                            text_stop_ids=self.pipeline.stop_ids if scored else ())
                generations.append(Generation(self, request, prompt, reply, first_choice=index == 0,
                                              deadline=deadline))
        except BaseException as exc:
            self.outstanding = max(0, self.outstanding - (n - len(generations)))
            for generation in generations:
                generation.cancel()
            if isinstance(exc, QueueFullError):
                raise ServerBusyError(str(exc)) from exc
            raise
        return generations

    def close(self) -> None:
        self.engine.close()
