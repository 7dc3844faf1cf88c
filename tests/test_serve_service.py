"""ChatService pieces without HTTP, on the real engine: chat replies lose the template's reply prefix and
stop strings (raw completions do not), context truncation from the oldest turns with the real
llama3-context template; and queue admission, where slowed engine steps keep requests running."""

from __future__ import annotations

import asyncio

import pytest

from gpt2chat.serve.service import GenerationSettings, PromptTooLongError, ServerBusyError, TooManyTokensError
from serve_support import tiny_service


@pytest.fixture(scope="module")
def plain_service(tmp_path_factory):
    """The real engine on a tiny checkpoint saved with the "plain" template (replies follow "Assistant:"
    after a space, the template's reply prefix)."""
    from gpt2chat.checkpoint import init_checkpoint

    folder = init_checkpoint("tiny", tmp_path_factory.mktemp("plain"), template="plain", seed=1)
    service = tiny_service(folder)
    yield service
    service.close()


def engine_reply(service, prompt_ids, max_tokens):
    from gpt2chat.engine import Engine
    from gpt2chat.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=max_tokens, temperature=0, stop_token_ids=service.pipeline.stop_ids)
    return Engine(service.model, device="cpu").generate([prompt_ids], params)[0]


def test_chat_replies_lose_the_reply_prefix_and_stop_strings_raw_completions_keep_them(plain_service):
    service = plain_service
    assert (service.template.reply_prefix, service.template.stop_strings) == (" ", ("\nUser:",))
    messages = [{"role": "user", "content": "hi"}]
    ids = service.render_messages(messages)
    expected = service.tokenizer.decode(engine_reply(service, ids, 12).token_ids, skip_special_tokens=True)

    async def both():
        settings = service.settings(len(ids), 12, temperature=0)
        (chat,) = service.start(ids, settings, chat=True)
        (raw,) = service.start(ids, settings, chat=False)
        return await chat.text(), await raw.text()

    chat_text, raw_text = asyncio.run(both())
    assert raw_text == expected
    shown = expected[1:] if expected.startswith(" ") else expected
    assert chat_text == shown.split("\nUser:")[0]
    assert service.outstanding == 0


def test_limits_on_tokens_and_queue(tiny_checkpoint):
    service = tiny_service(tiny_checkpoint, step_s=0.05, max_batch_size=1, max_queue=1, max_tokens_limit=16)
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


def test_truncation_drops_oldest_turns_with_the_llama3_template(tiny_checkpoint):
    service = tiny_service(tiny_checkpoint)
    tokenizer = service.tokenizer
    assert service.template.name == "llama3-context"  # the checkpoint's own
    try:
        messages = [{"role": "system", "content": "Be brief."}]
        for turn in range(10):
            messages += [{"role": "user", "content": f"question {turn} " + "word " * 12},
                         {"role": "assistant", "content": f"answer {turn} " + "word " * 12}]
        messages.append({"role": "user", "content": "last question"})
        with pytest.raises(PromptTooLongError, match="truncate"):
            service.render_messages(messages)
        ids = service.render_messages(messages, truncate=True, max_tokens=8)
        text = tokenizer.decode(ids)
        assert len(ids) <= 256 - 8 and "Be brief." in text and "last question" in text
        assert "question 0" not in text and "answer 9" in text  # oldest turns went first
        assert text.endswith("<|start_header_id|>assistant<|end_header_id|>")
        with pytest.raises(PromptTooLongError):  # a last message that alone cannot fit
            service.render_messages([{"role": "user", "content": "word " * 300}], truncate=True)
    finally:
        service.close()


def test_a_server_with_no_waiting_room_still_answers_one_request_per_row(tiny_checkpoint):
    service = tiny_service(tiny_checkpoint, max_batch_size=1, max_queue=0)
    try:
        async def one():
            ids = service.render_messages([{"role": "user", "content": "Hi"}])
            (generation,) = service.start(ids, service.settings(len(ids), 2))
            with pytest.raises(ServerBusyError):  # the one row is taken, and nothing may wait
                service.start(ids, service.settings(len(ids), 2))
            return await generation.text(), generation

        _, generation = asyncio.run(one())
        assert generation.finish_reason in ("stop", "length") and service.outstanding == 0
    finally:
        service.close()
