"""What every export shares: load the checkpoint (merging an adapter first), guard the output path, and
write the result so that a failure leaves nothing half-written behind.

This module knows nothing about the output formats.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from gpt2chat import atomic_files
from gpt2chat.errors import Gpt2ChatError

if TYPE_CHECKING:
    from gpt2chat.config import ModelConfig
    from gpt2chat.model import GPT
    from gpt2chat.tokenizer import Tokenizer

__all__ = ["ExportError", "check_output", "load_source", "read_source_config", "write_atomically",
           "replace_folder"]  # fmt: skip


class ExportError(Gpt2ChatError):
    """An export that cannot be done: the message names the input, the output or the missing feature."""


def check_output(out: str | os.PathLike, force: bool, *, folder: bool = False) -> Path:
    """The output path, refused when something is already there (unless `force`) or it is the wrong kind."""
    path = Path(out).expanduser()
    if path.exists() or path.is_symlink():
        if folder and not path.is_dir():
            raise ExportError(f"{path} exists and is not a folder")
        if not folder and path.is_dir():
            raise ExportError(f"{path} is a folder; give the file name to write (e.g. {path / 'model.gguf'})")
        if not force and not (folder and path.is_dir() and not any(path.iterdir())):
            raise ExportError(f"{path} already exists; pass --force to replace it")
    if path.parent.exists() and not path.parent.is_dir():
        raise ExportError(f"{path.parent} is not a folder")
    return path


def read_source_config(model: str | os.PathLike) -> tuple[Path, ModelConfig]:
    """The checkpoint folder (a hub id is downloaded) and its config, read before any weight is loaded."""
    from gpt2chat.checkpoint import read_config, resolve_checkpoint

    folder = resolve_checkpoint(model)
    return folder, read_config(folder)


def load_source(folder: Path, adapter: str | os.PathLike | None = None) -> tuple[GPT, Tokenizer]:
    """(model, tokenizer) in float32 on the CPU; a LoRA adapter folder (PEFT layout) is merged in first."""
    import torch

    from gpt2chat.checkpoint import load_model

    model, tokenizer = load_model(folder, device="cpu", dtype=torch.float32)
    if adapter is not None:
        from gpt2chat.lora import load_adapter, merge_lora

        load_adapter(model, adapter)
        merge_lora(model)
    model.eval()
    return model, tokenizer


def _write_error(path: Path, exc: OSError, needed_bytes: int | None) -> ExportError:
    if not atomic_files.is_disk_full(exc):
        return ExportError(f"cannot write {path}: {exc}")
    need = f" ({needed_bytes / 2**20:.1f} MiB needed)" if needed_bytes else ""
    return ExportError(f"no space left on the device while writing {path}{need}; nothing was written ({exc})")


def check_free_space(path: Path, needed_bytes: int) -> None:
    """Fail before writing when the output's file system clearly lacks room for `needed_bytes`."""
    free = shutil.disk_usage(path.parent).free
    if free < needed_bytes:
        raise ExportError(
            f"not enough free space for {path}: {needed_bytes / 2**20:.1f} MiB needed, "
            f"{free / 2**20:.1f} MiB free on its file system"
        )


def write_atomically(path: Path, write: Callable[[Path], None], needed_bytes: int | None = None) -> Path:
    """`gpt2chat.atomic_files.write_atomic`, with a failed write as an ExportError (a full disk says so).

    On any failure the temporary file is removed and `path` is left as it was.
    """
    try:
        return atomic_files.write_atomic(path, write)
    except OSError as exc:
        raise _write_error(path, exc, needed_bytes) from exc


def replace_folder(path: Path, write: Callable[[Path], None]) -> Path:
    """write(tmp_dir) into a new folder beside `path`, then swap it in for `path` (`gpt2chat.atomic_files.atomic_folder`)."""
    try:
        with atomic_files.atomic_folder(path) as staging:
            write(staging)
    except OSError as exc:
        raise _write_error(path, exc, None) from exc
    return path
