"""One generation request as the engine's clients see it: its tokens, log-probabilities, timing and end.

A `Request` is filled by the scheduler (`_deliver`, `_finish`) and read by whoever submitted it: blocking
or `async for` iteration over its token ids when a background thread runs the scheduler (`BatchedEngine`),
or `token_ids` after the caller's own thread stepped the scheduler (`Engine`). Leaving an iteration early
(break, exception, client gone) cancels the request.

This module knows nothing about models, tensors or text.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator
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

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


_END = object()


class Request:
    """One prompt's generation; iterate it (blocking or `async for`) to get its token ids as they come.

    Fields a client reads: `token_ids`, `finish_reason` (None while running), `logprobs` (entry i is there
    before token i is delivered), `prompt_logprobs` (set before the first token), `ttft_s` (submit -> first
    token sampled), `decode_s` (first -> last token sampled), `prompt_tokens`, `completion_tokens`.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, *, channel: bool = False):
        self.prompt_ids = prompt_ids
        self.params = params
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._on_cancel: Callable[[Request], None] | None = None  # set by the driver that owns the request
        # token ids for an iterating consumer in another thread (None: the owner reads token_ids itself)
        self._tokens: queue.SimpleQueue | None = queue.SimpleQueue() if channel else None
        self._lock = threading.Lock()
        self._async: tuple | None = None  # (loop, asyncio.Queue) once iterated with `async for`
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

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def result(self) -> GenerationResult:
        return GenerationResult(self.token_ids, self.finish_reason, self.prompt_tokens, self.logprobs,
                                self.prompt_logprobs, self.ttft_s, self.decode_s)  # fmt: skip

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
        if self._tokens is not None:
            self._push(token)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        self.finish_reason = reason
        self.error = error
        if self._tokens is not None:
            if error is not None:
                self._push(error)
            self._push(_END)
        self._done.set()

    def _push(self, item) -> None:
        with self._lock:
            if self._async is None:
                self._tokens.put(item)
                return
            loop, async_queue = self._async
        try:
            loop.call_soon_threadsafe(async_queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancelled.set()

    # ------------------------------------------------------------------ consumer side
    def _claim(self) -> None:
        if self._tokens is None:
            raise RuntimeError("this request is read through its engine (Engine.stream), not iterated")
        if self._iterated:
            raise RuntimeError("a Request can be iterated only once")
        self._iterated = True

    def __iter__(self) -> Iterator[int]:
        self._claim()
        return self._blocking_tokens()

    def _blocking_tokens(self) -> Iterator[int]:
        finished = False
        try:
            while True:
                item = self._tokens.get()
                if item is _END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:
                self.cancel()

    def __aiter__(self):
        self._claim()
        return self._async_tokens()

    async def _async_tokens(self):
        loop = asyncio.get_running_loop()
        async_queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            while True:  # tokens that arrived before the async consumer did
                try:
                    async_queue.put_nowait(self._tokens.get_nowait())
                except queue.Empty:
                    break
            self._async = (loop, async_queue)
        finished = False
        try:
            while True:
                item = await async_queue.get()
                if item is _END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:
                self.cancel()
