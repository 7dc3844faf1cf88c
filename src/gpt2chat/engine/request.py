"""One generation request as the engine's clients see it: its tokens, log-probabilities, timing and end.

A `Request` is filled by the scheduler (`_deliver`, `_finish`) and read by whoever submitted it, the same
way for both engines: blocking or `async for` iteration over its token ids, or `result()`. One reading
rule (`_take`) serves both loops. Leaving an iteration early (break, exception, client gone) cancels the
request.

This module knows nothing about models, tensors or text.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from gpt2chat.errors import Gpt2ChatError
from gpt2chat.sampling import SamplingParams

__all__ = ["Request", "TokenLogprob", "GenerationResult", "QueueFullError", "FINISH_REASONS"]

# "stop": a stop token was sampled (never output); "length": max_new_tokens or the context is reached;
# "cancelled": the client cancelled or the engine closed; "error": the engine failed (see the raised error)
FINISH_REASONS = ("stop", "length", "cancelled", "error")


class QueueFullError(Gpt2ChatError):
    """The batched engine already holds `max_queue` requests waiting for a free row."""


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model's raw distribution (log_softmax of the logits, fp32,
    before repetition penalty, temperature and top-k / top-p), and the `top` most likely tokens there as
    (token_id, logprob) pairs, most likely first (empty unless asked for)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class GenerationResult:
    """What `Engine.generate` returns for one prompt."""

    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token of token_ids (if asked)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # one per prompt token
    ttft_s: float | None = None  # call -> first token sampled
    decode_s: float | None = None  # first -> last token sampled
    cached_tokens: int = 0  # prompt tokens whose keys / values came from the prompt cache

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Request:
    """One prompt's generation, the same object for both engines: iterate it (blocking `for` or `async for`)
    for its token ids as they come, or call `result()` for all of them.

    `BatchedEngine` fills it from its own thread; an `Engine` request advances its engine one step each
    time its reader needs a token, in the reader's thread. Leaving an iteration early (break, exception,
    client gone) cancels the request, which frees its row before any more work is done for it. A request
    that failed raises its error at the end of its tokens.

    Fields a client reads: `token_ids`, `finish_reason` (None while running), `logprobs` (entry i is there
    before token i is delivered), `prompt_logprobs` (set before the first token), `ttft_s` (submit -> first
    token sampled), `decode_s` (first -> last token sampled), `prompt_tokens`, `completion_tokens`,
    `cached_tokens` (prompt tokens the prompt cache supplied; set before the first token), `error`.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, *, step: Callable[[], None] | None = None):
        self.prompt_ids = prompt_ids
        self.params = params
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] = []
        self.finish_reason: str | None = None
        self.cached_tokens = 0  # prompt tokens taken from the prompt cache (set when a row is given)
        self.error: BaseException | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._on_cancel: Callable[[Request], None] | None = None  # set by the driver that owns the request
        # `step` advances the engine in the reader's thread (Engine); None: another thread fills the request
        self._step = step
        self._changed = threading.Event()  # set by the filling thread after each token and at the end
        self._async: tuple | None = None  # (loop, asyncio.Event) once iterated with `async for`
        self._iterated = False

    def __repr__(self) -> str:
        return (f"Request(prompt_tokens={self.prompt_tokens}, completion_tokens={self.completion_tokens}, "
                f"finish_reason={self.finish_reason!r})")  # fmt: skip

    # ------------------------------------------------------------------ state
    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at

    @property
    def decode_s(self) -> float | None:
        return None if self.first_token_at is None else self.last_token_at - self.first_token_at

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating: the row is freed before any more work is done for it. Iteration ends."""
        if self._done.is_set() or self._cancelled.is_set():
            return
        self._cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel(self)

    close = cancel

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the request ends (an `Engine` request is stepped to its end); whether it has."""
        while self._step is not None and not self._done.is_set():
            self._step()
        return self._done.wait(timeout)

    def result(self) -> GenerationResult:
        """Every token and its end, once the request is done (waits for it); raises the request's error."""
        self.wait()
        if self.error is not None:
            raise self.error
        return GenerationResult(self.token_ids, self.finish_reason, self.prompt_tokens, self.logprobs,
                                self.prompt_logprobs, self.ttft_s, self.decode_s, self.cached_tokens)  # fmt: skip

    # ------------------------------------------------------------------ called by the scheduler
    def _sampled(self, now: float) -> None:
        """A token was sampled for this request (output or stop token): the clock the timings read."""
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now

    def _deliver(self, token: int, logprob: TokenLogprob | None) -> None:
        if logprob is not None:
            self.logprobs.append(logprob)
        self.token_ids.append(token)
        self._notify()

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        self.finish_reason = reason
        self.error = error
        self._done.set()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        waiter = self._async
        if waiter is not None:
            loop, event = waiter
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                self._cancelled.set()

    # ------------------------------------------------------------------ reader side
    def _take(self, read: int) -> tuple[list[int], bool]:
        """The tokens delivered after the first `read` ones, and whether they are the last; at the end of a
        failed request's tokens, its error is raised. The one reading rule both loops below follow."""
        done = self._done.is_set()  # read before the tokens: every token comes before the end
        tokens = self.token_ids[read:]
        if done and not tokens and self.error is not None:
            raise self.error
        return tokens, done and not tokens

    def _claim(self) -> None:
        if self._iterated:
            raise RuntimeError("a Request can be iterated only once")
        self._iterated = True

    def __iter__(self) -> Iterator[int]:
        self._claim()
        return self._tokens()

    def __aiter__(self) -> AsyncIterator[int]:
        self._claim()
        return self._async_tokens()

    def _tokens(self) -> Iterator[int]:
        read = 0
        try:
            while True:
                tokens, last = self._take(read)
                for token in tokens:
                    read += 1
                    yield token
                if last:
                    return
                if not tokens:
                    if self._step is not None:
                        self._step()
                    else:
                        self._changed.wait()
                        self._changed.clear()
        finally:
            self.cancel()  # nothing if it ended; a reader that left early frees the row

    async def _async_tokens(self) -> AsyncIterator[int]:
        """The same loop as `_tokens`, waiting on the event loop (an `Engine` request steps in it)."""
        event = asyncio.Event()
        self._async = (asyncio.get_running_loop(), event)
        read = 0
        try:
            while True:
                tokens, last = self._take(read)
                for token in tokens:
                    read += 1
                    yield token
                if last:
                    return
                if not tokens:
                    if self._step is not None:
                        self._step()
                    else:
                        await event.wait()
                        event.clear()
        finally:
            self.cancel()
