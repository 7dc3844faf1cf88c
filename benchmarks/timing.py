"""Timing pieces every benchmark shares: interleaved rounds over the sides compared, device-synced wall time.

GUIDE.md's rule is "ours and the peer in one run, interleaved, medians": `round_robin` is that order, once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def round_robin(sides: Sequence[T], repeats: int) -> Iterator[tuple[int, T]]:
    """(round, side) for `repeats` rounds of every side once, the first side of a round rotating, so that no
    side always runs first (cold) or right after the same neighbour."""
    sides = list(sides)
    for repeat in range(repeats):
        shift = repeat % len(sides) if sides else 0
        for side in sides[shift:] + sides[:shift]:
            yield repeat, side


def seconds_of(function: Callable[[], object], device: torch.device | str | None = None) -> float:
    """Wall time of one call; on CUDA the device's queue is drained before and after."""
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    function()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
