"""Writing files and folders atomically: into a temporary name beside the target, then renamed over it.

A crash mid-write leaves the old file (or folder) intact, never a half-written one under the real name;
the data and the rename are fsynced before the call returns, so a power cut after it keeps the new file.
Files and folders get the usual permissions (0644 / 0755 under the default umask, as `save_pretrained`
writes them), whatever the writer did: `mkstemp` and safetensors' `save_file` create 0600 files, which
another user or a container sharing the checkpoint cannot read.

A write that fails because the disk filled up raises `OSError(ENOSPC)`, whichever serializer was writing:
torch's zip writer (a RuntimeError, "unexpected pos"), safetensors (a SafetensorError, "os error 28") and
numpy (an OSError without errno) do not say so themselves, so a failure with its file system (nearly) out
of space is re-raised as one, the writer's own error chained to it.

Every writer of checkpoints, tokenizers, adapters, training state and data caches uses this module.
Knows paths only.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gpt2chat.faults import fault_point

__all__ = ["write_atomic", "write_text_atomic", "write_json_atomic", "atomic_folder", "is_disk_full"]

FULL_BELOW_BYTES = 1 << 20  # a write that failed with less than this free on its file system failed for space


def is_disk_full(exc: OSError) -> bool:
    """Whether a failed write failed for lack of space: the device is full, or the user's quota is."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def _full_disk_as_enospc(where: Path) -> Iterator[None]:
    """Re-raise an error of the block as OSError(ENOSPC), the block's own error chained, when it did not say
    so itself but the file system at `where` is out of space (read before the partial file is removed)."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the system's own answer, ENOSPC or not
        try:
            stat = os.statvfs(where)
        except OSError:
            stat = None
        free = None if stat is None else stat.f_bavail * stat.f_frsize
        if free is None or free >= FULL_BELOW_BYTES:
            raise
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free} bytes free; the writer said "
                                    f"{type(exc).__name__}: {str(exc)[:200]})", str(where)) from exc


def _umask() -> int:
    """The process's umask, read without changing it (Linux); else by the set-and-restore idiom."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temporary_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)` writes the file at a temporary path in the same folder; it is then renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        with _full_disk_as_enospc(path.parent):
            write(tmp)
            fault_point("write")  # tests: a kill or a full disk with the file written but not yet in place
            os.chmod(tmp, 0o666 & ~_umask())
            _fsync(tmp)
            os.replace(tmp, path)
            _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any, **dumps: Any) -> Path:
    """`data` as JSON (indent 2 unless told otherwise) and a final newline."""
    dumps.setdefault("indent", 2)
    return write_text_atomic(path, json.dumps(data, **dumps) + "\n")


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE, glibc >= 2.28); False
    where the system or the file system cannot, and nothing changed."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False  # not this kernel or this file system
    raise OSError(code, os.strerror(code), str(b))


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; when the block ends without an error it replaces `path`.
    An existing folder there is swapped with it in one step where Linux can (renameat2 RENAME_EXCHANGE), so
    `path` always names a whole folder, old or new; elsewhere by two renames, with `path` missing for the
    moment between them. The old folder is then deleted. On an error the staging folder is removed and
    the old folder stays (or is put back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _temporary_name(path)
    staging.mkdir()
    try:
        with _full_disk_as_enospc(staging):  # what the block's writers raise
            yield staging
        if not path.exists():
            os.replace(staging, path)
        elif _exchange(staging, path):  # one step: `path` names the old folder, then the new one
            fault_point("swap")  # tests: a kill right after the swap
        else:  # no atomic exchange here: two renames, with `path` missing between them
            old = _temporary_name(path)
            os.replace(path, old)
            fault_point("swap")  # tests: a kill between the two renames
            try:
                os.replace(staging, path)
            except OSError:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        _fsync(path.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
