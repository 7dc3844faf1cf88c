"""Stock clients against the real stack: the tiny checkpoint behind the BatchedEngine behind uvicorn on
127.0.0.1, spoken to by the `openai` package and LangChain's ChatOpenAI, streaming and not. Greedy
replies must equal what the engine produces on its own for the same prompt; logprobs (chat, and text
completions with echo) must be OpenAI's shapes holding the model's own log_softmax."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from gpt2chat.serve.app import create_app
from serve_support import ServerThread, tiny_service, wait_until

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def service(tiny_checkpoint):
    service = tiny_service(tiny_checkpoint, max_batch_size=8, max_queue=8, max_tokens_limit=200)
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


# ---- logprobs: OpenAI's shapes, the model's numbers ----------------------------------------------------


def model_logprobs(service, ids: list[int]):
    """log_softmax of the model's logits over `ids` [T, V] (fp32): the independent reference."""
    import torch

    with torch.inference_mode():
        return torch.log_softmax(service.model(torch.tensor([ids]))[0].float(), dim=-1)


def token_ids_of(service, entries) -> list[int]:
    """The token ids behind logprob entries, from their bytes (each GPT-2 token's bytes are unique)."""
    by_bytes = {service.tokenizer.token_bytes(i): i for i in range(len(service.tokenizer))}
    return [by_bytes[bytes(entry.bytes)] for entry in entries]


