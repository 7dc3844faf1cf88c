"""Front ends that serve a chat model: the OpenAI-compatible HTTP API, its web page, the Telegram bot.

Names load lazily so that importing the package does not pull in FastAPI or python-telegram-bot.
"""

from __future__ import annotations

_LAZY = {
    "create_app": ("gpt2chat.serve.app", "create_app"),
    "ChatService": ("gpt2chat.serve.service", "ChatService"),
    "run_telegram": ("gpt2chat.serve.telegram_bot", "run_telegram"),
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'gpt2chat.serve' has no attribute {name!r}")
