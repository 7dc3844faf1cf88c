"""Shared pieces of the serving tests (no tests here): a real uvicorn server in a thread on a free
loopback port, and a small stand-in for `BatchedEngine` that follows its contract (used where a test
needs a reply that never ends on its own, e.g. to watch a disconnect free the slot)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn


class ServerThread:
    """Runs an ASGI app under uvicorn on 127.0.0.1 (a port chosen by the OS) until `stop()`."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class StandInRequest:
    """One request of the stand-in engine: iterable (blocking and async) over token ids."""

    _DONE = object()

    def __init__(self, engine: StandInEngine, prompt_ids: list[int], params):
        self.engine = engine
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.params = params
        self.finish_reason: str | None = None
        self._tokens: list[object] = []
        self._cond = threading.Condition()
        self._listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def _push(self, item: object) -> None:
        with self._cond:
            self._tokens.append(item)
            self._cond.notify_all()
            listeners = list(self._listeners)
        for loop, event in listeners:
            loop.call_soon_threadsafe(event.set)

    def cancel(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
        self.engine._drop(self)
        self._push(self._DONE)

    def __iter__(self) -> Iterator[int]:
        index = 0
        while True:
            with self._cond:
                while index >= len(self._tokens):
                    self._cond.wait()
                item = self._tokens[index]
            index += 1
            if item is self._DONE:
                return
            yield item  # type: ignore[misc]

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._cond:
            self._listeners.append((loop, event))
        index = 0
        while True:
            with self._cond:
                ready = index < len(self._tokens)
                item = self._tokens[index] if ready else None
                if not ready:
                    event.clear()
            if not ready:
                await event.wait()
                continue
            index += 1
            if item is self._DONE:
                return
            yield item


class StandInEngine:
    """Follows `BatchedEngine`'s contract: a background thread emits one token per active request per
    step (token `token_id`, or a cycle of plain ids), honouring max_new_tokens and stop tokens."""

    def __init__(self, step_s: float = 0.005, token_ids: tuple[int, ...] = (40, 716, 257, 1332, 13)):
        self.step_s = step_s
        self.token_ids = token_ids
        self.active: list[StandInRequest] = []
        self.submitted = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @property
    def active_count(self) -> int:
        with self._lock:
            return len(self.active)

    def submit(self, prompt_ids: list[int], params) -> StandInRequest:
        request = StandInRequest(self, prompt_ids, params)
        with self._lock:
            self.active.append(request)
            self.submitted += 1
        return request

    def _drop(self, request: StandInRequest) -> None:
        with self._lock:
            if request in self.active:
                self.active.remove(request)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                batch = list(self.active)
            for request in batch:
                token = self.token_ids[request.completion_tokens % len(self.token_ids)]
                request.completion_tokens += 1
                request._push(token)
                if token in request.params.stop_token_ids:
                    request.finish_reason = "stop"
                elif request.completion_tokens >= request.params.max_new_tokens:
                    request.finish_reason = "length"
                if request.finish_reason is not None:
                    self._drop(request)
                    request._push(StandInRequest._DONE)
            time.sleep(self.step_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class StandInTemplate:
    """A `ChatTemplate`-shaped plain-text template ("User: ...\\nAssistant:") for the stand-in service."""

    name = "stand-in"
    special_tokens: tuple[str, ...] = ()
    stop_tokens = ("<|endoftext|>",)
    stop_strings = ("\nUser:",)

    def render(self, tokenizer, messages, add_generation_prompt=False):
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "Assistant:"
        ids = tokenizer.encode(text)
        return ids, [0] * len(ids)


class StandInModel:
    """Just what the service reads from a model: its context length."""

    def __init__(self, n_positions: int = 256):
        from types import SimpleNamespace

        self.config = SimpleNamespace(n_positions=n_positions)


def standin_service(engine: StandInEngine | None = None, **kwargs):
    from gpt2chat.serve.service import ChatService
    from gpt2chat.tokenizer import Tokenizer

    kwargs.setdefault("max_batch_size", 4)
    kwargs.setdefault("max_queue", 4)
    kwargs.setdefault("max_tokens_limit", 64)
    return ChatService(StandInModel(kwargs.pop("n_positions", 256)), Tokenizer.gpt2(), template=StandInTemplate(),
                       model_name="stand-in", engine=engine or StandInEngine(), **kwargs)