def test_chat_logprobs_are_the_models_in_openais_shape_streamed_and_not(client, service, server):
    import httpx
    from openai.types.chat import ChatCompletion

    request = {"model": "tiny", "messages": MESSAGES, "max_tokens": 10, "temperature": 0, "logprobs": True,
               "top_logprobs": 3}
    raw = httpx.post(f"{server.url}/v1/chat/completions", json=request, timeout=60,
                     headers={"Authorization": "Bearer test-key"}).json()
    ChatCompletion.model_validate(raw)  # the openai package's own types accept it as it is
    entries = raw["choices"][0]["logprobs"]["content"]
    assert raw["choices"][0]["logprobs"]["refusal"] is None
    assert all(set(e) == {"token", "logprob", "bytes", "top_logprobs"} for e in entries)
    assert all(set(t) == {"token", "logprob", "bytes"} for e in entries for t in e["top_logprobs"])

    response = client.chat.completions.create(**request)
    content = response.choices[0].logprobs.content
    assert len(content) == len(entries) == response.usage.completion_tokens - (response.choices[0].finish_reason == "stop")
    ids, _ = render_prompt(service)
    reply = token_ids_of(service, content)
    # llama3-context: no reply prefix, no stop string; control tokens are scored but not shown
    assert service.tokenizer.decode(reply, skip_special_tokens=True) == response.choices[0].message.content
    reference = model_logprobs(service, ids + reply)
    for position, (entry, token) in enumerate(zip(content, reply, strict=True)):
        row = reference[len(ids) - 1 + position]
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
        top = entry.top_logprobs
        assert len(top) == 3 and [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert top[0].token == entry.token and top[0].logprob == entry.logprob  # greedy: the chosen is the top
        assert top[1].logprob == pytest.approx(float(row.topk(2).values[1]), abs=1e-4)

    stream = client.chat.completions.create(**request, stream=True)
    streamed = [e for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for e in chunk.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def render_prompt(service):
    from gpt2chat.templates import render_chat

    return render_chat(service.tokenizer, MESSAGES, service.template.name, add_generation_prompt=True)


def test_completion_echo_scores_every_prompt_token_streamed_and_not(client, service):
    prompt = "Once upon a time there was"
    ids = service.tokenizer.encode(prompt)
    request = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 2}
    response = client.completions.create(**request)
    choice = response.choices[0]
    logprobs = choice.logprobs
    generated = len(logprobs.tokens) - len(ids)
    assert 1 <= generated <= 4 and response.usage.completion_tokens == generated
    assert choice.text.startswith(prompt) and "".join(logprobs.tokens) == choice.text
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # nothing predicts it
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    all_ids = ids + service.tokenizer.encode(choice.text[len(prompt):])
    reference = model_logprobs(service, all_ids)
    for position in range(1, len(all_ids)):
        expected = float(reference[position - 1, all_ids[position]])
        assert logprobs.token_logprobs[position] == pytest.approx(expected, abs=1e-4)
        top = logprobs.top_logprobs[position]
        assert logprobs.tokens[position] in top and 2 <= len(top) <= 3  # the 2 most likely and the chosen one
        best = float(reference[position - 1].max())
        assert max(top.values()) == pytest.approx(best, abs=1e-4)

    stream = client.completions.create(**request, stream=True)
    tokens, token_logprobs, text = [], [], ""
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
            if chunk.choices[0].logprobs:
                tokens += chunk.choices[0].logprobs.tokens
                token_logprobs += chunk.choices[0].logprobs.token_logprobs
    assert (text, tokens, token_logprobs) == (choice.text, logprobs.tokens, logprobs.token_logprobs)


def test_a_batch_of_token_id_prompts_is_scored_like_lm_eval_asks(server, service):
    """lm-eval's local-completions sends token-id lists, echo, max_tokens 1, logprobs 1, and reads
    token_logprobs[context:-1]: the last entry must be the generated token even when it is a stop token."""
    import httpx

    tok = service.tokenizer
    prompts = [tok.encode("The sky is blue"), tok.encode("Two plus two is four")]
    eot = tok.token_to_id("<|eot_id|>")
    prompts.append(tok.encode("Bye") + [eot])  # whatever follows, the reply must be exactly one token
    raw = httpx.post(f"{server.url}/v1/completions", timeout=60, headers={"Authorization": "Bearer test-key"},
                     json={"model": "tiny", "prompt": prompts, "max_tokens": 1, "logprobs": 1, "echo": True,
                           "temperature": 0, "seed": 1234}).json()
    choices = sorted(raw["choices"], key=lambda c: c["index"])
    assert len(choices) == len(prompts)
    for ids, choice in zip(prompts, choices, strict=True):
        columns = choice["logprobs"]
        assert len(columns["tokens"]) == len(ids) + 1 and len(columns["token_logprobs"]) == len(ids) + 1
        reference = model_logprobs(service, ids)
        for position in range(1, len(ids)):
            assert columns["token_logprobs"][position] == pytest.approx(
                float(reference[position - 1, ids[position]]), abs=1e-4)


def test_stop_token_of_a_scored_completion_is_reported_with_its_logprob(service):
    """A model that always says end-of-text (its final norm points every state at that token's
    embedding): a scored completion lists the stop token with its logprob, as OpenAI and vLLM do; an
    unscored one just stops, the stop token counted in usage."""
    import copy

    import httpx
    import torch

    from gpt2chat.serve.limits import ServerLimits
    from gpt2chat.serve.service import ChatService

    tok = service.tokenizer
    model = copy.deepcopy(service.model)
    with torch.no_grad():
        direction = torch.randn(model.config.n_embd)
        model.transformer.wte.weight[tok.eos_token_id] = 100 * direction / direction.norm()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction / direction.norm())
    sure = ChatService(model, tok, model_name="eos", limits=ServerLimits(max_batch_size=2), device="cpu")
    try:
        with ServerThread(create_app(sure)) as srv:
            scored = httpx.post(f"{srv.url}/v1/completions", timeout=60, json={
                "prompt": "Hi", "max_tokens": 5, "logprobs": 0, "temperature": 0}).json()["choices"][0]
            assert scored["finish_reason"] == "stop" and scored["text"] == ""
            assert scored["logprobs"]["tokens"] == ["<|endoftext|>"]
            assert scored["logprobs"]["token_logprobs"][0] > -1e-3  # certain
            plain = httpx.post(f"{srv.url}/v1/completions", timeout=60, json={
                "prompt": "Hi", "max_tokens": 5, "temperature": 0}).json()
            assert plain["choices"][0]["finish_reason"] == "stop" and plain["choices"][0]["logprobs"] is None
            assert plain["usage"]["completion_tokens"] == 1
    finally:
        sure.close()
