"""The packed 4x8 layout of the fp16 / int8 weights: write it, and read rows back out of it.

A weight [N, K] is stored as [ceil(N/4), ceil(K/8), 4, 8]: the 8-column chunk j of rows 4b .. 4b+3 is one
contiguous run of 32 elements, so the decode kernel reads a block of 4 rows as a single sequential stream
(csrc/linear.cpp says why that matters). Padding rows and columns are zeros. Plain torch, any device.
"""

from __future__ import annotations

import torch

ROWS, COLS = 4, 8  # rows per block, columns per chunk
INT8_GROUP = 32  # int8 weights per fp32 scale along a row (csrc/linear.cpp: kGroupChunks chunks of 8)


def packed_shape(out_features: int, in_features: int) -> tuple[int, int, int, int]:
    return (-(-out_features // ROWS), -(-in_features // COLS), ROWS, COLS)


def pack_rows(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> the packed [ceil(N/4), ceil(K/8), 4, 8] tensor (same dtype, a new contiguous tensor)."""
    n, k = weight.shape
    blocks, chunks, _, _ = packed_shape(n, k)
    padded = weight.new_zeros(blocks * ROWS, chunks * COLS)
    padded[:n, :k] = weight
    return padded.view(blocks, ROWS, chunks, COLS).permute(0, 2, 1, 3).contiguous()


def unpack_rows(packed: torch.Tensor, in_features: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of the packed weight as an [stop - start, K] tensor (start a multiple of 4)."""
    if start % ROWS:
        raise ValueError(f"start must be a multiple of {ROWS}, got {start}")
    stop = packed.shape[0] * ROWS if stop is None else stop
    blocks = packed[start // ROWS : -(-stop // ROWS)]
    rows = blocks.permute(0, 2, 1, 3).reshape(blocks.shape[0] * ROWS, packed.shape[1] * COLS)
    return rows[: stop - start, :in_features]


def gather_rows(packed: torch.Tensor, in_features: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (any shape) of the packed weight: [*ids.shape, K] (the embedding lookup of a tied head)."""
    rows = packed[ids // ROWS, :, ids % ROWS]  # [*ids.shape, chunks, 8]
    return rows.flatten(-2)[..., :in_features]
