"""Atomic writes: all or nothing under the real name, and the usual permissions (not mkstemp's 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from gpt2chat.files import atomic_folder, write_atomic, write_json_atomic, write_text_atomic


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
