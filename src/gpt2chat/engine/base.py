"""What both engines share: the model checks, the runner and scheduler each one owns, `generate` and the
prompt-cache counters. `Engine` (stepped.py) steps the scheduler in the caller's thread, `BatchedEngine`
(batched.py) in a thread of its own; a client uses either the same way: `submit` -> `Request`.

This module knows nothing about text or threads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gpt2chat.device import model_device_dtype as read_device_dtype
from gpt2chat.engine.model_runner import ModelRunner
from gpt2chat.engine.prompt_cache import PromptCacheStats
from gpt2chat.engine.request import GenerationResult, Request
from gpt2chat.engine.scheduler import Scheduler, check_prompt
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.model import GPT
from gpt2chat.sampling import SamplingParams

__all__ = ["EngineBase", "checked_device_dtype"]


def checked_device_dtype(model: GPT, device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
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


class EngineBase:
    """The parts of an engine that do not depend on which thread steps it (see the module docstring).

    `max_batch_size`: cache rows, the most requests decoded together (more queue for a free row).
    `prefill_tokens`: the most prompt tokens one step prefills; `prefill_chunk`: the most while other
    streams decode (None: what fits a bounded stall, `engine.chunk_policy`). `max_len`: the longest prompt + reply of a
    row (default: the model's context). `prompt_cache`: reuse cached prompt prefixes (module
    `gpt2chat.engine.prompt_cache`; the tokens are those of a cold run either way). `device` / `dtype`
    are checked against the model's, never applied.
    """

    def __init__(self, model: GPT, device=None, dtype=None, *, max_batch_size: int, prefill_tokens: int = 512,
                 max_len: int | None = None, compile: bool = False, prompt_cache: bool = True,
                 prefill_chunk: int | None = None):  # fmt: skip
        if max_batch_size < 1:
            raise Gpt2ChatError("max_batch_size must be >= 1")
        self.device, self.dtype = checked_device_dtype(model, device, dtype)
        self.model, self.config = model, model.config
        self.max_batch_size = max_batch_size
        self.context = min(self.config.n_positions, max_len or self.config.n_positions)
        self.runner = ModelRunner(model, max_batch_size, self.context, compile)
        self.scheduler = Scheduler(self.runner, max_batch_size, self.context, prefill_tokens, prompt_cache,
                                   prefill_chunk)

    def check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        """The prompt as a list of ints; Gpt2ChatError when it is empty, too long or out of vocabulary."""
        return check_prompt(prompt_ids, self.context, self.config.vocab_size)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> Request:
        raise NotImplementedError

    @property
    def cache_stats(self) -> PromptCacheStats:
        """The prompt cache's counters so far (a copy)."""
        return self.scheduler.prompt_cache.stats.snapshot()

    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[GenerationResult]:  # fmt: skip
        """Generate for several prompts at once -> one `GenerationResult` per prompt; a request that
        failed raises its error (after every request has ended).

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
            for request in requests:
                request.wait()
        finally:
            for request in requests:
                request.cancel()
        return [r.result() for r in requests]
