"""Turning `Generation`s into OpenAI answers: server-sent events as tokens come, or one body at the end.

`chat_events` / `completion_events` yield the SSE stream of a chat or text completion (a role chunk, text
chunks with the logprobs of the tokens they carry, a finish chunk per choice, the usage chunk when asked
for, `[DONE]`); `chat_body` / `completion_body` build the non-streamed answer from the same pieces, so both
agree token for token. Every answer is one of the response models of `schemas` (their one definition). `streaming_response` reports a failure after the headers in-band, as OpenAI does,
and `collect_unless_disconnected` frees every row when the client leaves before the answer is ready.
This module knows nothing about validation or the engine beyond `Generation`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from gpt2chat import __version__
from gpt2chat.serve import schemas
from gpt2chat.serve.logprobs import chat_logprobs, completion_logprobs
from gpt2chat.serve.service import Generation
from gpt2chat.serve.structured import ToolCallStream
from gpt2chat.tokenizer import IncrementalDecoder
from gpt2chat.tool_calls import ToolCallError, parse_assistant

log = logging.getLogger("gpt2chat.serve")

FINGERPRINT = f"fp_gpt2chat_{__version__}"


@dataclass
class Answer:
    """What one request is answered with: its generations and how to present them."""

    object_name: str  # "chat.completion" | "text_completion"
    model: str
    generations: list[Generation]
    tokenizer: Any
    logprobs: bool = False
    include_usage: bool = False
    echoes: list[Echo] = field(default_factory=list)  # completions with echo: one per generation
    completion_id: str = ""
    created: int = 0
    tool_calls: bool = False  # the replies are read for tool calls (serve/structured.py)

    def __post_init__(self) -> None:
        self.completion_id = self.completion_id or schemas.new_id("chatcmpl" if self.chat else "cmpl")
        self.created = self.created or schemas.now()
        self._sent = [0] * len(self.generations)  # tokens whose logprobs went out, per choice

    @property
    def chat(self) -> bool:
        return self.object_name == "chat.completion"

    def usage(self) -> schemas.Usage:
        """Token counts; a prompt the n choices share counts once (its first choice's cached tokens)."""
        prompts = {id(g.prompt_ids): g for g in reversed(self.generations)}.values()
        prompt = sum(g.prompt_tokens for g in prompts)
        cached = sum(g.cached_tokens for g in prompts)
        completion = sum(g.completion_tokens for g in self.generations)
        return schemas.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                             prompt_tokens_details=schemas.PromptTokensDetails(cached_tokens=cached))

    def new_logprobs(self, index: int) -> dict[str, Any] | None:
        """The logprobs of choice `index`'s tokens not yet sent (None when they were not asked for)."""
        if not self.logprobs:
            return None
        generation = self.generations[index]
        start, end = self._sent[index], len(generation.token_ids)
        self._sent[index] = end
        entries = generation.logprobs[start:end]
        if self.chat:
            return chat_logprobs(self.tokenizer, entries)
        offset = len(self.echoes[index].text) if self.echoes else 0
        return completion_logprobs(self.tokenizer, generation.token_ids[start:end], entries,
                                   [offset + o for o in generation.text_offsets[start:end]])


@dataclass
class Echo:
    """A completion prompt shown before its continuation (`echo`): its text and its tokens' offsets."""

    ids: list[int]
    text: str
    offsets: list[int]

    @classmethod
    def of(cls, tokenizer, ids: list[int]) -> Echo:
        decoder = IncrementalDecoder(tokenizer)
        pieces, offsets, length = [], [], 0
        for token_id in ids:
            offsets.append(length)
            piece = decoder.push(token_id)
            pieces.append(piece)
            length += len(piece)
        pieces.append(decoder.flush())
        return cls(list(ids), "".join(pieces), offsets)

    def logprobs(self, tokenizer, generation: Generation) -> dict[str, Any]:
        entries = generation.prompt_logprobs or [None] * len(self.ids)
        return completion_logprobs(tokenizer, self.ids, entries, self.offsets)


def merge_logprobs(first: dict[str, Any] | None, second: dict[str, Any] | None) -> dict[str, Any] | None:
    """Two completion logprob columns one after the other (the echoed prompt, then the continuation)."""
    if first is None or second is None:
        return first or second
    return {key: first[key] + second[key] for key in first}


# ---- SSE ------------------------------------------------------------------------------------------------


