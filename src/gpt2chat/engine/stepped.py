"""The synchronous engine: its scheduler is stepped in the caller's thread, whenever a reader of one of its
requests needs a token (`for token in request`, `request.result()`, `generate`).

Used by the CLI, the terminal chat and evaluation. Every request goes to the one `Scheduler` this engine
owns, so several prompts of one `generate` call, or two requests read in turn, share decode steps exactly
as the server's requests do. An `Engine` is meant for one thread; `BatchedEngine` serves several.

This module knows nothing about text or threads.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpt2chat.engine.base import EngineBase
from gpt2chat.engine.request import Request
from gpt2chat.model import GPT
from gpt2chat.sampling import SamplingParams

__all__ = ["Engine"]


class Engine(EngineBase):
    """Generation on token ids in the caller's thread (see the module docstring; arguments: `EngineBase`)."""

    def __init__(self, model: GPT, device=None, dtype=None, *, max_batch_size: int = 8, prefill_tokens: int = 512,
                 max_len: int | None = None, compile: bool = False, prompt_cache: bool = True,
                 prefill_chunk: int | None = None):  # fmt: skip
        super().__init__(model, device, dtype, max_batch_size=max_batch_size, prefill_tokens=prefill_tokens,
                         max_len=max_len, compile=compile, prompt_cache=prompt_cache,
                         prefill_chunk=prefill_chunk)  # fmt: skip
        self._stepping = False

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> Request:
        """Queue one prompt -> its `Request`; it advances whenever this engine is stepped (by any reader)."""
        request = Request(self.check_prompt(prompt_ids), params or SamplingParams(), step=self.step)
        request._on_cancel = self._cancelled
        self.scheduler.add(request)
        return request

    def step(self) -> None:
        """One scheduler step. A forward or a draw that fails ends only the requests it concerns (their
        readers get the error); a failure of the step itself ends every request with "error" and re-raises."""
        self._stepping = True
        try:
            self.scheduler.step()
        except BaseException as error:
            self.scheduler.fail_all("error", error)
            raise
        finally:
            self._stepping = False

    def _cancelled(self, request: Request) -> None:
        if not self._stepping:  # inside a step the scheduler drops it before its next forward
            self.scheduler.release(request)
