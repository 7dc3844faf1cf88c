"""FlexAttention block masks for rows that hold several sequences: packed SFT rows and shared-prompt rows.

A packed row attends within each of its segments; a shared-prompt row (`prompt, chosen, rejected`) lets a
reply see the prompt and itself. Given to SDPA as a dense `[B, 1, T, T]` mask, both leave the flash kernels
and cost memory quadratic in T; FlexAttention (`torch.nn.attention.flex_attention`) instead takes a
`mask_mod` (the rule for one query / key pair) and a `BlockMask`: for each 128 x 128 tile of scores, whether
it is skipped (no pair may attend), computed without the mask (every pair may) or computed with it.

The tile lists are built here from per-tile summaries of the row layout (first / last run, branch range,
position range), `[B, T / 128, T / 128]` small tensors, with no `[T, T]` tensor and nothing read back to the
host. The summaries are exact for the conditions they test, so a tile marked "every pair" is one, and a
skipped tile holds no allowed pair; a tile they cannot decide is computed with the mask, which is always
right. Segments are contiguous runs of equal segment id (as packing builds them).

On CUDA the attention call is `torch.compile(flex_attention)` (the fused kernel); elsewhere the eager
reference implementation, which materialises the scores and is only meant for tests.

This module knows nothing about models or training: ids in, masks out.
"""

from __future__ import annotations

from typing import Any

import torch

BLOCK_SIZE = 128  # FlexAttention's default tile; the kernels are tuned for it

_compiled_flex: Any = None


def flex_available() -> bool:
    """Whether this torch has FlexAttention (2.5 and later)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def row_masks(
    segment_ids: torch.Tensor | None,
    branch_ids: torch.Tensor | None,
    position_ids: torch.Tensor,
    window: int | None,
    block_size: int = BLOCK_SIZE,
) -> tuple[Any, Any]:
    """BlockMasks for (global layers, GPT-Neo's local layers, or None without a window) of `[B, T]` rows.

    A query may attend a key that is not after it, in the same segment run (`segment_ids`; None: one run per
    row), whose branch is 0 (the shared prompt) or the query's own (`branch_ids`; None: no branches), and, on
    local layers, fewer than `window` positions before it (`position_ids`, which restart per sequence).
    """
    from torch.nn.attention.flex_attention import BlockMask

    layout = branch_ids if branch_ids is not None else segment_ids
    if layout is None:
        raise ValueError("row_masks needs segment_ids or branch_ids")
    b, t = layout.shape
    device = layout.device
    n_blocks = -(-t // block_size)
    padded = n_blocks * block_size
    runs = _run_ids(segment_ids) if segment_ids is not None else torch.zeros(b, t, dtype=torch.long, device=device)
    branches = branch_ids if branch_ids is not None else torch.zeros_like(runs)
    positions = position_ids.expand(b, t)
    # Tail past T: a run of its own, so a mask_mod that reads it (kernels may, at tile edges) never matches a
    # real token, and a tile with tail keys is never taken for "every pair".
    runs = _pad_tail(runs, padded, runs.max(dim=1, keepdim=True).values + 1)
    branches = _pad_tail(branches, padded, torch.zeros_like(branches[:, :1]))
    positions = _pad_tail(positions, padded, positions[:, -1:])

    def allowed(b_idx, h_idx, q_idx, kv_idx):
        ok = (q_idx >= kv_idx) & (runs[b_idx, q_idx] == runs[b_idx, kv_idx])
        key_branch = branches[b_idx, kv_idx]
        return ok & ((key_branch == 0) | (key_branch == branches[b_idx, q_idx]))

    def allowed_local(b_idx, h_idx, q_idx, kv_idx):
        near = positions[b_idx, q_idx] - positions[b_idx, kv_idx] < window
        return allowed(b_idx, h_idx, q_idx, kv_idx) & near

    tiles = [_tiles(runs, branches, positions, block_size, None)]
    if window is not None:
        tiles.append(_tiles(runs, branches, positions, block_size, window))
    masks = []
    for (some, every), mask_mod in zip(tiles, (allowed, allowed_local), strict=False):
        partial_count, partial_index = _ordered(some & ~every)
        full_count, full_index = _ordered(every)
        masks.append(BlockMask.from_kv_blocks(
            partial_count, partial_index, full_count, full_index, BLOCK_SIZE=block_size, mask_mod=mask_mod,
            seq_lengths=(t, t),
        ))  # fmt: skip
    return masks[0], (masks[1] if window is not None else None)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask, scale: float | None = None):
    """Attention of `[B, H, T, D]` tensors under `block_mask`: the compiled kernel on CUDA, eager elsewhere."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if query.device.type != "cuda":
        return flex_attention(query, key, value, block_mask=block_mask, scale=scale)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex(query, key, value, block_mask=block_mask, scale=scale)


def _run_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """0, 1, 2 ... numbering the runs of equal segment id along each row (non-decreasing)."""
    change = torch.zeros_like(segment_ids, dtype=torch.long)
    change[:, 1:] = (segment_ids[:, 1:] != segment_ids[:, :-1]).long()
    return change.cumsum(dim=1)


def _pad_tail(values: torch.Tensor, length: int, fill: torch.Tensor) -> torch.Tensor:
    extra = length - values.shape[1]
    if extra == 0:
        return values.contiguous()
    return torch.cat([values, fill.expand(values.shape[0], extra)], dim=1).contiguous()


def _tiles(runs, branches, positions, block_size: int, window: int | None):
    """Per tile (query block i, key block j): may any pair attend (`some`), and may every pair (`every`)?

    Both `[B, n, n]`. `some` may be True for a tile without allowed pairs (it is then computed with the mask,
    at a small cost), never False for one with them; `every` is True only when each pair is allowed.
    """
    b, padded = runs.shape
    n = padded // block_size

    def span(values):
        tiles = values.view(b, n, block_size)
        return tiles.amin(dim=-1), tiles.amax(dim=-1)

    run_lo, run_hi = span(runs)
    branch_lo, branch_hi = span(branches)
    pos_lo, pos_hi = span(positions)
    q, k = (lambda x: x[:, :, None]), (lambda x: x[:, None, :])
    index = torch.arange(n, device=runs.device)
    below = index[:, None] > index[None, :]  # every key block before the query block: causal for each pair
    # Runs never decrease along a row, so blocks i >= j share a run iff the key block's last run reaches the
    # query block's first one.
    some = (index[:, None] >= index[None, :]) & (k(run_hi) >= q(run_lo))
    some = some & ((k(branch_lo) == 0) | ((k(branch_hi) >= q(branch_lo)) & (k(branch_lo) <= q(branch_hi))))
    one_run = (q(run_lo) == q(run_hi)) & (k(run_lo) == k(run_hi)) & (q(run_lo) == k(run_lo))
    one_branch = (k(branch_hi) == 0) | (
        (q(branch_lo) == q(branch_hi)) & (k(branch_lo) == k(branch_hi)) & (q(branch_lo) == k(branch_lo))
    )
    every = below & one_run & one_branch
    if window is not None:
        some = some & (q(pos_lo) - k(pos_hi) < window)
        every = every & (q(pos_hi) - k(pos_lo) < window)
    return some, every & some


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, n, n]` booleans -> (how many key blocks per query block, their indices first), as BlockMask wants."""
    tiles = tiles.to(torch.int32).unsqueeze(1)  # [B, 1 (heads), n, n]
    count = tiles.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(tiles, dim=-1, descending=True, stable=True).to(torch.int32)
    return count.contiguous(), order.contiguous()
