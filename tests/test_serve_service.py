"""ChatService pieces without HTTP: the template's reply prefix, stop tokens, context truncation from the
oldest turns with the real llama3-context template, queue admission, and completions' own stop check."""

from __future__ import annotations

import asyncio

import pytest

from gpt2chat.serve.service import GenerationSettings, PromptTooLongError, ServerBusyError, TooManyTokensError
from test_serve_helpers import StandInEngine, StandInModel, standin_service


def collect(service, messages, max_tokens=8, stop=()):
    async def main():
        ids = service.render_messages(messages)
        settings = service.settings(len(ids), max_tokens, stop=list(stop))
        (generation,) = service.start(ids, settings)
        return await generation.text(), generation

    return asyncio.run(main())


def test_reply_prefix_of_the_template_is_stripped():
    service = standin_service(StandInEngine(token_ids=(18435, 995)))  # " Hello", " world"
    assert service.template.reply_prefix == " "  # the plain template's "Assistant:" + " " + reply
    try:
        text, generation = collect(service, [{"role": "user", "content": "hi"}], max_tokens=3)
        assert text == "Hello world Hello" and generation.finish_reason == "length"
    finally:
        service.close()


def test_stop_token_ends_the_reply_and_is_counted():
    engine = StandInEngine(token_ids=(40, 716, 50256))  # "I", " am", <|endoftext|>
    service = standin_service(engine)
    try:
        text, generation = collect(service, [{"role": "user", "content": "hi"}], max_tokens=10)
        # the engine stopped at the template's stop id (never delivered), counted as a generated token
        assert (text, generation.finish_reason, generation.completion_tokens) == ("I am", "stop", 3)
        assert generation.token_ids == [40, 716]
        assert service.outstanding == 0
    finally:
        service.close()


def test_limits_on_tokens_and_queue():
    service = standin_service(max_batch_size=1, max_queue=1, max_tokens_limit=16)
    try:
        with pytest.raises(TooManyTokensError, match="max_tokens=17"):
            service.settings(10, 17)
        assert service.settings(250, None).max_new_tokens == 6  # the room left
        assert service.settings(10, None, seed=-5).seed >= 0
        settings = GenerationSettings(max_new_tokens=200)
        held = service.start([1, 2], settings, n=2)
        with pytest.raises(ServerBusyError):
            service.start([1, 2], settings)
        for generation in held:
            generation.cancel()
        assert service.outstanding == 0
        service.start([1, 2], settings)[0].cancel()
    finally:
        service.close()


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_checkpoint):
    from gpt2chat.tokenizer import Tokenizer

    return Tokenizer.from_dir(tiny_checkpoint)


def test_truncation_drops_oldest_turns_with_the_llama3_template(tiny_tokenizer):
    from gpt2chat.serve.service import ChatService

    service = ChatService(StandInModel(128), tiny_tokenizer, engine=StandInEngine())
    assert service.template.name == "llama3-context"  # the checkpoint's own
    try:
        messages = [{"role": "system", "content": "Be brief."}]
        for turn in range(6):
            messages += [{"role": "user", "content": f"question {turn} " + "word " * 12},
                         {"role": "assistant", "content": f"answer {turn} " + "word " * 12}]
        messages.append({"role": "user", "content": "last question"})
        with pytest.raises(PromptTooLongError, match="truncate"):
            service.render_messages(messages)
        ids = service.render_messages(messages, truncate=True, max_tokens=8)
        text = tiny_tokenizer.decode(ids)
        assert len(ids) <= 128 - 8 and "Be brief." in text and "last question" in text
        assert "question 0" not in text and "answer 5" in text  # oldest turns went first
        assert text.endswith("<|start_header_id|>assistant<|end_header_id|>")
        with pytest.raises(PromptTooLongError):  # a last message that alone cannot fit
            service.render_messages([{"role": "user", "content": "word " * 200}], truncate=True)
    finally:
        service.close()

