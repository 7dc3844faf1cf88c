"""The Telegram bot against a small Bot API stand-in on 127.0.0.1: python-telegram-bot (the real library)
polls it for updates and we check the sendMessage calls it makes. Backends: a recording fake (histories,
commands, splitting), the tiny model in-process, and a running gpt2chat server over HTTP."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import pytest

from gpt2chat.errors import Gpt2ChatError
from gpt2chat.serve.telegram_bot import (
    TELEGRAM_MESSAGE_LIMIT,
    BackendError,
    TelegramChatBot,
    bot_token,
    build_application,
    split_message,
)

TOKEN = "123456:TEST-TOKEN"
BOT_USER = {"id": 123456, "is_bot": True, "first_name": "gpt2chat", "username": "gpt2chat_test_bot",
            "can_join_groups": True, "can_read_all_group_messages": False, "supports_inline_queries": False}


class FakeBotApi:
    """Just enough of the Bot API for python-telegram-bot to initialise, poll and send messages."""

    def __init__(self):
        self.updates: list[dict] = []
        self.sent: list[dict] = []
        self.calls: list[str] = []
        self.cond = threading.Condition()
        self._next_update = 1
        self._next_message = 1
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                api.handle(self)

            do_GET = do_POST

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/bot"

    def __enter__(self) -> FakeBotApi:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- what a test does
    def user_sends(self, chat_id: int, text: str) -> None:
        message = {"message_id": self._new_message_id(), "date": int(time.time()),
                   "chat": {"id": chat_id, "type": "private", "first_name": "Ann"},
                   "from": {"id": chat_id, "is_bot": False, "first_name": "Ann"}, "text": text}
        if text.startswith("/"):
            message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
        with self.cond:
            self.updates.append({"update_id": self._next_update, "message": message})
            self._next_update += 1
            self.cond.notify_all()

    def sent_to(self, chat_id: int) -> list[str]:
        with self.cond:
            return [m["text"] for m in self.sent if m["chat_id"] == chat_id]

    # -- the Bot API side
    def _new_message_id(self) -> int:
        with self.cond:
            self._next_message += 1
            return self._next_message

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        prefix = f"/bot{TOKEN}/"
        if not request.path.startswith(prefix):
            return self._reply(request, 404, {"ok": False, "error_code": 404, "description": "Not Found"})
        method = request.path[len(prefix):].split("?")[0]
        length = int(request.headers.get("Content-Length") or 0)
        raw = request.rfile.read(length).decode() if length else ""
        params = self._parse(raw, request.headers.get("Content-Type", ""))
        with self.cond:
            self.calls.append(method)
        result = self.dispatch(method, params)
        if result is None:
            return self._reply(request, 404, {"ok": False, "error_code": 404, "description": "Not Found"})
        self._reply(request, 200, {"ok": True, "result": result})

    @staticmethod
    def _parse(raw: str, content_type: str) -> dict:
        if not raw:
            return {}
        if "json" in content_type:
            return json.loads(raw)
        params = {}
        for key, values in parse_qs(raw, keep_blank_values=True).items():
            value = values[0]
            if key != "text":
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            params[key] = value
        return params

    def dispatch(self, method: str, params: dict):
        if method == "getMe":
            return BOT_USER
        if method in ("deleteWebhook", "setMyCommands", "sendChatAction", "close", "logOut"):
            return True
        if method == "getUpdates":
            offset = int(params.get("offset") or 0)
            deadline = time.monotonic() + min(float(params.get("timeout") or 0), 0.5)
            with self.cond:
                while True:
                    pending = [u for u in self.updates if u["update_id"] >= offset]
                    remaining = deadline - time.monotonic()
                    if pending or remaining <= 0:
                        return pending
                    self.cond.wait(remaining)
        if method == "sendMessage":
            chat_id = int(params["chat_id"])
            text = params["text"]
            with self.cond:
                self.sent.append({"chat_id": chat_id, "text": text})
                self.cond.notify_all()
            return {"message_id": self._new_message_id(), "date": int(time.time()), "from": BOT_USER,
                    "chat": {"id": chat_id, "type": "private"}, "text": text}
        return None

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)


class RecordingBackend:
    """Replies with a fixed text (or the result of `reply_fn`) and records the messages it was given."""

    def __init__(self, reply_fn=None):
        self.seen: list[list[dict]] = []
        self.reply_fn = reply_fn or (lambda messages: f"reply {len(self.seen)}")

    async def reply(self, messages):
        self.seen.append([dict(m) for m in messages])
        return self.reply_fn(messages)


def run_bot(api: FakeBotApi, bot: TelegramChatBot, script, timeout: float = 60.0) -> None:
    """Starts the bot polling `api`, runs `script(api)` (a coroutine function) and shuts the bot down."""

    async def main():
        app = build_application(bot, TOKEN, base_url=api.base_url)
        async with app:
            await app.updater.start_polling(poll_interval=0, timeout=1)
            await app.start()
            try:
                await asyncio.wait_for(script(api), timeout)
            finally:
                await app.updater.stop()
                await app.stop()

    asyncio.run(main())


async def wait_for_replies(api: FakeBotApi, chat_id: int, count: int, timeout: float = 60.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(api.sent_to(chat_id)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"chat {chat_id}: expected {count} replies, got {api.sent_to(chat_id)}")
        await asyncio.sleep(0.02)
    return api.sent_to(chat_id)


def test_history_per_chat_commands_and_system_prompt():
    backend = RecordingBackend()
    bot = TelegramChatBot(backend)

    async def script(api):
        api.user_sends(1, "/start")
        assert "Send me a message" in (await wait_for_replies(api, 1, 1))[0]
        api.user_sends(1, "Hi bot")
        await wait_for_replies(api, 1, 2)
        api.user_sends(2, "I am another chat")
        await wait_for_replies(api, 2, 1)
        api.user_sends(1, "Second question")
        replies = await wait_for_replies(api, 1, 3)
        assert replies[1:] == ["reply 1", "reply 3"]
        api.user_sends(1, "/system You are a pirate.\nAlways say arr.")
        assert (await wait_for_replies(api, 1, 4))[3] == "System prompt set."
        api.user_sends(1, "Third")
        await wait_for_replies(api, 1, 5)
        api.user_sends(1, "/reset")
        assert (await wait_for_replies(api, 1, 6))[5] == "Conversation reset."
        api.user_sends(1, "After reset")
        await wait_for_replies(api, 1, 7)

    with FakeBotApi() as api:
        run_bot(api, bot, script)
        assert {"getMe", "getUpdates", "sendMessage", "deleteWebhook"} <= set(api.calls)

    first, other_chat, second, third, after_reset = backend.seen
    assert first == [{"role": "user", "content": "Hi bot"}]
    assert other_chat == [{"role": "user", "content": "I am another chat"}]  # chat 2 does not see chat 1
    assert second == [{"role": "user", "content": "Hi bot"}, {"role": "assistant", "content": "reply 1"},
                      {"role": "user", "content": "Second question"}]
    assert third[0] == {"role": "system", "content": "You are a pirate.\nAlways say arr."}
    assert [m["content"] for m in third[1:]] == ["Hi bot", "reply 1", "Second question", "reply 3", "Third"]
    assert after_reset == [third[0], {"role": "user", "content": "After reset"}]  # the system prompt stays


def test_long_reply_is_split_at_telegrams_limit():
    long_reply = ("word " * 1000 + "\n\n") * 3  # about 15,000 characters
    bot = TelegramChatBot(RecordingBackend(lambda messages: long_reply))

    async def script(api):
        api.user_sends(7, "Tell me everything")
        await wait_for_replies(api, 7, 4)
        await asyncio.sleep(0.2)

    with FakeBotApi() as api:
        run_bot(api, bot, script)
        parts = api.sent_to(7)
    assert len(parts) == 4 and all(0 < len(p) <= TELEGRAM_MESSAGE_LIMIT for p in parts)
    assert " ".join(p.strip() for p in parts).split() == long_reply.split()


def test_backend_error_is_told_to_the_user_and_not_kept_in_history():
    def failing(messages):
        raise BackendError("the chat server refused (HTTP 429): busy")

    backend = RecordingBackend(failing)
    bot = TelegramChatBot(backend)

    async def script(api):
        api.user_sends(3, "Hello?")
        (reply,) = await wait_for_replies(api, 3, 1)
        assert "could not answer" in reply and "429" in reply

    with FakeBotApi() as api:
        run_bot(api, bot, script)
    assert bot.state(3).messages == []


def test_split_message_rules():
    assert split_message("short") == ["short"]
    assert split_message("") == [""]
    text = "a" * 5000  # no spaces: hard cut
    parts = split_message(text)
    assert [len(p) for p in parts] == [4096, 904] and "".join(parts) == text
    emoji = "\U0001F600" * 3000  # 2 UTF-16 units each, as Telegram counts
    parts = split_message(emoji)
    assert "".join(parts) == emoji and all(len(p.encode("utf-16-le")) // 2 <= 4096 for p in parts)
    lines = "\n".join(f"line {i}" for i in range(1500))
    parts = split_message(lines)
    assert all(not p.startswith("\n") for p in parts) and "\n".join(parts).split("\n") == lines.split("\n")


def test_missing_token_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TELEGRAM_BOT_TOKEN", raising=False)
    with pytest.raises(Gpt2ChatError, match="TELEGRAM_BOT_TOKEN"):
        bot_token()
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", " abc:def ")
    assert bot_token() == "abc:def"


def test_cli_telegram_without_token_exits_2(monkeypatch, capsys):
    from gpt2chat.cli import main

    monkeypatch.delenv("TELEGRAM_BOT_TOKEN", raising=False)
    assert main(["telegram", "--server", "http://127.0.0.1:9"]) == 2
    assert "TELEGRAM_BOT_TOKEN" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_service(tiny_checkpoint):
    from serve_support import tiny_service as build

    service = build(tiny_checkpoint, max_tokens_limit=1024)
    yield service
    service.close()


def test_local_backend_answers_two_chats_with_the_tiny_model(tiny_service):
    from gpt2chat.serve.telegram_bot import LocalBackend, ReplySettings

    bot = TelegramChatBot(LocalBackend(tiny_service, ReplySettings(max_tokens=8)))

    async def script(api):
        api.user_sends(11, "Hello")
        api.user_sends(12, "Hi there")
        await wait_for_replies(api, 11, 1)
        await wait_for_replies(api, 12, 1)

    with FakeBotApi() as api:
        run_bot(api, bot, script)
        assert all(len(api.sent_to(chat)) == 1 and api.sent_to(chat)[0] for chat in (11, 12))
    assert [m["role"] for m in bot.state(11).messages] == ["user", "assistant"]
    assert tiny_service.outstanding == 0


def test_remote_backend_talks_to_a_running_server(tiny_service):
    from gpt2chat.serve.app import create_app
    from gpt2chat.serve.telegram_bot import RemoteBackend, ReplySettings
    from serve_support import ServerThread

    with ServerThread(create_app(tiny_service, api_key="k")) as srv:
        good = TelegramChatBot(RemoteBackend(srv.url, "k", ReplySettings(max_tokens=6)))
        bad_key = TelegramChatBot(RemoteBackend(srv.url + "/v1", "wrong", ReplySettings(max_tokens=6)))

        async def script(api):
            api.user_sends(21, "Hello server")
            (reply,) = await wait_for_replies(api, 21, 1)
            assert reply and "could not answer" not in reply

        async def refused(api):
            api.user_sends(22, "Hello?")
            (reply,) = await wait_for_replies(api, 22, 1)
            assert "could not answer" in reply and "401" in reply

        with FakeBotApi() as api:
            run_bot(api, good, script)
        with FakeBotApi() as api:
            run_bot(api, bad_key, refused)
    assert [m["role"] for m in good.state(21).messages] == ["user", "assistant"]


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_telegram_with_the_bot_api_unreachable_is_one_clear_line(monkeypatch, capsys):
    """A newcomer without network: one error naming the Bot API URL, exit 2, no retry loop or traceback."""
    from gpt2chat.cli import main

    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)
    url = f"http://127.0.0.1:{closed_port()}/bot"
    assert main(["telegram", "--server", "http://127.0.0.1:9", "--bot-api-url", url]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the Telegram Bot API at {url}" in err and "Traceback" not in err


def test_a_refused_bot_token_is_a_clear_error():
    from gpt2chat.serve.telegram_bot import TelegramChatBot, check_bot_api

    class Refusing(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.dumps({"ok": False, "error_code": 401, "description": "Unauthorized"}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/bot"
        app = build_application(TelegramChatBot(None), TOKEN, base_url=url)
        with pytest.raises(Gpt2ChatError, match="refused the bot token .*TELEGRAM_BOT_TOKEN"):
            check_bot_api(app, url)
    finally:
        httpd.shutdown()
