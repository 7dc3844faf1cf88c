"""The GPU check's shared state and rows: `Check` (settings, device, folders, results so far), `row`,
the statuses, and `need` for optional packages. `gpu_check` (the command and its correctness parts) and
`gpu_speed` (its speed parts) both import from here, so neither imports the other's module at import time.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

OK, FAIL, MISSING, TIMEOUT, SKIPPED = "ok", "FAIL", "not installed", "timeout", "skipped"


class NotInstalled(Exception):
    """A part needs an optional package that is not importable here."""


class PartTimeout(Exception):
    """A part ran past its time budget."""


def need(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise NotInstalled(", ".join(missing))


@dataclass
class Check:
    """What every part shares: settings of this run, the device, folders, results so far."""

    smoke: bool
    out: Path
    work: Path
    repeats: int
    deadline: float
    device: torch.device = field(init=False)
    dtype: torch.dtype = field(init=False)  # what training autocasts to and inference runs in
    rows: list[dict] = field(default_factory=list)
    peaks: dict | None = None
    trained: Path | None = None  # the SFT model of the training part, for the parts after it
    measured: dict = field(default_factory=dict)  # our speed results, for the TRL rows' ratios
    _base: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device = torch.device("cpu" if self.smoke else "cuda")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        small, medium = ("tiny", "tiny") if self.smoke else ("gpt2", "gpt2-medium")
        self.shapes = {"small": small, "medium": medium}
        self.seq = 128 if self.smoke else 1024

    def label(self, shape: str) -> str:
        return {"gpt2": "124M", "gpt2-medium": "355M"}.get(shape, shape)

    def base(self, shape: str | None = None) -> Path:
        """A random-weight checkpoint folder of `shape` (default: the small one), built once."""
        from gpt2chat.checkpoint import init_checkpoint

        shape = shape or self.shapes["small"]
        if shape not in self._base:
            self._base[shape] = init_checkpoint(shape, self.work / f"base-{shape}", template="llama3-context",
                                                seed=0)
        return self._base[shape]

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()


def row(part: str, check: str, status: str, result: str = "", target: str = "", detail: str = "", **data) -> dict:
    return {"part": part, "check": check, "status": status, "result": result, "target": target,
            "detail": detail, "data": data}


def verdict(passed: bool) -> str:
    return OK if passed else FAIL
