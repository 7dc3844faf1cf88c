"""Weights rounded to int8 or int4 in blocks of 32 along a row, one scale a block: the numbers the packed
int8 / int4 layouts (packing.py) hold. Plain torch, any device; it knows nothing about models.

- int8: symmetric, W[n, k] ~ q[n, k] * s[n, k // 32], q in [-127, 127], s = max |W of the block| / 127, fp32.
- int4 (`quantize_int4`): llama.cpp's Q4_0 format, W ~ (q - 8) * d, q in [0, 15], d stored as fp16, with
  each block's d chosen to minimise the block's squared error. `quantize_q4_0_reference` is llama.cpp's
  own rounding, bit for bit (what the `gguf` package and `llama-quantize` write, so what
  `gpt2chat export --type q4_0` holds): the block's weight of largest magnitude m gives d = m / -8,
  q = trunc(W / d + 8.5) clamped to [0, 15], so m is exact and everything else rounds to the grid m fixes.
  The search tries that d and a few others (m / c for the c of `INT4_SCALE_CANDIDATES`, each followed by
  the least-squares d for the levels it gave, rounded to fp16) and keeps, per block, the one of smallest
  squared error; the reference is one of the candidates and wins ties, so no block is worse than
  llama.cpp's. On random weights of the 124M shape it cuts the squared weight error by ~10% and the
  logit error below llama.cpp's q4_0 (benchmarks/quantize_error.py). Same format, same kernels.
  On the CPU with the native kernels the search runs in C++ (`gpt2chat::quantize_int4_blocks`,
  csrc/blocks.cpp: the same bytes and scales bit for bit, one pass a block instead of ~100 torch ops a
  4096-row step); elsewhere, or when the native library is unavailable, it is the torch code below.
"""

from __future__ import annotations

import torch

from gpt2chat.kernels.packing import INT4_ZERO, INT8_GROUP

ROWS_PER_STEP = 4096  # rows quantized at a time: bounds the fp32 temporaries of a 50k-row head


def _blocks(weight: torch.Tensor) -> torch.Tensor:
    """weight [R, K] as fp32 [R, ceil(K/32), 32], zero padded."""
    rows, cols = weight.shape
    groups = -(-cols // INT8_GROUP)
    padded = weight.new_zeros(rows, groups * INT8_GROUP, dtype=torch.float32)
    padded[:, :cols] = weight
    return padded.view(rows, groups, INT8_GROUP)


def _quantize_rows(weight: torch.Tensor, q_dtype: torch.dtype, scale_dtype: torch.dtype,
                   round_blocks) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [N, K], scale [N, ceil(K / 32)]) from `round_blocks(blocks fp32 [R, G, 32]) -> (q [R, G, 32],
    scale [R, G])`, applied ROWS_PER_STEP rows at a time."""
    weight = weight.detach()
    rows, cols = weight.shape
    quantized = torch.empty(weight.shape, dtype=q_dtype, device=weight.device)
    scale = torch.empty(rows, -(-cols // INT8_GROUP), dtype=scale_dtype, device=weight.device)
    for start in range(0, rows, ROWS_PER_STEP):
        q, block_scale = round_blocks(_blocks(weight[start : start + ROWS_PER_STEP]))
        quantized[start : start + ROWS_PER_STEP] = q.flatten(1)[:, :cols]
        scale[start : start + ROWS_PER_STEP] = block_scale
    return quantized, scale


def _round_int8(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    step = blocks.abs().amax(dim=2) / 127.0
    step = torch.where(step > 0, step, torch.ones_like(step))  # an all-zero block stays zero
    return torch.round(blocks / step[..., None]).clamp_(-127, 127).to(torch.int8), step


def _round_q4_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's quantize_row_q4_0_ref: (q uint8 [R, G, 32], d fp16 [R, G])."""
    peak = blocks.gather(2, blocks.abs().argmax(dim=2, keepdim=True))  # signed, first of equals
    d = peak / torch.full_like(peak, -8.0)  # tensor / tensor: true division, as numpy does
    inverse = torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / d)
    q = torch.trunc(blocks * inverse + 8.5).clamp_(0, 15).to(torch.uint8)
    return q, d.squeeze(2).to(torch.float16)


