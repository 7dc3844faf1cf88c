"""Attention plans: how the tokens of one forward attend, built by the caller outside the forward.

A plan (`AttentionPlan`) holds, for GPT-2's layers and GPT-Neo's global ones and for GPT-Neo's windowed
layers, a `LayerAttention` each: a boolean mask, a FlexAttention block mask (`gpt2chat.block_masks`), or
plain causal / every key; plus the position ids and, for a KV cache, where this step's keys and values go
(`gpt2chat.kv_cache` slots). It is built from what the caller already knows: plain causal, packed segments,
shared-prompt branches, rows of a KV cache whose lengths the caller tracks on the host (`for_cache`), chunks
of several lengths in one row (`for_ragged_cache`), or fixed shapes for a compiled decode step
(`for_decode`). Building a plan checks positions against the context; the forward checks nothing.
`LayerAttention.attend` is the one place that picks the attention kernel for a mask / causal layer (SDPA,
or `gpt2chat.dropout_attention` when training with dropout on the CPU), and so what autograd keeps.

This module knows nothing about the model's weights, files or sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from gpt2chat.block_masks import flex_available
from gpt2chat.config import ModelConfig
from gpt2chat.dropout_attention import attention_with_dropout
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.kv_cache import CacheSlots, DecodeSlots, KVCache, RaggedSlots

__all__ = ["AttentionPlan", "LayerAttention", "ContextLengthError"]


class ContextLengthError(Gpt2ChatError):
    """Positions past the model's context (n_positions) or past the KV cache's capacity."""


@dataclass(frozen=True, eq=False)
class LayerAttention:
    """How one kind of layer attends: a boolean mask (True = may attend), a FlexAttention block mask, or none."""

    mask: torch.Tensor | None = None  # [T, L] or [B, 1, T, L]
    block_mask: Any = None  # torch.nn.attention.flex_attention.BlockMask (gpt2chat.block_masks)
    is_causal: bool = False  # without a mask: causal over T == L keys, or (False) every key
    first_key: int = 0  # keys before this one are outside the window (single-token decode, local layers)
    _additive: dict = field(default_factory=dict, repr=False)  # dtype -> the mask as 0 / -inf, made once

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
               scale: float | None = None) -> torch.Tensor:
        """Attention of q [B, H, T, D] over k / v [B, H, L, D] as this layer's plan says (not the block mask:
        that is FlexAttention's, `gpt2chat.block_masks`): which kernel, and so how much memory autograd keeps.

        - Training with dropout on the CPU: `attention_with_dropout` (blocks of queries, skipping keys no query
          of the block sees; no [B, H, T, L] probabilities kept). PyTorch's CPU flash kernel has no dropout, so
          SDPA would take its math path and keep them: 143 MiB a layer at 1,020 tokens of GPT-2 124M.
        - Otherwise SDPA. While training, a boolean mask goes to it as 0 / -inf made once for every layer of
          the plan: SDPA converts a boolean mask itself, the same way, but into a new tensor in each layer,
          which autograd keeps (9 MiB a layer at 1,536 keys, a DPO step).
        """
        if dropout_p and q.device.type == "cpu" and torch.is_grad_enabled():
            return attention_with_dropout(q, k, v, self.mask, self.is_causal, dropout_p, scale)
        mask = self.mask
        if mask is not None and mask.dtype == torch.bool and torch.is_grad_enabled():
            if q.dtype not in self._additive:
                self._additive[q.dtype] = torch.zeros(mask.shape, dtype=q.dtype, device=mask.device).masked_fill_(
                    ~mask, float("-inf"))
            mask = self._additive[q.dtype]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=self.is_causal,
                                              scale=scale)


_CAUSAL = LayerAttention(is_causal=True)
_EVERY_KEY = LayerAttention()


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """How every layer of one forward attends; built once, outside the forward, shared by the layers.

    `global_layers` is for GPT-2's layers and GPT-Neo's global ones, `local_layers` for GPT-Neo's windowed
    layers; `window` is the window `local_layers` was built for (None: the model has no local layers), which the forward checks.
    `cache` says where this step's keys / values go in a KV cache and which ones to attend over.
    Build one with `causal`, `packed`, `shared_prefix`, `for_cache`, `for_ragged_cache` or `for_decode`.
    """

    position_ids: torch.Tensor  # [B or 1, T]
    global_layers: LayerAttention
    local_layers: LayerAttention
    window: int | None = None
    cache: CacheSlots | DecodeSlots | RaggedSlots | None = None

    @classmethod
    def causal(cls, config: ModelConfig, length: int, device: torch.device | str | None = None) -> AttentionPlan:
        """Plain causal attention over `length` tokens at positions 0 .. length - 1."""
        if length > config.n_positions:
            raise _too_long(config, length - 1)
        position_ids = torch.arange(length, device=device).unsqueeze(0)
        return cls(position_ids, _CAUSAL, _causal_local(config, length, device), config.local_window)

    @classmethod
    def packed(
        cls,
        config: ModelConfig,
        segment_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        *,
        kernel: str = "auto",
    ) -> AttentionPlan:
        """Several examples in one row ([B, T] `segment_ids`, each segment a contiguous run): a token sees only
        earlier tokens of its own segment; positions restart at 0 with each segment unless given.

        `kernel`: "dense" gives SDPA a `[B, 1, T, T]` mask; "flex" gives FlexAttention block masks built from
        the segment boundaries (no `[T, T]` tensor; no attention dropout); "auto" is "flex" on CUDA.
        """
        if position_ids is None:
            position_ids = _segment_positions(segment_ids)
        return cls._masked(config, segment_ids, None, position_ids, kernel)

    @classmethod
    def shared_prefix(
        cls,
        config: ModelConfig,
        branch_ids: torch.Tensor,
        position_ids: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        *,
        kernel: str = "auto",
    ) -> AttentionPlan:
        """Sequences that share a prefix in one row: branch 0 is the prefix; a token of branch k >= 1 sees
        the prefix and the earlier tokens of branch k only. A preference pair runs as `prompt, chosen,
        rejected`, the rejected positions restarting where the prompt ends: the prompt is computed once.
        `segment_ids` (optional) keep padding apart from the real tokens. `kernel` as for `packed`."""
        return cls._masked(config, segment_ids, branch_ids, position_ids, kernel)

    @classmethod
    def _masked(cls, config, segment_ids, branch_ids, position_ids, kernel: str) -> AttentionPlan:
        layout = branch_ids if branch_ids is not None else segment_ids
        if kernel not in ("auto", "dense", "flex"):
            raise ValueError(f"kernel must be 'auto', 'dense' or 'flex', got {kernel!r}")
        if kernel == "flex" or (kernel == "auto" and layout.is_cuda and flex_available()):
            from gpt2chat.block_masks import row_masks

            global_mask, local_mask = row_masks(segment_ids, branch_ids, position_ids, config.local_window)
            local = LayerAttention(block_mask=local_mask) if local_mask is not None else _EVERY_KEY
            return cls(position_ids, LayerAttention(block_mask=global_mask), local, config.local_window)
        t = layout.shape[-1]
        index = torch.arange(t, device=layout.device)
        allowed = (index.unsqueeze(-1) >= index).unsqueeze(0)  # [1, T, T]
        if segment_ids is not None:
            allowed = allowed & (segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2))
        if branch_ids is not None:
            key_branch = branch_ids.unsqueeze(-2)
            allowed = allowed & ((key_branch == 0) | (key_branch == branch_ids.unsqueeze(-1)))
        mask = allowed.unsqueeze(1)  # [B, 1, T, T]
        local = _EVERY_KEY
        if config.local_window is not None:  # a branch's index runs past its siblings: the window counts positions
            distance = position_ids.unsqueeze(-1) - position_ids.unsqueeze(-2)
            local = LayerAttention(mask & (distance < config.local_window).unsqueeze(1))
        return cls(position_ids, LayerAttention(mask), local, config.local_window)

    @classmethod
    def for_cache(
        cls,
        config: ModelConfig,
        cache: KVCache,
        lengths: Sequence[int],
        length: int,
        rows: Sequence[int] | None = None,
        first_row: int = 0,
    ) -> AttentionPlan:
        """`length` new tokens per row appended to a KV cache, each row at its own filled length.

        `lengths[i]` is how many positions of the cache row of batch row i are filled (the caller's own
        book-keeping, host ints: nothing is read from the device); `rows[i]` is that cache row (default:
        rows `first_row` .. `first_row` + B - 1). The new keys go to `lengths[i] .. lengths[i] + length - 1`; the caller then adds
        `length` to its lengths. Entries past a row's length are never read, so a caller may roll a row
        back, or fix up a right-padded prefill, by lowering its length.
        """
        b = len(lengths)
        if rows is not None and len(rows) != b:
            raise ValueError(f"{b} lengths but {len(rows)} cache rows")
        if rows is None and first_row + b > cache.batch_size:
            raise ValueError(f"rows {first_row} .. {first_row + b - 1} but the KV cache has {cache.batch_size}")
        longest = max(lengths) + length
        if longest > config.n_positions:
            raise _too_long(config, longest - 1)
        if longest > cache.max_len:
            raise ContextLengthError(f"KV cache is full: needs {longest} positions, holds {cache.max_len}")
        device = cache.device
        row_index = None if rows is None else torch.tensor(list(rows), dtype=torch.long, device=device)
        start = lengths[0]
        window = config.local_window
        if min(lengths) == max(lengths):  # every row at the same length: contiguous writes
            slots = CacheSlots(cache, b, row_index, longest, start=start, first_row=first_row)
            positions = torch.arange(start, longest, device=device).unsqueeze(0).expand(b, length)
            if length == 1:  # single-token decode: every cached key is visible, no mask at all
                local = LayerAttention(first_key=max(0, longest - window)) if window else _EVERY_KEY
                return cls(positions, _EVERY_KEY, local, window, slots)
            if start == 0:  # prefill from empty: plain causal
                return cls(positions, _CAUSAL, _causal_local(config, length, device), window, slots)
            query = torch.arange(start, longest, device=device)  # [T]
        else:
            query = torch.tensor(list(lengths), device=device).unsqueeze(1) + torch.arange(length, device=device)
            slots = CacheSlots(cache, b, row_index, longest, write_positions=query, first_row=first_row)
            positions = query  # [B, T]
        key = torch.arange(longest, device=device)
        causal = key <= query.unsqueeze(-1)  # [T, L] or [B, T, L]
        local = causal & ((query.unsqueeze(-1) - key) < window) if window else causal
        if query.dim() == 2:
            causal, local = causal.unsqueeze(1), local.unsqueeze(1)  # [B, 1, T, L]
        return cls(positions, LayerAttention(causal), LayerAttention(local), window, slots)


    @classmethod
    def for_decode(cls, config: ModelConfig, cache: KVCache, positions: torch.Tensor, key_len: int) -> AttentionPlan:
        """One new token for each of cache rows 0 .. R-1, at `positions` ([R] long, on the cache's device:
        each row's filled length), attending over the first `key_len` cache positions.

        Every shape depends on R and `key_len` alone, never on the rows' lengths, and nothing is read back
        to the host: a compiled or graph-captured decode step built from this plan is reused step after
        step. Keys past a row's position are masked (they may hold another request's leftovers). The caller
        keeps every position below `key_len` and both within the cache and the context.
        """
        key = torch.arange(key_len, device=positions.device)
        query = positions.unsqueeze(1)  # [R, 1]
        visible = key <= query  # [R, L]
        window = config.local_window
        local = visible & (query - key < window) if window else visible
        slots = DecodeSlots(cache, positions.shape[0], key_len, positions)
        global_layers, local_layers = LayerAttention(visible[:, None, None]), LayerAttention(local[:, None, None])
        return cls(query, global_layers, local_layers, window, slots)  # masks [R, 1, 1, L]


    @classmethod
    def for_ragged_cache(
        cls, config: ModelConfig, cache: KVCache, rows: Sequence[int], starts: Sequence[int], lengths: Sequence[int]
    ) -> AttentionPlan:
        """Chunks of different lengths for different cache rows, packed into one row of sum(lengths) tokens.

        Chunk i is `lengths[i]` tokens for cache row `rows[i]`, whose first `starts[i]` positions are filled
        (host ints); its tokens go to positions `starts[i] ..` of that row and attend to that row's earlier
        positions and to each other causally, never to another chunk. The forward's input is `[1, sum]`.
        """
        for row, start, length in zip(rows, starts, lengths, strict=True):
            if start + length > config.n_positions:
                raise _too_long(config, start + length - 1)
            if start + length > cache.max_len or row >= cache.batch_size:
                raise ContextLengthError(f"KV cache row {row} cannot hold {start + length} positions")
        device = cache.device

        def concat(parts: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(parts).to(device)

        query_pos = concat([torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
        query_seg = concat([torch.full((n,), i) for i, n in enumerate(lengths)])
        key_pos = concat([torch.arange(s + n) for s, n in zip(starts, lengths, strict=True)])
        key_seg = concat([torch.full((s + n,), i) for i, (s, n) in enumerate(zip(starts, lengths, strict=True))])
        slots = RaggedSlots(
            cache, write_rows=concat([torch.full((n,), r) for r, n in zip(rows, lengths, strict=True)]),
            write_positions=query_pos, key_rows=torch.tensor(list(rows), device=device)[key_seg], key_positions=key_pos,
        )  # fmt: skip
        allowed = (query_seg[:, None] == key_seg) & (key_pos <= query_pos[:, None])  # [T, K]
        window = config.local_window
        local = allowed & (query_pos[:, None] - key_pos < window) if window else allowed
        return cls(query_pos.unsqueeze(0), LayerAttention(allowed), LayerAttention(local), window, slots)


def _causal_local(config: ModelConfig, length: int, device) -> LayerAttention:
    """Causal attention within GPT-Neo's window over positions 0 .. length - 1 (plain causal when it fits)."""
    window = config.local_window
    if window is None or length <= window:
        return _CAUSAL
    index = torch.arange(length, device=device)
    distance = index.unsqueeze(-1) - index
    return LayerAttention((distance >= 0) & (distance < window))


def _segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 wherever the segment id changes along the row."""
    t = segment_ids.shape[-1]
    idx = torch.arange(t, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    segment_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return idx - segment_start


def _too_long(config: ModelConfig, last_position: int) -> ContextLengthError:
    return ContextLengthError(
        f"sequence needs position {last_position} but the model's context is {config.n_positions} tokens "
        f"(positions 0 .. {config.n_positions - 1}); shorten the input"
    )
