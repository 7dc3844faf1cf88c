"""The engine's only caller of the model: it owns the KV cache and runs prefill chunks and decode steps.

The scheduler says which rows, positions and tokens; the runner turns that into forwards. The cache grows
on demand (more rows, longer rows; contents kept), so a one-prompt call never holds the memory of a
sixteen-row server.

This module knows nothing about requests, sampling or stop tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from gpt2chat.attention_plan import AttentionPlan
from gpt2chat.kv_cache import KVCache
from gpt2chat.model import GPT

__all__ = ["ModelRunner", "PrefillChunk"]

_log = logging.getLogger(__name__)
_MIN_CACHE_LEN = 64


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens `token_ids` of cache row `row`, to be cached at positions `start ..`."""

    row: int
    start: int
    token_ids: list[int]
    all_logits: bool = False  # logits of every position (prompt log-probabilities), not only the last


class ModelRunner:
    """Forwards of `model` (in eval mode, on its own device and dtype) over a growing KV cache."""

    def __init__(self, model: GPT, max_rows: int, max_len: int, compile: bool = False):
        self.model = model
        self.config = model.config
        # wpe is a plain fp32 (compute dtype) tensor in every inference layout; wte may be a view of the head
        weight = model.transformer.wpe.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.vocab_size = self.config.vocab_size
        self.max_rows = max_rows
        self.max_len = max_len
        self.cache: KVCache | None = None
        self._compiled = None
        self._graphs = compile and self.device.type == "cuda"
        if compile:
            # static shapes: one graph per (row count, key length) bucket; on CUDA the graph is captured
            # (CUDA graphs), which needs the cache tensors at fixed addresses
            mode = "reduce-overhead" if self._graphs else None
            self._compiled = torch.compile(self._static_step, dynamic=False, mode=mode)

    def reserve(self, rows: int, length: int) -> None:
        """Make the cache hold at least `rows` rows of `length` positions (grown by doubling, copied)."""
        have_rows = self.cache.batch_size if self.cache is not None else 0
        have_len = self.cache.max_len if self.cache is not None else 0
        if rows <= have_rows and length <= have_len:
            return
        new_rows = min(self.max_rows, max(rows, 2 * have_rows))
        new_len = min(self.max_len, max(length, 2 * have_len, _MIN_CACHE_LEN))
        if self._graphs:  # captured graphs hold the cache's addresses: allocate it once, full size
            new_rows, new_len = self.max_rows, self.max_len
        grown = KVCache(self.config, new_rows, new_len, self.device, self.dtype)
        if self._graphs:
            for tensor in grown.k + grown.v:
                torch._dynamo.mark_static_address(tensor)
        if self.cache is not None:
            for old, new in zip(self.cache.k + self.cache.v, grown.k + grown.v, strict=True):
                new[:have_rows, :, :have_len] = old
        self.cache = grown

    @torch.inference_mode()
    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Copy the keys / values of positions 0 .. length - 1 of cache row `source` into row `target`."""
        for tensor in self.cache.k + self.cache.v:
            tensor[target, :, :length] = tensor[source, :, :length]

    @torch.inference_mode()
    def prefill(self, chunks: list[PrefillChunk]) -> list[torch.Tensor]:
        """Cache every chunk's tokens in one forward; per chunk the logits [1, V] of its last position
        ([T, V] of every position with `all_logits`).

        Chunks of one length run as a batch of rows; chunks of different lengths are packed into one row
        (`AttentionPlan.for_ragged_cache`), so no padding is computed either way."""
        lengths = [len(chunk.token_ids) for chunk in chunks]
        rows, starts = [c.row for c in chunks], [c.start for c in chunks]
        if len(set(lengths)) == 1:
            ids = torch.tensor([c.token_ids for c in chunks], device=self.device)
            plan = AttentionPlan.for_cache(self.config, self.cache, starts, lengths[0], rows=rows)
            logits = self.model(ids, plan, logits_to_keep=0 if any(c.all_logits for c in chunks) else 1)
            return [logits[i] if c.all_logits else logits[i, -1:] for i, c in enumerate(chunks)]
        ids = torch.tensor([[token for c in chunks for token in c.token_ids]], device=self.device)
        plan = AttentionPlan.for_ragged_cache(self.config, self.cache, rows, starts, lengths)
        select, sizes, end = [], [], 0
        for chunk, length in zip(chunks, lengths, strict=True):
            end += length
            wanted = range(end - length, end) if chunk.all_logits else range(end - 1, end)
            select.extend(wanted)
            sizes.append(len(wanted))
        logits = self.model(ids, plan, select=torch.tensor(select, device=self.device))
        return list(logits.split(sizes))

    def decode_window(self, first: int, last: int) -> tuple[int, int]:
        """(first row, width): the contiguous cache rows a decode step over rows `first` .. `last` computes.
        Eager: exactly those (a slice of the cache, no copy), so one live row in row 5 is a one-row step. A
        compiled step starts at row 0 and rounds the width up to a few fixed sizes (compiled a few times, not
        once per width)."""
        if self._compiled is None:
            return first, last + 1 - first
        return 0, min(self.cache.batch_size, _next_power_of_two(last + 1))

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int], rows: list[int] | None = None,
               first_row: int = 0) -> torch.Tensor:
        """Feed `tokens[i]` at `positions[i]` of cache row `rows[i]` (default: rows `first_row` ..
        `first_row` + len(tokens) - 1) -> logits [len(tokens), V]. Given `rows` or a first row, the step is
        the eager one."""
        step = torch.tensor(tokens, device=self.device)
        if self._compiled is not None and rows is None and first_row == 0:
            key_len = min(self.cache.max_len, max(_MIN_CACHE_LEN, _next_power_of_two(max(positions) + 1)))
            try:
                return self._compiled(step, torch.tensor(positions, device=self.device), key_len)
            except Exception as error:  # noqa: BLE001 - any compiler failure: the eager step gives the same tokens
                _log.warning("gpt2chat: the compiled decode step failed (%s); decoding eagerly from now on", error)
                self._compiled = None
        plan = AttentionPlan.for_cache(self.config, self.cache, positions, 1, rows=rows, first_row=first_row)
        return self.model(step.unsqueeze(1), plan)[:, -1]

    def _static_step(self, tokens: torch.Tensor, positions: torch.Tensor, key_len: int) -> torch.Tensor:
        """The decode step with static shapes (`AttentionPlan.for_decode`): what gets compiled."""
        plan = AttentionPlan.for_decode(self.config, self.cache, positions, key_len)
        return self.model(tokens.unsqueeze(1), plan)[:, -1]


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
