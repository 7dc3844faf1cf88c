"""The serving engine: the scheduler's loop in a background thread, fed by `submit` from any thread.

`BatchedEngine.submit` checks a prompt and queues it; the thread admits it into a free cache row as soon
as one is free and streams its tokens back through the returned `Request` (blocking or `async for`). A
cancelled request (a client gone) gives its row back before the next step's work.

This module knows nothing about text, HTTP or how the model computes.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from gpt2chat.engine.base import EngineBase
from gpt2chat.engine.request import QueueFullError, Request
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.model import GPT
from gpt2chat.sampling import SamplingParams

__all__ = ["BatchedEngine"]


class BatchedEngine(EngineBase):
    """Continuous batching over `max_batch_size` cache rows, served by a background thread (arguments:
    `EngineBase`). `max_queue` bounds the requests waiting for a row once every row is taken (`submit`
    raises `QueueFullError` beyond it).
    """

    def __init__(self, model: GPT, max_batch_size: int = 16, max_queue: int = 64, device=None, dtype=None,
                 max_len: int | None = None, prefill_tokens: int = 512,
                 compile: bool = False, prompt_cache: bool = True, prefill_chunk: int | None = None):  # fmt: skip
        if max_queue < 0:
            raise Gpt2ChatError("max_queue must be >= 0")
        super().__init__(model, device, dtype, max_batch_size=max_batch_size, prefill_tokens=prefill_tokens,
                         max_len=max_len, compile=compile, prompt_cache=prompt_cache,
                         prefill_chunk=prefill_chunk)  # fmt: skip
        self.max_queue = max_queue
        self._inbox: list[Request] = []  # submitted, not yet handed to the scheduler (its thread owns it)
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="gpt2chat-batched-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> Request:
        """Queue one prompt -> its `Request`; `QueueFullError` when `max_queue` requests already wait."""
        request = Request(self.check_prompt(prompt_ids), params or SamplingParams())
        request._on_cancel = self._wake
        with self._cond:
            if self._closed:
                raise Gpt2ChatError("the engine is closed")
            free_rows = self.max_batch_size - self.scheduler.active_count
            if self.pending_count >= self.max_queue + free_rows:  # a free row takes it even if max_queue is 0
                raise QueueFullError(
                    f"the request queue is full ({self.max_queue} requests waiting); try again later"
                )
            self._inbox.append(request)
            self._cond.notify()
        return request

    @property
    def active_count(self) -> int:
        """Requests holding a cache row (prefilling or decoding)."""
        return self.scheduler.active_count

    @property
    def pending_count(self) -> int:
        """Requests waiting for a cache row."""
        return len(self._inbox) + self.scheduler.pending_count

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread; unfinished requests end with finish_reason "cancelled"."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> BatchedEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _wake(self, _request: Request | None = None) -> None:
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ the serving thread
    def _serve(self) -> None:
        scheduler = self.scheduler
        try:
            while True:
                with self._cond:
                    while not self._closed and not self._inbox and not scheduler.has_work():
                        self._cond.wait()
                    if self._closed:
                        break
                    for request in self._inbox:
                        scheduler.add(request)
                    self._inbox.clear()
                try:
                    scheduler.step()
                except Exception as error:  # a bug: fail the requests in flight, keep serving
                    scheduler.fail_all("error", error, waiting=False)
        finally:
            with self._cond:
                self._closed = True
                for request in self._inbox:
                    scheduler.add(request)
                self._inbox.clear()
            scheduler.fail_all("cancelled")
