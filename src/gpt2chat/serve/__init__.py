"""Front ends that serve a chat model: the OpenAI-compatible HTTP API, its web page, the Telegram bot.

Names load lazily so that importing the package does not pull in FastAPI or python-telegram-bot.
"""

from __future__ import annotations

from gpt2chat._lazy import lazy_getattr

_LAZY = {
    "create_app": ("gpt2chat.serve.app", "create_app"),
    "ChatService": ("gpt2chat.serve.service", "ChatService"),
    "run_telegram": ("gpt2chat.serve.telegram_bot", "run_telegram"),
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
