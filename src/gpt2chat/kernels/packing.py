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


# ------------------------------------------------------------------------------------------- int4
# int4 weights, [ceil(N/4), ceil(K/32), 64] bytes: the 32 columns of one group of a block of 4 rows in one
# 64-byte line; byte h*32 + r*8 + c holds column 16h + c of row r in its low nibble and column 16h + 8 + c
# in its high one, as q in [0, 15] (the weight is (q - 8) * scale). Scales: fp16 bit patterns in an int16
# tensor [ceil(N/4), ceil(K/32), 4]. Padding rows have scale 0, padding columns q = 8 (weight 0).
# csrc/quantized.cpp says why this shape.
INT4_ZERO = 8


def pack_int4(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q uint8 [N, K] in 0..15, scale float16 [N, ceil(K/32)]) -> (packed uint8, scales int16) as above."""
    n, k = q.shape
    blocks, groups = -(-n // ROWS), -(-k // INT8_GROUP)
    padded = q.new_full((blocks * ROWS, groups * INT8_GROUP), INT4_ZERO, dtype=torch.uint8)
    padded[:n, :k] = q
    # (block, row, group, half, nibble, column) -> (block, group, half, row, column, nibble)
    parts = padded.view(blocks, ROWS, groups, 2, 2, COLS).permute(0, 2, 3, 1, 5, 4)
    packed = (parts[..., 0] | (parts[..., 1] << 4)).reshape(blocks, groups, 2 * ROWS * COLS)
    scales = scale.new_zeros(blocks * ROWS, groups, dtype=torch.float16)
    scales[:n] = scale
    return packed.contiguous(), scales.view(blocks, ROWS, groups).permute(0, 2, 1).contiguous().view(torch.int16)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """The packed int4 weight back as q uint8 [4 * blocks, K] (padding rows included)."""
    blocks, groups, _ = packed.shape
    parts = packed.view(blocks, groups, 2, ROWS, COLS)
    nibbles = torch.stack((parts & 0x0F, parts >> 4), dim=-1)  # (block, group, half, row, column, nibble)
    rows = nibbles.permute(0, 3, 1, 2, 5, 4).reshape(blocks * ROWS, groups * INT8_GROUP)
    return rows[:, :in_features]


def unpack_int4_scales(scales: torch.Tensor) -> torch.Tensor:
    """The packed scales back as float16 [4 * blocks, groups]."""
    blocks, groups, _ = scales.shape
    return scales.view(torch.float16).permute(0, 2, 1).reshape(blocks * ROWS, groups)


def gather_int4_rows(packed: torch.Tensor, scales: torch.Tensor, in_features: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (any shape) of a packed int4 weight as float32 [*ids.shape, K] (a tied head's embedding)."""
    blocks, groups, _ = packed.shape
    block, row = ids // ROWS, ids % ROWS
    lines = packed.view(blocks, groups, 2, ROWS, COLS)[block, :, :, row]  # [*ids, groups, 2, 8]
    q = torch.stack((lines & 0x0F, lines >> 4), dim=-2).flatten(-4)[..., :in_features]  # [*ids, K]
    scale = scales.view(torch.float16)[block, :, row].float()  # [*ids, groups]
    return (q.float() - INT4_ZERO) * scale.repeat_interleave(INT8_GROUP, dim=-1)[..., :in_features]
