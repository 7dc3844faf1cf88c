"""The portable kernels of the `gpt2chat::linear_*` ops: plain torch, any device, any compute dtype.

They run wherever the native CPU kernels do not (CUDA, a CPU without AVX2, a machine without g++, or
`GPT2CHAT_KERNELS=portable`), and tests compare the native kernels against them. The fp16 / int8 weights
are in the packed 4x8 layout (packing.py); they are widened a chunk of rows at a time, so a call never
holds more than `CHUNK_ELEMENTS` widened weights (the 50257-row head of GPT-2 would otherwise need a
154 MB temporary per call).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from gpt2chat.kernels.packing import INT4_ZERO, INT8_GROUP, ROWS, unpack_int4, unpack_int4_scales, unpack_rows

CHUNK_ELEMENTS = 1 << 23  # widened weights per chunk: 32 MB in fp32


def _chunked(x: torch.Tensor, rows: int, widen: Callable[[int, int], torch.Tensor],
             bias: torch.Tensor | None) -> torch.Tensor:
    """x @ widen(0, rows).T + bias, widening at most ~CHUNK_ELEMENTS weights (whole 4-row blocks) at a time."""
    cols = max(1, x.shape[-1])
    step = max(ROWS, CHUNK_ELEMENTS // cols // ROWS * ROWS)
    bias = None if bias is None else bias.to(x.dtype)
    if rows <= step:
        return F.linear(x, widen(0, rows), bias)
    parts = [
        F.linear(x, widen(start, min(rows, start + step)), None if bias is None else bias[start : start + step])
        for start in range(0, rows, step)
    ]
    return torch.cat(parts, dim=-1)


def linear_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               small_m_max: int = -1) -> torch.Tensor:
    """y = x W^T + b for a row-major float weight [N, K] (`small_m_max` only steers the native kernel)."""
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def linear_f16(x: torch.Tensor, weight: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
               small_m_max: int = -1) -> torch.Tensor:
    """y = x W^T + b for W packed 4x8 as IEEE half bit patterns in an int16 tensor."""
    half = weight.view(torch.float16)
    k = x.shape[-1]
    return _chunked(x, out_features, lambda a, b: unpack_rows(half, k, a, b).to(x.dtype), bias)


def linear_i8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
              small_m_max: int = -1) -> torch.Tensor:
    """y = x W^T + b for W = int8 weight (packed 4x8) * its scales, one per 32 columns: scale [N, ceil(K/32)]."""
    k = x.shape[-1]
    scale = scale.to(x.dtype)

    def widen(a: int, b: int) -> torch.Tensor:
        return unpack_rows(weight, k, a, b).to(x.dtype) * scale[a:b].repeat_interleave(INT8_GROUP, dim=1)[:, :k]

    return _chunked(x, scale.shape[0], widen, bias)


# ------------------------------------------------------------------- int8 activations (q8 blocks)
def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 per block of 32 along the last dimension and back: q * d with d = max|x| / 127,
    q = round(x * (127 / max|x|)) (ties to even), what csrc/quantized.cpp multiplies with, bit for bit."""
    k = x.shape[-1]
    groups = -(-k // INT8_GROUP)
    blocks = F.pad(x.float(), (0, groups * INT8_GROUP - k)).unflatten(-1, (groups, INT8_GROUP))
    top = blocks.abs().amax(dim=-1, keepdim=True)
    levels = torch.full_like(top, 127.0)  # tensor / tensor: `127.0 / top` is reciprocal(top) * 127 in torch
    inverse = torch.where(top > 0, levels / top, torch.zeros_like(top))
    q = torch.round(blocks * inverse)
    return (q * (top / levels)).flatten(-2)[..., :k].to(x.dtype)


def linear_i8_q8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 small_m_max: int = -1) -> torch.Tensor:
    """`linear_i8` of the activations rounded to int8 blocks of 32 (`quantize_activations`)."""
    return linear_i8(quantize_activations(x), weight, scale, bias)


def linear_i4_q8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, out_features: int,
                 bias: torch.Tensor | None = None, small_m_max: int = -1) -> torch.Tensor:
    """y = q8(x) W^T + b for int4 weights (packing.pack_int4: W = (q - 8) * scale, one fp16 scale per 32)."""
    x = quantize_activations(x)
    k = x.shape[-1]
    scales = unpack_int4_scales(scale).to(x.dtype)

    def widen(a: int, b: int) -> torch.Tensor:
        q = unpack_int4(weight[a // ROWS : -(-b // ROWS)], k)[: b - a]
        per_weight = scales[a:b].repeat_interleave(INT8_GROUP, dim=1)[:, :k]
        return (q.to(x.dtype) - INT4_ZERO) * per_weight

    return _chunked(x, out_features, widen, bias)
