"""Weights rounded to int8 or int4 in blocks of 32 along a row, one scale a block: the numbers the packed
int8 / int4 layouts (packing.py) hold. Plain torch, any device; it knows nothing about models.

- int8: symmetric, W[n, k] ~ q[n, k] * s[n, k // 32], q in [-127, 127], s = max |W of the block| / 127, fp32.
- int4: llama.cpp's Q4_0 rounding, bit for bit (so `gpt2chat export --type q4_0` and `--quantize int4` hold
  the same weights): the block's weight of largest magnitude m gives d = m / -8, q = trunc(W / d + 8.5)
  clamped to [0, 15], W ~ (q - 8) * d with d stored as fp16. The sign of d puts m on the -8 end, so the
  block's largest weight is exact and the 16 levels are all used.
"""

from __future__ import annotations

import torch

from gpt2chat.kernels.packing import INT8_GROUP

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
    peak = blocks.gather(2, blocks.abs().argmax(dim=2, keepdim=True))  # signed, first of equals
    d = peak / torch.full_like(peak, -8.0)  # tensor / tensor: true division, as numpy does
    inverse = torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / d)
    q = torch.trunc(blocks * inverse + 8.5).clamp_(0, 15).to(torch.uint8)
    return q, d.squeeze(2).to(torch.float16)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per block of 32 weights of a row: (q int8 [N, K], scale float32 [N, ceil(K / 32)])
    with weight[n, k] ~ q[n, k] * scale[n, k // 32]. Blocks rather than one scale per row: on the 124M
    shape they cut the logit error from 2.4% to 1.6% (benchmarks/README.md, kernels section)."""
    return _quantize_rows(weight, torch.int8, torch.float32, _round_int8)


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 per block of 32 weights of a row: (q uint8 [N, K] in 0..15, scale float16 [N, ceil(K / 32)])
    with weight[n, k] ~ (q[n, k] - 8) * scale[n, k // 32] (the module docstring gives the rounding)."""
    return _quantize_rows(weight, torch.uint8, torch.float16, _round_q4_0)
