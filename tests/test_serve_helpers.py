"""Shared pieces of the serving tests (no tests here): a real uvicorn server in a thread on a free
loopback port, and a paced stand-in for `BatchedEngine` that follows its contract (used where a test
needs slow tokens, e.g. to watch a disconnect free the row, or a browser watch a reply stream in)."""

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


def openai_error_shape(body: object) -> str | None:
    """What is wrong with an error body, measured against OpenAI's `{"error": {message, type, param, code}}`
    (None when it has that shape)."""
    if not isinstance(body, dict) or set(body) != {"error"}:
        return f"the body is not one 'error' object: {str(body)[:200]}"
    error = body["error"]
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"the error object has not OpenAI's four fields: {str(error)[:200]}"
    if not isinstance(error["message"], str) or not error["message"] or not isinstance(error["type"], str):
        return f"message and type must be non-empty strings: {str(error)[:200]}"
    if any(error[name] is not None and not isinstance(error[name], str) for name in ("param", "code")):
        return f"param and code must be strings or null: {str(error)[:200]}"
    return None


def assert_openai_error(response, status: int) -> dict:
    """The `error` object of an httpx response that must have `status` and OpenAI's error shape."""
    assert response.status_code == status, response.text
    body = response.json()
    problem = openai_error_shape(body)
    assert problem is None, problem
    return body["error"]


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
        self.stop_tokens = 0
        self.logprobs: list = []
        self.prompt_logprobs: list = []
        self.params = params
        self.finish_reason: str | None = None
        self.ttft_s = self.decode_s = None
        self.cached_tokens = 0
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
    """Follows `BatchedEngine`'s contract: a background thread emits one token per active request per step
    (a cycle of plain ids, paced by `step_s`), honouring max_new_tokens; a stop token ends the request
    with finish_reason "stop" and is never delivered; with `params.logprobs` set, each token's
    `TokenLogprob` is appended before the token arrives (made-up numbers: -0.5 per position)."""

    def __init__(self, step_s: float = 0.005, token_ids: tuple[int, ...] = (40, 716, 257, 1332, 13),
                 max_batch_size: int = 4):
        self.step_s = step_s
        self.token_ids = token_ids
        self.max_batch_size = max_batch_size
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

    @property
    def pending_count(self) -> int:
        return 0

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
        from gpt2chat.engine import TokenLogprob

        while not self._stop.is_set():
            with self._lock:
                batch = list(self.active)
            for request in batch:
                position = request.completion_tokens + request.stop_tokens
                token = self.token_ids[position % len(self.token_ids)]
                if token in request.params.stop_token_ids:
                    request.stop_tokens += 1
                    request.finish_reason = "stop"
                else:
                    top_k = request.params.logprobs
                    if top_k is not None:
                        top = tuple((t, -0.25 * (i + 1)) for i, t in enumerate(self.token_ids[:top_k]))
                        request.logprobs.append(TokenLogprob(token, -0.5 * (position + 1), top))
                    request.completion_tokens += 1
                    request._push(token)
                    if request.completion_tokens >= request.params.max_new_tokens:
                        request.finish_reason = "length"
                if request.finish_reason is not None:
                    self._drop(request)
                    request._push(StandInRequest._DONE)
            time.sleep(self.step_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class StandInModel:
    """Just what the service reads from a model: its context length and vocabulary size."""

    def __init__(self, n_positions: int = 256):
        from types import SimpleNamespace

        self.config = SimpleNamespace(n_positions=n_positions, vocab_size=50257)


def standin_service(engine: StandInEngine | None = None, **kwargs):
    """A `ChatService` on the GPT-2 tokenizer and the real "plain" template (User: ... Assistant:) over
    the stand-in engine; keyword arguments are `ServerLimits` fields (and `n_positions`)."""
    from gpt2chat.serve.limits import ServerLimits
    from gpt2chat.serve.service import ChatService
    from gpt2chat.tokenizer import Tokenizer

    n_positions = kwargs.pop("n_positions", 256)
    limits = ServerLimits(**{"max_batch_size": 4, "max_queue": 4, "max_tokens_limit": 64, **kwargs})
    return ChatService(StandInModel(n_positions), Tokenizer.gpt2(), template="plain", model_name="stand-in",
                       limits=limits, engine=engine or StandInEngine())


def tiny_service(checkpoint, **limits):
    """A `ChatService` with the real batched engine on a checkpoint (the tiny model in the tests), on the
    CPU; keyword arguments are `ServerLimits` fields."""
    from gpt2chat.checkpoint import load_model
    from gpt2chat.serve.limits import ServerLimits
    from gpt2chat.serve.service import ChatService

    model, tokenizer = load_model(checkpoint, device="cpu")
    limits = ServerLimits(**{"max_batch_size": 4, "max_queue": 4, "max_tokens_limit": 64, **limits})
    return ChatService(model, tokenizer, model_name="tiny", limits=limits, device="cpu")
