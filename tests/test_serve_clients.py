"""Stock clients against the real stack: the tiny checkpoint behind the BatchedEngine behind uvicorn on
127.0.0.1, spoken to by the `openai` package and LangChain's ChatOpenAI, streaming and not. Greedy
replies must equal what the engine produces on its own for the same prompt."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from gpt2chat.serve.app import create_app
from test_serve_helpers import ServerThread, wait_until

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def service(tiny_checkpoint):
    from gpt2chat.checkpoint import load_model
    from gpt2chat.serve.limits import ServerLimits
    from gpt2chat.serve.service import ChatService

    model, tokenizer = load_model(tiny_checkpoint, device="cpu")
    limits = ServerLimits(max_batch_size=8, max_queue=8, max_tokens_limit=200)
    service = ChatService(model, tokenizer, model_name="tiny", limits=limits, device="cpu")
    yield service
    service.close()


@pytest.fixture(scope="module")
def server(service):
    with ServerThread(create_app(service, api_key="test-key")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="test-key", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def greedy_reference(service):
    """The reply the engine gives on its own (no server): greedy, 12 tokens, cut at the template's stops."""
    from gpt2chat.engine import Engine
    from gpt2chat.sampling import SamplingParams
    from gpt2chat.templates import render_chat

    ids, _ = render_chat(service.tokenizer, MESSAGES, service.template.name, add_generation_prompt=True)
    stops = tuple(service.template.stop_token_ids(service.tokenizer))
    (result,) = Engine(service.model, device="cpu").generate(
        [ids], SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=stops))
    text = service.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    return text, len(result.token_ids), result.finish_reason


def test_openai_client_non_streaming_matches_the_engine(client, greedy_reference):
    text, tokens, finish = greedy_reference
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    assert response.choices[0].message.content == text
    assert response.choices[0].finish_reason == finish
    assert response.usage.completion_tokens == tokens + (finish == "stop")  # the stop token counts
    assert response.usage.prompt_tokens > 10


def test_openai_client_streaming_gives_the_same_text(client, greedy_reference):
    text, _, finish = greedy_reference
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [finish]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_openai_client_text_completion_and_seed(client):
    first = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, seed=7,
                                      temperature=1.0)
    again = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, seed=7,
                                      temperature=1.0)
    assert first.choices[0].text == again.choices[0].text
    assert first.usage.completion_tokens <= 6
    streamed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, seed=7,
                                         temperature=1.0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == first.choices[0].text


def test_openai_client_sees_errors_as_its_exceptions(client, server):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=-3)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello " * 300}])
    wrong_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_langchain_chat_openai_invoke_and_stream(server, greedy_reference):
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    text, _, _ = greedy_reference
    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="test-key", model="tiny", temperature=0,
                     max_tokens=12, max_retries=0, timeout=60)
    history = [SystemMessage(MESSAGES[0]["content"]), HumanMessage(MESSAGES[1]["content"])]
    assert llm.invoke(history).content == text
    assert "".join(chunk.content for chunk in llm.stream(history)) == text


def test_concurrent_streams_share_the_engine_and_a_disconnect_frees_the_slot(client, service):
    engine = service.engine
    submitted = []
    original_submit = engine.submit

    def recording_submit(prompt_ids, params):
        request = original_submit(prompt_ids, params)
        submitted.append(request)
        return request

    engine.submit = recording_submit
    try:
        replies: list[str] = []
        barrier = threading.Barrier(4)

        def one_stream():
            barrier.wait()
            stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=60,
                                                    temperature=1.0, seed=len(replies), stream=True)
            replies.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))

        threads = [threading.Thread(target=one_stream) for _ in range(4)]
        for t in threads:
            t.start()
        peak = 0
        while any(t.is_alive() for t in threads):
            peak = max(peak, engine.active_count)
            time.sleep(0.001)
        assert len(replies) == 4
        assert peak >= 2  # requests decoded together, not one after another

        # a streaming client that goes away mid-reply: its row is freed, its request cancelled
        submitted.clear()
        with httpx.Client(base_url=str(client.base_url), timeout=60,
                          headers={"Authorization": "Bearer test-key"}) as http:
            with http.stream("POST", "chat/completions", json={
                    "messages": MESSAGES, "max_tokens": 200, "stream": True, "stop": ["\u0000never"]}) as response:
                lines = response.iter_lines()
                next(lines)
                next(lines)
        assert wait_until(lambda: engine.active_count == 0 and service.outstanding == 0, timeout=10)
        (request,) = submitted
        assert request.finish_reason == "cancelled" and request.completion_tokens < 200
    finally:
        engine.submit = original_submit
