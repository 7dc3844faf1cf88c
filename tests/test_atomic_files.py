"""Atomic writes: all or nothing under the real name, and the usual permissions (not mkstemp's 0600)."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gpt2chat import atomic_files
from gpt2chat.atomic_files import atomic_folder, write_atomic, write_json_atomic, write_text_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_and_folders_get_the_default_umask_permissions(tmp_path, umask_022):
    write_text_atomic(tmp_path / "a.txt", "hello")
    write_json_atomic(tmp_path / "sub" / "b.json", {"x": 1})
    with atomic_folder(tmp_path / "folder") as staging:
        (staging / "c.bin").write_bytes(b"\0")
    assert mode(tmp_path / "a.txt") == 0o644
    assert mode(tmp_path / "sub" / "b.json") == 0o644
    assert mode(tmp_path / "folder") == 0o755
    assert (tmp_path / "sub" / "b.json").read_text() == '{\n  "x": 1\n}\n'


def test_a_writer_that_creates_a_private_file_still_gives_a_readable_one(tmp_path, umask_022):
    def private_writer(tmp):  # what mkstemp and safetensors' save_file do
        os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))

    write_atomic(tmp_path / "model.safetensors", private_writer)
    assert mode(tmp_path / "model.safetensors") == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "config.json"
    write_text_atomic(target, "old")

    def half_write(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half_write)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "step-1"
    with atomic_folder(target) as staging:
        (staging / "old.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as staging:
            (staging / "new.txt").write_text("2")
            raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    with atomic_folder(target) as staging:
        (staging / "new.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]  # the old folder is gone, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]


TWO_MIB = {"w": torch.zeros(1 << 19)}
SERIALIZERS = {  # what each raises itself on a full disk: RuntimeError, SafetensorError, OSError without errno
    "torch.save": lambda tmp: torch.save(TWO_MIB, tmp),
    "safetensors": lambda tmp: save_file(TWO_MIB, str(tmp)),
    "numpy": lambda tmp: _np_save(tmp, TWO_MIB["w"].numpy()),
}


def _np_save(path, array) -> None:
    with open(path, "wb") as file:  # a file object: given a path, np.save adds ".npy" to it
        np.save(file, array, allow_pickle=False)


@pytest.mark.parametrize("serializer", SERIALIZERS)
def test_a_real_full_disk_is_enospc_whichever_serializer_writes_and_the_old_file_stays(tmpfs, serializer):
    disk = tmpfs(1 << 20).path  # 1 MiB: room for the old file, not for 2 MiB more
    write_text_atomic(disk / "state.bin", "old")
    with pytest.raises(OSError) as caught:
        write_atomic(disk / "state.bin", SERIALIZERS[serializer])
    assert caught.value.errno == errno.ENOSPC and atomic_files.is_disk_full(caught.value)
    assert "No space left on device" in str(caught.value) and caught.value.__cause__ is not None
    assert (disk / "state.bin").read_text() == "old" and os.listdir(disk) == ["state.bin"]
    with pytest.raises(OSError) as caught, atomic_folder(disk / "folder") as staging:
        SERIALIZERS[serializer](staging / "state.bin")
    assert caught.value.errno == errno.ENOSPC and os.listdir(disk) == ["state.bin"]


def test_a_writer_error_is_called_a_full_disk_only_when_its_file_system_is_out_of_space(tmp_path, monkeypatch):
    def broken(tmp):
        raise RuntimeError("unexpected pos 6912 vs 6804")

    with pytest.raises(RuntimeError, match="unexpected pos"):  # plenty of room here: the error is the writer's
        write_atomic(tmp_path / "a.bin", broken)
    with pytest.raises(ValueError), atomic_folder(tmp_path / "f"):  # and so is any other error of a block
        raise ValueError("not a write")
    real = os.statvfs(tmp_path)
    full = os.statvfs_result((real.f_bsize, real.f_frsize, real.f_blocks, 0, 0, *real[5:]))
    monkeypatch.setattr(atomic_files.os, "statvfs", lambda path: full)
    with pytest.raises(OSError) as caught:
        write_atomic(tmp_path / "a.bin", broken)
    assert caught.value.errno == errno.ENOSPC and "unexpected pos" in str(caught.value)
    assert isinstance(caught.value.__cause__, RuntimeError)  # the writer's own error is kept, chained
    with pytest.raises(OSError) as caught, atomic_folder(tmp_path / "f") as staging:
        broken(staging / "x")
    assert caught.value.errno == errno.ENOSPC

    def denied(tmp):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp))

    with pytest.raises(OSError) as caught:  # the system's own errno is never rewritten
        write_atomic(tmp_path / "a.bin", denied)
    assert caught.value.errno == errno.EACCES
    assert not list(tmp_path.iterdir())


SWAP_KILLED = """
import sys
from gpt2chat import atomic_files
if sys.argv[2] == "two-renames":
    atomic_files._exchange = lambda a, b: False  # as on a system without renameat2
with atomic_files.atomic_folder(sys.argv[1]) as staging:
    (staging / "weights").write_text("new")
"""


@pytest.mark.parametrize("swap", ["exchange", "two-renames"])
def test_a_kill_while_a_folder_is_swapped_in(tmp_path, swap):
    """SIGKILL at the swap of a new folder for an old one: with the one-step exchange the folder's name always
    holds a whole folder (here the new one); with two renames it holds none for that moment, and the old
    folder survives under its temporary name."""
    probe = [tmp_path / "a", tmp_path / "b"]
    for folder in probe:
        folder.mkdir()
    if swap == "exchange" and not atomic_files._exchange(*probe):
        pytest.skip("this kernel or file system has no RENAME_EXCHANGE")
    for folder in probe:
        folder.rmdir()
    target = tmp_path / "final"
    with atomic_folder(target) as staging:
        (staging / "weights").write_text("old")
    env = {**os.environ, "GPT2CHAT_FAULT": "kill:swap@1"}
    killed = subprocess.run([sys.executable, "-c", SWAP_KILLED, str(target), swap], env=env,
                            capture_output=True, text=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = sorted((p / "weights").read_text() for p in tmp_path.iterdir() if p != target)
    assert all(p.name.startswith(".final.") and p.name.endswith(".tmp") for p in tmp_path.iterdir() if p != target)
    if swap == "exchange":
        assert (target / "weights").read_text() == "new" and left == ["old"]  # the staging name holds the old
    else:
        assert not target.exists() and left == ["new", "old"]


def test_replacing_a_folder_swaps_it_in_one_step_where_linux_can(tmp_path, monkeypatch):
    target = tmp_path / "final"
    for text in ("old", "new"):
        with atomic_folder(target) as staging:
            (staging / "weights").write_text(text)
            inode = os.stat(staging).st_ino
    assert (target / "weights").read_text() == "new" and os.stat(target).st_ino == inode
    assert os.listdir(tmp_path) == ["final"]  # the old folder, swapped into staging, is deleted
    monkeypatch.setattr(atomic_files, "_exchange", lambda a, b: False)  # the two-rename fallback does the same
    with atomic_folder(target) as staging:
        (staging / "weights").write_text("newer")
    assert (target / "weights").read_text() == "newer" and os.listdir(tmp_path) == ["final"]
