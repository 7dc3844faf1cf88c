"""Shared test fixtures: the ../shared folder (skip when absent) and small checkpoints built once."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("GPT2CHAT_SHARED", REPO_ROOT.parent / "shared"))


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:
        pass


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ../shared folder with real data; tests that need it skip when it is absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DIR}")
    return SHARED_DIR


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny GPT-2 checkpoint folder (llama3-context template), built once."""
    from gpt2chat.checkpoint import init_checkpoint

    out = tmp_path_factory.mktemp("tiny-ckpt")
    return init_checkpoint("tiny", out, template="llama3-context", seed=0)


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    """The tiny checkpoint's model on the CPU, loaded once per test module."""
    from gpt2chat.checkpoint import load_model

    model, _ = load_model(tiny_checkpoint, device="cpu")
    return model


@pytest.fixture(scope="session")
def chat_tokenizer():
    """GPT-2's tokenizer with the control tokens of the llama3-context and user-assistant templates."""
    from gpt2chat.templates import get_template
    from gpt2chat.tokenizer import Tokenizer

    tok = Tokenizer.gpt2()
    for name in ("llama3-context", "user-assistant"):
        get_template(name).ensure_tokens(tok)
    return tok


class Tmpfs:
    """A small RAM file system of a chosen size (a real full disk: the kernel's own ENOSPC)."""

    def __init__(self, path: Path, size_bytes: int):
        self.path = path
        self.resize(size_bytes, first=True)

    def resize(self, size_bytes: int, first: bool = False) -> None:
        options = f"size={size_bytes}" if first else f"remount,size={size_bytes}"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(self.path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            if first:
                pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
            raise RuntimeError(f"remounting {self.path}: {done.stderr.strip()}")


@pytest.fixture
def tmpfs(tmp_path):
    """`tmpfs(size_bytes)` mounts a tmpfs under tmp_path and returns it; unmounted after the test. Needs root
    (or CAP_SYS_ADMIN): skips without."""
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mounted = []

    def mount(size_bytes: int) -> Tmpfs:
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        mounted.append(Tmpfs(path, size_bytes))
        return mounted[-1]

    yield mount
    gc.collect()  # a failed torch.save may still hold its file open until its writer is collected
    for fs in mounted:
        if subprocess.run(["umount", str(fs.path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(fs.path)], check=False)
