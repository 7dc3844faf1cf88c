"""gpt2chat: turn GPT-2 / GPT-Neo into a chat assistant and serve it.

Importing the package is cheap: heavy modules (torch, transformers, fastapi) load only when a name
that needs them is first used.
"""

from __future__ import annotations

from gpt2chat._lazy import lazy_getattr

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("gpt2chat.checkpoint", "load_model"),
    "save_pretrained": ("gpt2chat.checkpoint", "save_pretrained"),
    "init_checkpoint": ("gpt2chat.checkpoint", "init_checkpoint"),
    "render_chat": ("gpt2chat.templates", "render_chat"),
    "Tokenizer": ("gpt2chat.tokenizer", "Tokenizer"),
    "GPT": ("gpt2chat.model", "GPT"),
    "ModelConfig": ("gpt2chat.config", "ModelConfig"),
}

__all__ = ["__version__", *_LAZY]


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