def sse(payload: BaseModel) -> str:
    """One server-sent event carrying a response model (the fields it set; see `schemas`)."""
    return f"data: {payload.model_dump_json(exclude_unset=True)}\n\n"


def _chunk_writer(answer: Answer) -> Callable[..., str]:
    """`chunk(choices, usage=None)` -> one SSE event of a streamed answer (usage only when asked for)."""
    model = schemas.ChatCompletionChunk if answer.chat else schemas.Completion
    object_name = "chat.completion.chunk" if answer.chat else "text_completion"

    def chunk(choices: list[Any], usage: schemas.Usage | None = None) -> str:
        fields: dict[str, Any] = {"id": answer.completion_id, "object": object_name, "created": answer.created,
                                  "model": answer.model, "system_fingerprint": FINGERPRINT, "choices": choices}
        if answer.include_usage:
            fields["usage"] = usage
        return sse(model(**fields))

    return chunk


async def _merged(generations: list[Generation]) -> AsyncIterator[tuple[int, str | None]]:
    """(choice index, text) from all generations as they come; (index, None) when one finishes."""
    if len(generations) == 1:
        async for text in generations[0]:
            yield 0, text
        yield 0, None
        return
    queue: asyncio.Queue[tuple[int, str | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for text in generation:
                await queue.put((index, text, None))
            await queue.put((index, None, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which reports it
            await queue.put((index, None, exc))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generations)]
    try:
        remaining = len(generations)
        while remaining:
            index, text, exc = await queue.get()
            if exc is not None:
                raise exc
            if text is None:
                remaining -= 1
            yield index, text
    finally:
        for task in tasks:
            task.cancel()


def _finish_reason(generation: Generation, calls: int) -> str | None:
    """"tool_calls" when a reply that ended by itself made calls; else the generation's own reason."""
    return "tool_calls" if calls and generation.finish_reason == "stop" else generation.finish_reason


async def chat_events(answer: Answer) -> AsyncIterator[str]:
    chunk = _chunk_writer(answer)
    Choice, Delta = schemas.ChatChunkChoice, schemas.ChunkDelta  # noqa: N806
    readers = [ToolCallStream() if answer.tool_calls else None for _ in answer.generations]
    for index in range(len(answer.generations)):
        yield chunk([Choice(index=index, delta=Delta(role="assistant", content="", refusal=None), logprobs=None,
                            finish_reason=None)])
    async for index, text in _merged(answer.generations):
        logprobs = answer.new_logprobs(index)
        reader, finished = readers[index], text is None
        calls = None
        if reader is not None:
            text, deltas = reader.push(text) if text is not None else (reader.finish(), [])
            calls = [schemas.ToolCallDelta(index=i, function=schemas.FunctionCallDelta(arguments=args))
                     if call_id is None else
                     schemas.ToolCallDelta(index=i, id=call_id, type="function",
                                           function=schemas.FunctionCallDelta(name=name, arguments=args))
                     for i, call_id, name, args in deltas] or None
            text = text or None
        if text is not None or calls or (logprobs and logprobs["content"]):
            delta = Delta(content=text or "") if calls is None else (
                Delta(tool_calls=calls) if text is None else Delta(content=text, tool_calls=calls))
            yield chunk([Choice(index=index, delta=delta, logprobs=logprobs, finish_reason=None)])
        if finished:
            finish = _finish_reason(answer.generations[index], reader.calls if reader else 0)
            yield chunk([Choice(index=index, delta=Delta(), logprobs=None, finish_reason=finish)])
    if answer.include_usage:
        yield chunk([], answer.usage())
    yield "data: [DONE]\n\n"


async def completion_events(answer: Answer) -> AsyncIterator[str]:
    chunk = _chunk_writer(answer)
    Choice = schemas.CompletionChoice  # noqa: N806
    echoed = [not answer.echoes] * len(answer.generations)
    async for index, text in _merged(answer.generations):
        generation = answer.generations[index]
        logprobs = answer.new_logprobs(index)
        if not echoed[index]:  # after the first token: the prompt's logprobs are known by then
            echoed[index] = True
            echo = answer.echoes[index]
            yield chunk([Choice(index=index, text=echo.text, finish_reason=None,
                                logprobs=echo.logprobs(answer.tokenizer, generation) if answer.logprobs else None)])
        if text is not None or (logprobs and logprobs["tokens"]):
            yield chunk([Choice(index=index, text=text or "", logprobs=logprobs, finish_reason=None)])
        if text is None:
            yield chunk([Choice(index=index, text="", logprobs=None, finish_reason=generation.finish_reason)])
    if answer.include_usage:
        yield chunk([], answer.usage())
    yield "data: [DONE]\n\n"


class _StallGuardedStream(StreamingResponse):
    """A StreamingResponse that drops a client who accepts no bytes for `stall_timeout_s`.

    uvicorn's `send` waits while the socket's buffers are full, that is while the client does not read:
    without a bound such a client would keep its request, and its place among the requests the server
    holds, for as long as it keeps the connection open. On a stall the stream ends here: the events
    iterator is closed (its `finally` frees the rows) and the response is left unfinished, so uvicorn
    closes the connection."""

    def __init__(self, content: AsyncIterator[str], generations: list[Generation], stall_timeout_s: float,
                 **kwargs: Any):
        super().__init__(content, **kwargs)
        self.generations = generations
        self.stall_timeout_s = stall_timeout_s

    async def stream_response(self, send: Callable[..., Any]) -> None:
        async def send_in_time(message: dict[str, Any]) -> None:
            await asyncio.wait_for(send(message), self.stall_timeout_s)

        try:
            await send_in_time({"type": "http.response.start", "status": self.status_code,
                                "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send_in_time({"type": "http.response.body", "body": chunk.encode(self.charset),
                                    "more_body": True})
            await send_in_time({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            for generation in self.generations:
                generation.limit_hit = generation.limit_hit or "stall_timeout"
            log.warning("a streaming client accepted nothing for --stall-timeout (%g s): its request is "
                        "cancelled and its connection closed", self.stall_timeout_s)
        finally:
            await self.body_iterator.aclose()


def streaming_response(events: AsyncIterator[str], generations: list[Generation],
                       stall_timeout_s: float) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - headers are sent: report in-band, as OpenAI does
            log.exception("error while streaming a reply")
            yield sse(schemas.error_body(f"internal error while generating: {exc}", "server_error"))
        finally:
            for generation in generations:
                generation.cancel()

    return _StallGuardedStream(body(), generations, stall_timeout_s, media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- whole answers -----------------------------------------------------------------------------------


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect_unless_disconnected(request: Request, generations: list[Generation]) -> list[str] | None:
    """Runs the generations to the end; returns None (and frees their rows) if the client leaves first."""
    collect = asyncio.ensure_future(asyncio.gather(*(g.text() for g in generations)))
    watch = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
        if collect in done:
            return collect.result()
        return None
    finally:
        watch.cancel()
        if not collect.done():
            collect.cancel()
        for generation in generations:
            generation.cancel()


def chat_body(answer: Answer, texts: list[str]) -> schemas.ChatCompletion:
    choices = []
    for i, (generation, text) in enumerate(zip(answer.generations, texts, strict=True)):
        message, calls = schemas.AssistantMessage(content=text), 0
        if answer.tool_calls and generation.finish_reason == "stop":  # a cut reply is returned as text
            try:
                parsed = parse_assistant(text)
            except ToolCallError as exc:  # the grammar makes this a bug: the text is not lost
                log.error("a constrained reply did not parse as tool calls (%s): returned as text", exc)
            else:
                calls = len(parsed.tool_calls)
                message = schemas.AssistantMessage(content=parsed.content or None,
                                                   tool_calls=parsed.tool_calls or None)
        choices.append(schemas.ChatChoice(index=i, message=message, logprobs=answer.new_logprobs(i),
                                          finish_reason=_finish_reason(generation, calls)))
    return schemas.ChatCompletion(id=answer.completion_id, created=answer.created, model=answer.model,
                                  system_fingerprint=FINGERPRINT, usage=answer.usage(), choices=choices)


def completion_body(answer: Answer, texts: list[str]) -> schemas.Completion:
    choices = []
    for i, (generation, text) in enumerate(zip(answer.generations, texts, strict=True)):
        echo = answer.echoes[i] if answer.echoes else None
        logprobs = answer.new_logprobs(i)
        if echo is not None and answer.logprobs:
            logprobs = merge_logprobs(echo.logprobs(answer.tokenizer, generation), logprobs)
        choices.append(schemas.CompletionChoice(index=i, text=(echo.text if echo else "") + text,
                                                logprobs=logprobs, finish_reason=generation.finish_reason))
    return schemas.Completion(id=answer.completion_id, created=answer.created, model=answer.model,
                              system_fingerprint=FINGERPRINT, choices=choices, usage=answer.usage())
