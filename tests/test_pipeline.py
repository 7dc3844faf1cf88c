"""pipeline.py: the one text pipeline (stop ids in the params, the budget capped by the room left, raw
prompts checked) and its ReplyStream (offsets, stop ids kept in the text stream, sync and async drivers
agree)."""

from __future__ import annotations

import asyncio

import pytest

from gpt2chat.context_fit import PromptTooLongError
from gpt2chat.pipeline import BadPromptError, TextPipeline
from gpt2chat.sampling import SamplingParams


def test_params_carry_the_template_stops_and_fit_the_room_left(chat_tokenizer):
    pipeline = TextPipeline.for_chat(chat_tokenizer, 64, "llama3-context")
    eot = chat_tokenizer.token_to_id("<|eot_id|>")
    params = pipeline.params(SamplingParams(max_new_tokens=100, stop_token_ids=(7,)), prompt_tokens=50)
    assert params.max_new_tokens == 14
    assert params.stop_token_ids[0] == 7 and eot in params.stop_token_ids
    assert chat_tokenizer.eos_token_id in params.stop_token_ids
    assert pipeline.params(SamplingParams(), 10, stop=False).stop_token_ids == ()


def test_raw_prompts_are_checked_against_vocabulary_and_context(chat_tokenizer):
    pipeline = TextPipeline(chat_tokenizer, 16)
    assert pipeline.encode("") == [chat_tokenizer.eos_token_id]
    with pytest.raises(BadPromptError, match="outside the vocabulary"):
        pipeline.encode([1, len(chat_tokenizer) + 5])
    with pytest.raises(PromptTooLongError) as error:
        pipeline.encode("word " * 40)
    assert error.value.param == "prompt"
    with pytest.raises(Exception, match="no chat template"):
        pipeline.fit([{"role": "user", "content": "hi"}], 4)


def test_a_stop_id_left_to_the_stream_ends_the_reply_and_is_kept(chat_tokenizer):
    pipeline = TextPipeline.for_chat(chat_tokenizer, 256, "plain")
    eos = chat_tokenizer.eos_token_id
    ids = [*chat_tokenizer.encode("Hi there"), eos, *chat_tokenizer.encode(" more")]
    reply = pipeline.reply(chat=False, text_stop_ids=[eos])
    assert "".join(reply.pieces(ids)) == "Hi there"
    assert reply.token_ids == ids[: ids.index(eos) + 1] and reply.finish_reason(None) == "stop"
    assert reply.text_offsets == [0, 2, 8]


def test_the_async_driver_shows_what_the_blocking_one_shows(chat_tokenizer):
    pipeline = TextPipeline.for_chat(chat_tokenizer, 256, "plain")
    ids = chat_tokenizer.encode(" Sure, grüße 🎉\nUser: never shown")
    blocking = pipeline.reply()
    shown = list(blocking.pieces(ids))

    async def steps():
        for start in range(0, len(ids), 3):  # one engine step's worth at a time
            yield ids[start : start + 3]

    async def read():
        stream = pipeline.reply()
        return [piece async for piece in stream.apieces(steps())], stream

    pieces, stream = asyncio.run(read())
    assert "".join(pieces) == "".join(shown) == "Sure, grüße 🎉" and stream.done and blocking.done
    assert stream.token_ids == blocking.token_ids
