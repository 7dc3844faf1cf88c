"""Shared test fixtures: the ../shared folder (skip when absent) and small checkpoints built once."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def chat_tokenizer():
    """GPT-2's tokenizer with the control tokens of the llama3-context and user-assistant templates."""
    from gpt2chat.templates import get_template
    from gpt2chat.tokenizer import Tokenizer

    tok = Tokenizer.gpt2()
    for name in ("llama3-context", "user-assistant"):
        get_template(name).ensure_tokens(tok)
    return tok
