"""Uniforms -> token ids: the random part of sampling (`gpt2chat.sampling` decides what may be drawn).

Each row gets one uniform per draw. A seeded row's comes from a counter-based hash of (seed, draw number),
computed on the logits' device for every row at once: a row's tokens depend on its seed alone, whichever
rows it shares a step with, with no per-row generator, no per-row Python loop and no host synchronisation.
Unseeded rows take theirs from torch's global generator, one number a row, so `torch.manual_seed` repeats
a run. The uniform then inverts a cumulative sum: over a row's few candidates (`inverse_cdf_draw`), or over
the whole vocabulary in two levels, blocks of `BLOCK` tokens then a token (`vocabulary_draw`).

This module knows nothing about sampling settings, models or requests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["seeded_uniforms", "seed_value", "row_uniforms", "inverse_cdf_draw", "vocabulary_draw", "BLOCK"]

BLOCK = 256  # vocabulary entries per block of a whole-vocabulary draw (`vocabulary_draw`)
_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """An avalanching 32-bit integer hash on int64 tensors holding values in [0, 2**32).

    The multiplier is below 2**27, so no product leaves int64: the same bits on every device."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def seeded_uniforms(seeds: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """One uniform in (0, 1) per row (float64) from the row's seed and its draw number (int64 tensors).

    Counter-based: the value depends on (seed, draw) alone, so a seeded row gives the same tokens whichever
    rows share its steps, and nothing is carried between steps but the draw count."""
    seeds = seeds.long()
    low, high = seeds & _MASK32, (seeds >> 32) & _MASK32
    bits = _mix32(low ^ _mix32(high ^ _mix32(draws.long() & _MASK32)))
    return (bits.double() + 0.5) / 2.0**32


def seed_value(seed: int) -> int:
    """A Python int seed as the signed 64-bit value `seeded_uniforms` takes (any int is accepted)."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def inverse_cdf_draw(values, uniforms) -> torch.Tensor:
    """One index per row of candidates `values` [n, c] (scores, -inf = never; few per row) drawn with one
    uniform in (0, 1] per row by inverting the cumulative sum of exp(values - the row's first), float64.

    One random number per row, where `torch.multinomial` draws one per entry. A zero-weight entry is never
    returned: the first index whose cumulative sum reaches the target has weight."""
    import torch

    cdf = torch.exp(values - values[:, :1]).double().cumsum(dim=-1)
    target = uniforms.unsqueeze(1) * cdf[:, -1:]
    return torch.searchsorted(cdf, target).clamp_(max=values.size(-1) - 1)


def vocabulary_draw(scores, uniforms) -> torch.Tensor:
    """One token per row of `scores` [n, V] (no top-k / top-p: every token may come) drawn with one uniform in
    (0, 1] per row: exact inverse-CDF sampling in two levels, with no float64 copy of the vocabulary.

    The softmax is summed per block of `BLOCK` tokens (float32 sums of 256 numbers: ~1e-7 relative); the
    uniform picks a block on the float64 cumsum of the block sums, then a token on the float64 cumsum of that
    block's 256 probabilities. A token of probability zero is never returned (as in `inverse_cdf_draw`)."""
    import torch

    n, vocab = scores.shape
    probs = torch.softmax(scores, dim=-1)
    full = vocab // BLOCK
    sums = probs.as_strided((n, full, BLOCK), (probs.stride(0), BLOCK, 1)).sum(-1)
    if full * BLOCK < vocab:
        sums = torch.cat([sums, probs[:, full * BLOCK :].sum(-1, keepdim=True)], dim=1)
    blocks = sums.double().cumsum(dim=-1)
    target = uniforms.unsqueeze(1) * blocks[:, -1:]
    block = torch.searchsorted(blocks, target).clamp_(max=blocks.size(1) - 1)  # [n, 1]
    before = torch.where(block > 0, blocks.gather(1, (block - 1).clamp_(min=0)), 0.0)
    index = block * BLOCK + torch.arange(BLOCK, device=scores.device)  # [n, BLOCK]
    inside = probs.gather(1, index.clamp(max=vocab - 1)).masked_fill_(index >= vocab, 0.0).double().cumsum(dim=-1)
    # what the target leaves inside the block, kept within (0, the block's own float64 sum]
    rest = (target - before).clamp_(min=1e-300).minimum(inside[:, -1:])
    return index.gather(1, torch.searchsorted(inside, rest).clamp_(max=BLOCK - 1)).squeeze(1)


def row_uniforms(seeds: list[int | None], draws, device) -> torch.Tensor:
    """One uniform in (0, 1] per row (float64): a seeded row's from its (seed, draw number), the others' from
    torch's global generator (one number per unseeded row, so `torch.manual_seed` repeats a run)."""
    import torch

    seeded = [seed is not None for seed in seeds]
    batch = len(seeds)
    if not any(seeded):
        return 1.0 - torch.rand(batch, dtype=torch.float64, device=device)
    if draws is None:
        draws = torch.zeros(batch, dtype=torch.long, device=device)
    draws = torch.as_tensor(draws, dtype=torch.long, device=device)
    values = torch.tensor([seed_value(seed) if seed is not None else 0 for seed in seeds], device=device)
    uniforms = seeded_uniforms(values, draws)
    if all(seeded):
        return uniforms
    unseeded = torch.tensor([not s for s in seeded], device=device)
    return torch.where(unseeded, 1.0 - torch.rand(batch, dtype=torch.float64, device=device), uniforms)