# divisors c of the block's signed peak m tried as d = m / c: negative c puts m on the -8 end, positive on +7
INT4_SCALE_CANDIDATES = (-9.0, -8.5, -8.0, -7.5, -7.0, -6.5, 7.0, 6.5, 6.0)


def _round_int4_searched(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block, the (q, fp16 d) of least squared error among the reference rounding and the candidates.

    The error of levels l = q - 8 with scale d is sum(w^2) - 2 d sum(w l) + d^2 sum(l^2): two dot products
    a candidate over the big tensor, the rest on one number a block (in float64). Only the winning
    candidate's rounding step is kept per block; its levels are recomputed once at the end."""
    reference_q, reference_d = _round_q4_0(blocks)

    def error(d: torch.Tensor, wl: torch.Tensor, ll: torch.Tensor) -> torch.Tensor:
        d = d.double()
        return d * (d * ll.double() - 2 * wl.double())  # the squared error less sum(w^2), alike for all

    levels = reference_q.float() - INT4_ZERO
    best_error = error(reference_d, torch.linalg.vecdot(blocks, levels), torch.linalg.vecdot(levels, levels))
    best_d, best_inverse = reference_d, torch.full_like(best_error, float("nan"), dtype=blocks.dtype)
    peak = blocks.gather(2, blocks.abs().argmax(dim=2, keepdim=True)).squeeze(2)  # signed
    for divisor in INT4_SCALE_CANDIDATES:
        d = (peak / divisor).to(torch.float16).float()
        inverse = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        levels = torch.mul(blocks, inverse[..., None], out=levels).round_().clamp_(-INT4_ZERO, 15 - INT4_ZERO)
        wl, ll = torch.linalg.vecdot(blocks, levels), torch.linalg.vecdot(levels, levels)
        fitted = torch.where(ll > 0, wl / ll.clamp(min=1), d).to(torch.float16)  # least squares, then fp16
        candidate_error = error(fitted, wl, ll)
        better = candidate_error < best_error
        best_error = torch.where(better, candidate_error, best_error)
        best_d = torch.where(better, fitted, best_d)
        best_inverse = torch.where(better, inverse, best_inverse)
    searched = best_inverse.isfinite()[..., None]  # NaN: the reference rounding won
    levels = torch.mul(blocks, best_inverse.nan_to_num(0.0)[..., None], out=levels).round_()
    q = levels.clamp_(-INT4_ZERO, 15 - INT4_ZERO).add_(INT4_ZERO).to(torch.uint8)
    return torch.where(searched, q, reference_q), best_d


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per block of 32 weights of a row: (q int8 [N, K], scale float32 [N, ceil(K / 32)])
    with weight[n, k] ~ q[n, k] * scale[n, k // 32]. Blocks rather than one scale per row: on the 124M
    shape they cut the logit error from 2.4% to 1.6% (benchmarks/README.md, kernels section)."""
    return _quantize_rows(weight, torch.int8, torch.float32, _round_int8)


def quantize_int4(weight: torch.Tensor, native: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 per block of 32 weights of a row: (q uint8 [N, K] in 0..15, scale float16 [N, ceil(K / 32)])
    with weight[n, k] ~ (q[n, k] - 8) * scale[n, k // 32], each block's scale searched for the least
    squared error (the module docstring). `native=False` runs the torch search even where the C++ one is
    available (they give the same bits; tests compare them)."""
    if native and weight.device.type == "cpu":
        from gpt2chat import kernels

        if kernels.load() == "native":
            return torch.ops.gpt2chat.quantize_int4_blocks(weight.detach().to(torch.float32).contiguous())
    return _quantize_rows(weight, torch.uint8, torch.float16, _round_int4_searched)


def quantize_q4_0_reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_int4`'s (q, scale) with llama.cpp's own Q4_0 rounding (d = max-magnitude weight / -8)."""
    return _quantize_rows(weight, torch.uint8, torch.float16, _round_q4_0)
