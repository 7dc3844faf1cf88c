"""Training state on disk: atomic checkpoint folders `OUT/checkpoints/step-NNNNNNN/`, keep-last-K, resume lookup.

A checkpoint folder holds the model in the Hugging Face layout (or, for LoRA, the adapter in PEFT's
layout), written by a callback the caller passes, plus the trainer's state:
- `trainer_state.json`: step, epoch position, config and its fingerprint, library versions;
- `trainer_state.pt`: tensors only (optimizer state, RNG states, LoRA weights, DPO reference
  log-probs), read back with `torch.load(weights_only=True)`: loading never runs pickled code.

Everything is written into a staging folder first and renamed into place (`gpt2chat.atomic_files.atomic_folder`),
so a crash mid-write leaves the previous checkpoints intact and never a half-written one under a real name;
a write that fails (a full disk) stops with `CheckpointWriteError` naming the checkpoint that is still whole.
`list_checkpoints` (and so `--resume`) only ever sees folders named step-N holding both state files.

This module knows folders and state dicts; it does not know what a model or a loss is.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gpt2chat.atomic_files import atomic_folder, is_disk_full
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.faults import fault_point

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class ResumeError(Gpt2ChatError):
    """A resume folder that is missing, incomplete or from another run."""


class CheckpointWriteError(Gpt2ChatError):
    """A checkpoint (or the final model) could not be written; the previous checkpoint is intact."""


def write_failure(what: Path, exc: OSError, out_dir: str | Path) -> CheckpointWriteError:
    """The message for a failed write: what, why, and which checkpoint a `--resume` would continue from."""
    reason = exc.strerror or str(exc)
    if is_disk_full(exc):
        reason += " (the disk is full: free some space)"
    return CheckpointWriteError(f"could not write {what}: {reason}; training stopped, "
                                f"{intact_checkpoint(list_checkpoints(out_dir))}")


def intact_checkpoint(found: list[Path]) -> str:
    """Which checkpoint a `--resume` would continue from (`found`: `list_checkpoints`), said for a run that
    stopped (a failed write, Ctrl-C)."""
    return (f"the last complete checkpoint {found[-1]} is intact; resume from it with --resume" if found
            else "no checkpoint was written before it")


def checkpoints_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_root(out_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_JSON).is_file() and (child / STATE_TENSORS).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def write_checkpoint(out_dir: str | Path, step: int, write_model: Callable[[Path], None],
                     state: dict[str, Any], tensors: dict[str, Any], keep_last: int) -> Path:
    """Write a checkpoint atomically and delete all but the newest `keep_last`."""
    final = checkpoints_root(out_dir) / f"step-{step:07d}"
    try:
        with atomic_folder(final) as staging:
            write_model(staging)
            torch.save(tensors, staging / STATE_TENSORS)
            fault_point("checkpoint")  # tests: killed, or the disk full, halfway through a checkpoint
            (staging / STATE_JSON).write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    except OSError as exc:
        raise write_failure(final, exc, out_dir) from None
    for stale in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    for orphan in checkpoints_root(out_dir).glob(".step-*.tmp"):  # staging left by a process that was killed
        shutil.rmtree(orphan, ignore_errors=True)
    return final


def resolve_resume(resume: str, out_dir: str | Path) -> Path:
    """`last` (newest checkpoint under OUT) or an explicit checkpoint / run folder."""
    if resume in ("last", "auto", "true", "1"):
        found = list_checkpoints(out_dir)
        if not found:
            raise ResumeError(f"--resume: no checkpoint found under {checkpoints_root(out_dir)}")
        return found[-1]
    path = Path(resume)
    if path.is_dir() and not (path / STATE_JSON).is_file() and list_checkpoints(path):
        return list_checkpoints(path)[-1]
    if not (path / STATE_JSON).is_file() or not (path / STATE_TENSORS).is_file():
        raise ResumeError(f"--resume {resume}: not a training checkpoint (no {STATE_JSON} / {STATE_TENSORS})")
    return path


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        state = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
        tensors = torch.load(path / STATE_TENSORS, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ResumeError(f"{path}: cannot read the trainer state: {exc}") from None
    if not isinstance(state, dict) or "step" not in state or not isinstance(tensors, dict):
        raise ResumeError(f"{path}: {STATE_JSON} is not a trainer state")
    return state, tensors


def rng_state() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    if "cpu" in states:
        torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
