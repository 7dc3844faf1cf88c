"""The portable kernels of the `gpt2chat::linear_*` ops: plain torch, any device, any compute dtype.

They run wherever the native CPU kernels do not (CUDA, a CPU without AVX2, a machine without g++, or
`GPT2CHAT_KERNELS=portable`), and tests compare the native kernels against them. A compact weight is
widened a chunk of rows at a time, so a call never holds more than `CHUNK_ELEMENTS` widened weights
(the 50257-row head of GPT-2 would otherwise need a 154 MB temporary per call).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 23  # widened weights per chunk: 32 MB in fp32


def _chunked(x: torch.Tensor, rows: int, cols: int, widen: Callable[[int, int], torch.Tensor],
             bias: torch.Tensor | None) -> torch.Tensor:
    """x @ widen(0, rows).T + bias, widening at most CHUNK_ELEMENTS weights at a time."""
    step = max(1, CHUNK_ELEMENTS // max(1, cols))
    if rows <= step:
        return F.linear(x, widen(0, rows), bias)
    parts = [
        F.linear(x, widen(start, min(rows, start + step)), None if bias is None else bias[start : start + step])
        for start in range(0, rows, step)
    ]
    return torch.cat(parts, dim=-1)


def linear_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               small_m_max: int = -1) -> torch.Tensor:
    """y = x W^T + b for a float weight [N, K] (`small_m_max` only steers the native kernel)."""
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def linear_f16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               small_m_max: int = -1) -> torch.Tensor:
    """y = x W^T + b for W stored as IEEE half bit patterns in an int16 tensor [N, K]."""
    half = weight.view(torch.float16)
    rows, cols = half.shape
    return _chunked(x, rows, cols, lambda a, b: half[a:b].to(x.dtype),
                    None if bias is None else bias.to(x.dtype))  # fmt: skip


def linear_i8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
              small_m_max: int = -1) -> torch.Tensor:
    """y = x W^T + b for W = weight * scale[:, None], weight int8 [N, K], scale [N]."""
    rows, cols = weight.shape
    scale = scale.to(x.dtype)
    return _chunked(x, rows, cols, lambda a, b: weight[a:b].to(x.dtype) * scale[a:b, None],
                    None if bias is None else bias.to(x.dtype))  # fmt: skip
