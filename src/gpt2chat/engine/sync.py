"""The synchronous engine: `generate` and `stream` drive the scheduler in the caller's thread.

Used by the CLI, the terminal chat and evaluation. Every call adds its requests to the one `Scheduler`
this engine owns and steps it until they are done, so several prompts of one `generate` call, or two
streams read in turn, share decode steps exactly as the server's requests do. An `Engine` is meant for one
thread; `BatchedEngine` serves several.

This module knows nothing about text or threads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gpt2chat.device import model_device_dtype as read_device_dtype
from gpt2chat.engine.request import Request, TokenLogprob
from gpt2chat.engine.runner import ModelRunner
from gpt2chat.engine.scheduler import Scheduler, check_prompt
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.model import GPT
from gpt2chat.sampling import SamplingParams

__all__ = ["Engine", "TokenStream", "model_device_dtype"]


def model_device_dtype(model: GPT, device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of `model`'s weights; a `device` / `dtype` given must match them (the engine
    never moves or casts the model it is given: load it where it should run)."""
    have_device, have_dtype = read_device_dtype(model)
    if device is not None and torch.device(device).type != have_device.type:
        raise Gpt2ChatError(f"the model is on {have_device} but the engine was asked for {device}: load it there")
    if dtype is not None and not isinstance(dtype, str) and dtype != have_dtype:
        raise Gpt2ChatError(f"the model is in {have_dtype} but the engine was asked for {dtype}: load it so")
    if model.training:
        raise Gpt2ChatError("the engine generates with a model in eval mode: call model.eval() first")
    return have_device, have_dtype


class Engine:
    """Generation on token ids in the caller's thread (see the module docstring).

    `max_batch_size`: rows decoded together (more prompts queue for a free row). `prefill_tokens`: the most
    prompt tokens one step prefills. `device` / `dtype` are checked against the model's, never applied.
    """

    def __init__(self, model: GPT, device=None, dtype=None, *, max_batch_size: int = 8, prefill_tokens: int = 512,
                 max_len: int | None = None, compile: bool = False):  # fmt: skip
        self.device, self.dtype = model_device_dtype(model, device, dtype)
        self.model = model
        self.config = model.config
        self.context = min(self.config.n_positions, max_len or self.config.n_positions)
        self.max_batch_size = max_batch_size
        self.runner = ModelRunner(model, max_batch_size, self.context, compile)
        self.scheduler = Scheduler(self.runner, max_batch_size, self.context, prefill_tokens)
        self._stepping = False

    def check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        """The prompt as a list of ints; Gpt2ChatError when it is empty, too long or out of vocabulary."""
        return check_prompt(prompt_ids, self.context, self.config.vocab_size)

    # ------------------------------------------------------------------ public API
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> Request:
        """Queue one prompt; it advances whenever this engine is stepped (`generate`, a stream's `next`)."""
        request = Request(self.check_prompt(prompt_ids), params or SamplingParams())
        request._on_cancel = self._cancelled
        self.scheduler.add(request)
        return request

    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None):
        """Generate for several prompts at once -> one `GenerationResult` per prompt.

        `prompts`: a list of token-id lists (a flat list of ints counts as one prompt). `params`: one
        `SamplingParams` for all rows or one per row.
        """
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        if not prompts:
            raise Gpt2ChatError("no prompts given")
        per_row = [params or SamplingParams()] * len(prompts) if not isinstance(params, Sequence) else list(params)
        if len(per_row) != len(prompts):
            raise Gpt2ChatError(f"got {len(per_row)} SamplingParams for {len(prompts)} prompts")
        checked = [self.check_prompt(p) for p in prompts]  # all checked before any is queued
        requests = [self.submit(p, sp) for p, sp in zip(checked, per_row, strict=True)]
        try:
            while not all(r.done for r in requests):
                self.step()
        finally:
            for request in requests:
                request.cancel()
        return [r.result() for r in requests]

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> TokenStream:
        """Yield the reply's token ids one by one; `.finish_reason` is set once the iterator is exhausted."""
        return TokenStream(self, self.submit(prompt_ids, params))

    def step(self) -> None:
        """One scheduler step; if it fails, every request of this engine ends with "error" and it re-raises."""
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


class TokenStream:
    """Iterator over one prompt's reply tokens; every `next` steps the engine until a token is there.

    `close()` (or dropping the stream) cancels the rest of the reply: it is never computed."""

    def __init__(self, engine: Engine, request: Request):
        self._engine = engine
        self.request = request
        self._read = 0

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> int:
        request = self.request
        while self._read >= len(request.token_ids):
            if request.done:
                raise StopIteration
            self._engine.step()
        self._read += 1
        return request.token_ids[self._read - 1]

    def close(self) -> None:
        self.request.cancel()

    cancel = close

    def __del__(self) -> None:
        request = getattr(self, "request", None)
        if request is not None and not request.done:
            request._cancelled.set()  # no call into the engine from a finaliser: its next step drops the row

    @property
    def finish_reason(self) -> str | None:
        return self.request.finish_reason

    @property
    def prompt_tokens(self) -> int:
        return self.request.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self.request.completion_tokens

    @property
    def token_ids(self) -> list[int]:
        return list(self.request.token_ids)

    @property
    def logprobs(self) -> list[TokenLogprob]:
        return self.request.logprobs

    @property
    def prompt_logprobs(self) -> list[TokenLogprob | None]:
        return self.request.prompt_logprobs

    @property
    def ttft_s(self) -> float | None:
        return self.request.ttft_s

    @property
    def decode_s(self) -> float | None:
        return self.request.decode_s

