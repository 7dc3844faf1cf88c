"""The KV cache and how one forward writes into it and reads from it.

`KVCache` is storage only: keys and values of every layer for a fixed number of rows and positions. How
far each row is filled is the caller's book-keeping (host ints, or a device tensor for a compiled step),
turned into a slots object by `AttentionPlan.for_cache` / `for_decode` (model.py); a layer's attention
calls the slots' `update(layer, k, v)`, which writes this step's keys / values and returns those to attend
over.

- `CacheSlots`: any number of new tokens per row, rows at the same or different lengths (prefill, and
  decode in eager mode); key length = the longest row, so shapes follow the rows' lengths.
- `RaggedSlots`: chunks of different lengths for different rows packed in one row of tokens (a batched
  prefill of prompts of any lengths in one forward); the keys of the rows involved are gathered.
- `DecodeSlots`: one new token per row at positions given as a device tensor, a fixed key length: the
  static shapes a compiled decode step or a CUDA graph needs.

This module knows nothing about models, requests or sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2chat.config import ModelConfig

__all__ = ["KVCache", "CacheSlots", "RaggedSlots", "DecodeSlots"]


class KVCache:
    """Preallocated keys / values for every layer: `k[layer]`, `v[layer]` are `[B, H, max_len, D]`.

    Storage only: how far each row is filled is the caller's book-keeping, passed to
    `AttentionPlan.for_cache` at every step.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        max_len = config.n_positions if max_len is None else int(max_len)
        if max_len <= 0 or batch_size <= 0:
            raise ValueError(f"KVCache needs batch_size > 0 and max_len > 0, got {batch_size}, {max_len}")
        shape = (batch_size, config.n_head, max_len, config.head_dim)
        dtype = dtype or torch.float32
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.batch_size = batch_size
        self.max_len = max_len

    @property
    def device(self) -> torch.device:
        return self.k[0].device


@dataclass(frozen=True, eq=False)
class CacheSlots:
    """Where one forward writes its keys / values in a KVCache, and how many keys it then attends over.

    Rows: `rows` (cache row of each batch row), or the `n_rows` rows from `first_row` on (a slice: no copy).
    Positions: `start ..
    start + T - 1` in every row, or `write_positions` ([B, T]) when the rows are at different lengths.
    """

    cache: KVCache
    n_rows: int
    rows: torch.Tensor | None
    key_len: int
    start: int = 0
    write_positions: torch.Tensor | None = None
    first_row: int = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys / values ([B, H, T, D]) of `layer`; return the keys / values to attend over."""
        cache_k, cache_v = self.cache.k[layer], self.cache.v[layer]
        if self.rows is None:
            window = slice(self.first_row, self.first_row + self.n_rows)
            cache_k, cache_v = cache_k[window], cache_v[window]
        if self.write_positions is None:
            span = slice(self.start, self.start + k.shape[2])
            where = (slice(None), slice(None), span) if self.rows is None else (self.rows, slice(None), span)
            cache_k[where], cache_v[where] = k, v
        else:
            row_index = (torch.arange(k.shape[0], device=k.device) if self.rows is None else self.rows)[:, None]
            cache_k[row_index, :, self.write_positions] = k.transpose(1, 2)  # indexed view is [B, T, H, D]
            cache_v[row_index, :, self.write_positions] = v.transpose(1, 2)
        keys, values = cache_k[:, :, : self.key_len], cache_v[:, :, : self.key_len]
        if self.rows is not None:
            keys, values = keys.index_select(0, self.rows), values.index_select(0, self.rows)
        return keys, values


@dataclass(frozen=True, eq=False)
class DecodeSlots:
    """One token per cache row 0 .. n_rows - 1 written at `positions` ([n_rows] long tensor); the first
    `key_len` positions of those rows are returned to attend over. No shape depends on the positions."""

    cache: KVCache
    n_rows: int
    key_len: int
    positions: torch.Tensor

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache_k, cache_v = self.cache.k[layer], self.cache.v[layer]
        # index_put_ on the whole cache tensor, not on a slice of it: torch.compile then writes in place
        # (a write through a view, or a scatter_, makes it copy the cache every step)
        rows = torch.arange(self.n_rows, device=self.positions.device)
        cache_k[rows, :, self.positions] = k[:, :, 0]
        cache_v[rows, :, self.positions] = v[:, :, 0]
        return cache_k[: self.n_rows, :, : self.key_len], cache_v[: self.n_rows, :, : self.key_len]


@dataclass(frozen=True, eq=False)
class RaggedSlots:
    """Tokens of one packed row ([1, H, T, D]) written at (`write_rows`, `write_positions`) ([T] each); the
    keys to attend over are gathered at (`key_rows`, `key_positions`) ([K] each) into one row too."""

    cache: KVCache
    write_rows: torch.Tensor
    write_positions: torch.Tensor
    key_rows: torch.Tensor
    key_positions: torch.Tensor

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache_k, cache_v = self.cache.k[layer], self.cache.v[layer]
        cache_k[self.write_rows, :, self.write_positions] = k[0].transpose(0, 1)  # indexed view is [T, H, D]
        cache_v[self.write_rows, :, self.write_positions] = v[0].transpose(0, 1)
        keys = cache_k[self.key_rows, :, self.key_positions].transpose(0, 1).unsqueeze(0)  # [1, H, K, D]
        values = cache_v[self.key_rows, :, self.key_positions].transpose(0, 1).unsqueeze(0)
        return keys, values
