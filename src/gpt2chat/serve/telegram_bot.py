"""The Telegram bot (seed 000): one conversation per chat, answered by a local model or a running server.

`TelegramChatBot` keeps each chat's history and system prompt and answers text messages through a
`ChatBackend`: `LocalBackend` (a `ChatService` in this process, so replies to several chats share the
batched engine) or `RemoteBackend` (any gpt2chat server, through its OpenAI-compatible API). Commands:
/start, /reset, /system TEXT. Replies longer than Telegram's 4096-character limit are split.
It knows nothing about tokens or templates (the backend does) and stores nothing on disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from gpt2chat.errors import Gpt2ChatError

if TYPE_CHECKING:
    from telegram import Update
    from telegram.ext import Application, ContextTypes

    from gpt2chat.serve.service import ChatService

log = logging.getLogger("gpt2chat.telegram")

TOKEN_ENV = "TELEGRAM_BOT_TOKEN"
TELEGRAM_MESSAGE_LIMIT = 4096  # UTF-16 code units per message, as Telegram counts them
MAX_STORED_MESSAGES = 200  # per chat; the backend also drops the oldest turns that do not fit the context
WELCOME = ("Hi! I am a GPT-2 chat model. Send me a message.\n"
           "/reset starts a new conversation, /system TEXT sets a system prompt.")


class BackendError(Gpt2ChatError):
    """The model could not answer (server down, bad reply, request refused)."""


class ChatBackend(Protocol):
    async def reply(self, messages: list[dict[str, str]]) -> str: ...


@dataclass(frozen=True)
class ReplySettings:
    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95


class LocalBackend:
    """Answers with a `ChatService` in this process (batched with other chats' requests)."""

    def __init__(self, service: ChatService, settings: ReplySettings = ReplySettings()):
        self.service = service
        self.settings = settings

    async def reply(self, messages: list[dict[str, str]]) -> str:
        service = self.service
        max_tokens = min(self.settings.max_tokens, service.limits.max_tokens_limit)
        prompt_ids = service.render_messages(messages, truncate=True, max_tokens=max_tokens)
        settings = service.settings(len(prompt_ids), max_tokens, self.settings.temperature, self.settings.top_p)
        (generation,) = service.start(prompt_ids, settings, n=1, chat=True)
        try:
            return await generation.text()
        finally:
            generation.cancel()


class RemoteBackend:
    """Answers through a running gpt2chat (or any OpenAI-compatible) server's /v1/chat/completions."""

    def __init__(self, server_url: str, api_key: str | None = None, settings: ReplySettings = ReplySettings(),
                 timeout_s: float = 300.0):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        base = server_url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else (
            f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions")
        self.settings = settings
        self.client = httpx.AsyncClient(headers=headers, timeout=timeout_s)

    async def reply(self, messages: list[dict[str, str]]) -> str:
        import httpx

        body = {"messages": messages, "max_tokens": self.settings.max_tokens, "truncate": True,
                "temperature": self.settings.temperature, "top_p": self.settings.top_p}
        try:
            response = await self.client.post(self.url, json=body)
        except httpx.HTTPError as exc:
            raise BackendError(f"cannot reach the chat server at {self.url}: {exc}") from exc
        try:
            payload = response.json()
        except ValueError as exc:
            raise BackendError(f"the chat server answered HTTP {response.status_code} without JSON") from exc
        if response.status_code != 200:
            message = (payload.get("error") or {}).get("message") if isinstance(payload, dict) else None
            raise BackendError(f"the chat server refused (HTTP {response.status_code}): {message or payload}")
        try:
            return str(payload["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError) as exc:
            raise BackendError(f"unexpected reply from the chat server: {str(payload)[:200]}") from exc

    async def aclose(self) -> None:
        await self.client.aclose()


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def split_message(text: str, limit: int = TELEGRAM_MESSAGE_LIMIT) -> list[str]:
    """Splits `text` into parts Telegram accepts, preferring paragraph, line, then word boundaries."""
    parts: list[str] = []
    rest = text
    while _utf16_len(rest) > limit:
        # the longest prefix within the limit (astral characters count twice in UTF-16)
        end = min(len(rest), limit)
        while _utf16_len(rest[:end]) > limit:
            end -= 1
        window = rest[:end]
        cut = -1
        for separator in ("\n\n", "\n", " "):
            position = window.rfind(separator)
            if position > end // 2:
                cut = position + len(separator)
                break
        if cut <= 0:
            cut = end
        parts.append(rest[:cut].rstrip() or rest[:cut])
        rest = rest[cut:]
    if rest.strip() or not parts:
        parts.append(rest)
    return parts


@dataclass
class ChatState:
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class TelegramChatBot:
    """Per-chat histories and the command handlers; `build_application` wires them to Telegram."""

    def __init__(self, backend: ChatBackend, default_system: str | None = None):
        self.backend = backend
        self.default_system = default_system
        self.chats: dict[int, ChatState] = {}

    def state(self, chat_id: int) -> ChatState:
        if chat_id not in self.chats:
            self.chats[chat_id] = ChatState(system=self.default_system)
        return self.chats[chat_id]

    async def on_start(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        self.state(update.effective_chat.id).messages.clear()
        await update.effective_message.reply_text(WELCOME)

    async def on_reset(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        self.state(update.effective_chat.id).messages.clear()
        await update.effective_message.reply_text("Conversation reset.")

    async def on_system(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        state = self.state(update.effective_chat.id)
        parts = re.split(r"\s", update.effective_message.text or "", maxsplit=1)
        text = parts[1].strip() if len(parts) > 1 else ""
        if not text:
            current = state.system or "(none)"
            await update.effective_message.reply_text(f"Current system prompt: {current}\nSet one with /system TEXT.")
            return
        state.system = text
        await update.effective_message.reply_text("System prompt set.")

    async def on_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        state = self.state(update.effective_chat.id)
        async with state.lock:  # one reply at a time per chat keeps its history in order
            user_turn = {"role": "user", "content": message.text or ""}
            prefix = [{"role": "system", "content": state.system}] if state.system else []
            try:
                await context.bot.send_chat_action(update.effective_chat.id, "typing")
                reply = await self.backend.reply([*prefix, *state.messages, user_turn])
            except Gpt2ChatError as exc:
                log.warning("chat %s: %s", update.effective_chat.id, exc)
                await message.reply_text(f"Sorry, I could not answer: {exc}")
                return
            state.messages += [user_turn, {"role": "assistant", "content": reply}]
            del state.messages[:-MAX_STORED_MESSAGES]
        for part in split_message(reply.strip() or "(empty reply)"):
            await message.reply_text(part)


def build_application(bot: TelegramChatBot, token: str, base_url: str | None = None,
                      configure: Callable[[Any], Any] | None = None) -> Application:
    """A python-telegram-bot Application answering with `bot`; `base_url` points at another Bot API."""
    from telegram.ext import ApplicationBuilder, CommandHandler, MessageHandler, filters

    builder = ApplicationBuilder().token(token).concurrent_updates(True)
    if base_url:
        builder = builder.base_url(base_url)
    if configure is not None:
        builder = configure(builder)
    app = builder.build()
    app.add_handler(CommandHandler("start", bot.on_start))
    app.add_handler(CommandHandler("reset", bot.on_reset))
    app.add_handler(CommandHandler("system", bot.on_system))
    app.add_handler(MessageHandler(filters.UpdateType.MESSAGE & filters.TEXT & ~filters.COMMAND, bot.on_text))
    return app


def bot_token(token: str | None = None) -> str:
    token = token or os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise Gpt2ChatError(f"no Telegram bot token: set the {TOKEN_ENV} environment variable to the token "
                            "@BotFather gave you")
    return token


def run_telegram(backend: ChatBackend, token: str | None = None, base_url: str | None = None,
                 default_system: str | None = None) -> None:
    """Polls Telegram until interrupted (the token comes from TELEGRAM_BOT_TOKEN unless given)."""
    app = build_application(TelegramChatBot(backend, default_system), bot_token(token), base_url)
    check_bot_api(app, base_url)
    log.info("Telegram bot polling for updates")
    app.run_polling(drop_pending_updates=False)


def check_bot_api(app: Application, base_url: str | None = None) -> None:
    """One `getMe` before polling: an unreachable Bot API or a refused token is one clear error, not
    python-telegram-bot's retry loop and traceback."""

    from telegram.error import InvalidToken, NetworkError

    async def probe() -> None:
        async with app.bot:  # initialising the bot asks the API who it is
            pass

    where = base_url or "https://api.telegram.org/bot"
    try:
        asyncio.run(probe())
    except InvalidToken:
        raise Gpt2ChatError(f"the Telegram Bot API at {where} refused the bot token (from {TOKEN_ENV}): check it "
                            "with @BotFather") from None
    except NetworkError as exc:
        raise Gpt2ChatError(f"cannot reach the Telegram Bot API at {where} ({exc}): check the network, or "
                            "point --bot-api-url at a reachable Bot API server") from None
