"""Attention with dropout that keeps no `[B, H, T, L]` tensor for the backward (training on the CPU).

PyTorch's CPU flash kernel has no dropout, so with attention dropout on (GPT-2's 0.1 for SFT) SDPA takes its
math path, which keeps the softmax probabilities and the dropped-out ones for the backward: 167 MiB a layer
at 1 x 1,024 tokens on the 124M shape, 2 GiB over 12 layers, most of an SFT step's activation memory.

`attention_with_dropout` computes the same function, ``dropout(softmax(q k^T * scale + mask)) v`` with the
kept probabilities scaled by 1 / (1 - p), a block of queries at a time. It keeps q, k, v, the output and each
query's log-sum-exp (the flash-attention recipe); the dropout mask of each block is drawn from a generator
seeded once per call from the default generator, and drawn again, block by block, in the backward. So the
saved memory is O(T D), one more `q k^T` is computed in the backward, and a seeded run, or gradient
checkpointing's replay (which restores the default generator), gets the same masks. The masks are not the
ones SDPA's math path would draw (a different stream); for a given mask the output and gradients are the
dense formula's (tests/test_block_masks.py).
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention_with_dropout"]

# elements of one block's [B, H, rows, L] scores: 2**21 fp32 = 8 MiB (about 170 query rows at 12 x 1,024)
BLOCK_ELEMENTS = 2**21


def _block_rows(q: torch.Tensor, key_len: int) -> int:
    b, h, t, _ = q.shape
    return max(1, min(t, BLOCK_ELEMENTS // max(1, b * h * key_len)))


def _key_range(mask, is_causal: bool, start: int, stop: int, key_len: int) -> tuple[int, int]:
    """The keys queries `start .. stop - 1` may attend lie in `lo .. hi - 1`: the rest is skipped (causal rows
    never see later keys; a packed segment sees only its own)."""
    if mask is not None:
        allowed = mask[..., start:stop, :].reshape(-1, mask.shape[-1]).any(dim=0).nonzero()
        if allowed.numel() == 0:
            return 0, 0
        lo, hi = int(allowed[0]), int(allowed[-1]) + 1
        return lo, min(hi, stop) if is_causal else hi
    return 0, stop if is_causal else key_len


def _view(flat: torch.Tensor, *shape: int) -> torch.Tensor:
    """The first elements of a reused flat buffer as a contiguous tensor of `shape`: a fresh [B, H, rows, keys]
    tensor per block costs page faults on the CPU (timings of one layer moved 0.4 -> 1.8 s with them)."""
    return flat[: math.prod(shape)].view(shape)


def _scores(q_block, k, is_causal: bool, mask, start: int, lo: int, flat: torch.Tensor) -> torch.Tensor:
    """`q k^T` of queries `start ..` (q already scaled) against keys `lo ..` (k is that slice), disallowed pairs
    at -inf, in `flat`; causal rows mask only the keys from `start` on (the earlier ones are all allowed)."""
    rows, keys = q_block.shape[-2], k.shape[-2]
    scores = torch.matmul(q_block, k.transpose(-1, -2), out=_view(flat, *q_block.shape[:-1], keys))
    if mask is not None:
        scores.masked_fill_(~mask[..., start : start + rows, lo : lo + keys], float("-inf"))
    elif is_causal and start + 1 < lo + keys:
        first = start - lo                                 # the key of query `start`, in this slice
        later = torch.ones(rows, keys - first, dtype=torch.bool, device=k.device).triu_(1)
        scores[..., first:].masked_fill_(later, float("-inf"))
    return scores


def _draw_dropped(generator: torch.Generator, shape: torch.Size, p: float) -> torch.Tensor:
    """Which probabilities of one block dropout zeroes (True with probability p)."""
    return torch.empty(shape, dtype=torch.bool, device=generator.device).bernoulli_(p, generator=generator)


class _DropoutAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal, p, scale, seed):
        t, key_len = q.shape[-2], k.shape[-2]
        rows = _block_rows(q, key_len)
        generator = torch.Generator(device=q.device)
        generator.manual_seed(seed)
        out = torch.zeros_like(q)
        lse = q.new_zeros(q.shape[:-1])
        blocks, dropped = [], []
        flat = q.new_empty(q.shape[0] * q.shape[1] * rows * key_len)
        for start in range(0, t, rows):
            stop = min(start + rows, t)
            lo, hi = _key_range(mask, is_causal, start, stop, key_len)
            if lo == hi:                                   # no query here may attend anything: zeros
                continue
            blocks.append((start, stop, lo, hi))
            scores = _scores(q[..., start:stop, :] * scale, k[..., lo:hi, :], is_causal, mask, start, lo, flat)
            top = scores.amax(dim=-1, keepdim=True)
            top = torch.where(torch.isinf(top), torch.zeros_like(top), top)   # a row with no key: all zeros, and
            # its log-sum-exp +inf, so that the backward's exp(scores - lse) is 0 there too
            probs = scores.sub_(top).exp_()
            total = probs.sum(dim=-1, keepdim=True)
            lse[..., start:stop] = (top + total.log()).squeeze(-1).nan_to_num_(posinf=torch.inf, neginf=torch.inf)
            probs.div_(total.clamp_min(torch.finfo(probs.dtype).tiny) * (1.0 - p))   # softmax / (1 - p)
            drop = _draw_dropped(generator, probs.shape, p)
            out[..., start:stop, :] = torch.matmul(probs.masked_fill_(drop, 0.0), v[..., lo:hi, :])
            dropped.append(drop)
        ctx.save_for_backward(q, k, v, out, lse, mask, *dropped)
        ctx.is_causal, ctx.p, ctx.scale, ctx.blocks = is_causal, p, scale, blocks
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, mask, *dropped = ctx.saved_tensors
        p, scale = ctx.p, ctx.scale
        grad_out = grad_out.contiguous()
        grad_q = torch.zeros_like(q)
        grad_k = torch.zeros_like(k)
        grad_v = torch.zeros_like(v)
        delta = (grad_out * out).sum(-1, keepdim=True)  # rowsum(dP * P) = dO . O, with P the kept probabilities
        size = max((stop - start) * (hi - lo) for start, stop, lo, hi in ctx.blocks) * q.shape[0] * q.shape[1]
        flat_probs, flat_grad = q.new_empty(size), q.new_empty(size)
        for (start, stop, lo, hi), drop in zip(ctx.blocks, dropped, strict=True):
            q_block = q[..., start:stop, :] * scale
            grad_block = grad_out[..., start:stop, :] * (1.0 / (1.0 - p))
            k_part, v_part = k[..., lo:hi, :], v[..., lo:hi, :]
            probs = _scores(q_block, k_part, ctx.is_causal, mask, start, lo, flat_probs)
            probs.sub_(lse[..., start:stop].unsqueeze(-1)).exp_()          # the softmax, before dropout
            grad_scores = torch.matmul(grad_block, v_part.transpose(-1, -2), out=_view(flat_grad, *probs.shape))
            grad_scores.masked_fill_(drop, 0.0).sub_(delta[..., start:stop, :]).mul_(probs)
            grad_q[..., start:stop, :] = torch.matmul(grad_scores, k_part).mul_(scale)
            grad_k[..., lo:hi, :] += torch.matmul(grad_scores.transpose(-1, -2), q_block)
            grad_v[..., lo:hi, :] += torch.matmul(probs.masked_fill_(drop, 0.0).transpose(-1, -2), grad_block)
        return grad_q, grad_k, grad_v, None, None, None, None, None


def attention_with_dropout(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    dropout_p: float,
    scale: float | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """``dropout(softmax(q k^T * scale + mask), dropout_p) v`` for q [B, H, T, D], k / v [B, H, L, D] and a
    boolean `mask` broadcastable to [B, H, T, L] (True = may attend) or `is_causal` (T == L), computed a block
    of queries at a time; the backward keeps no [T, L] tensor. `seed` (default: drawn from the default
    generator) seeds the dropout masks."""
    if mask is not None and is_causal:
        raise ValueError("give a mask or is_causal, not both")
    if not 0.0 < dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in (0, 1), got {dropout_p}")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), device="cpu"))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _DropoutAttention.apply(q, k, v, mask, is_causal, dropout_p, scale, seed)
