"""The serving engine: the scheduler's loop in a background thread, fed by `submit` from any thread.

`BatchedEngine.submit` checks a prompt and queues it; the thread admits it into a free cache row as soon
as one is free and streams its tokens back through the returned `Request` (blocking or `async for`). A
cancelled request (a client gone) gives its row back before the next step's work.

This module knows nothing about text, HTTP or how the model computes.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from gpt2chat.engine.request import QueueFullError, Request
from gpt2chat.engine.runner import ModelRunner
from gpt2chat.engine.scheduler import Scheduler, check_prompt
from gpt2chat.engine.sync import model_device_dtype
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.model import GPT
from gpt2chat.sampling import SamplingParams

__all__ = ["BatchedEngine"]


class BatchedEngine:
    """Continuous batching over `max_batch_size` cache rows, served by a background thread.

    `max_len` bounds each row (default: the model's context); `max_queue` bounds the requests waiting for
    a row once every row is taken (`submit` raises `QueueFullError` beyond it); `prefill_tokens` is the most prompt tokens one step
    prefills. `device` / `dtype` are checked against the model's, never applied.
    """

    def __init__(self, model: GPT, max_batch_size: int = 16, max_queue: int = 64, device=None, dtype=None,
                 max_len: int | None = None, prefill_tokens: int = 512,
                 compile: bool = False):  # fmt: skip
        if max_batch_size < 1 or max_queue < 0:
            raise Gpt2ChatError("max_batch_size must be >= 1 and max_queue >= 0")
        self.device, self.dtype = model_device_dtype(model, device, dtype)
        self.model, self.config = model, model.config
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.context = min(self.config.n_positions, max_len or self.config.n_positions)
        self.runner = ModelRunner(model, max_batch_size, self.context, compile)
        self.scheduler = Scheduler(self.runner, max_batch_size, self.context, prefill_tokens)
        self._inbox: list[Request] = []  # submitted, not yet handed to the scheduler (its thread owns it)
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="gpt2chat-batched-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> Request:
        """Queue one prompt -> its `Request`; `QueueFullError` when `max_queue` requests already wait."""
        prompt = check_prompt(prompt_ids, self.context, self.config.vocab_size)
        request = Request(prompt, params or SamplingParams(), channel=True)
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
