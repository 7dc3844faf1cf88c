"""The HTTP API's contract, over a real uvicorn server and the real engine on the tiny model: OpenAI
response and SSE shapes, replies equal to the engine's own greedy output, stop strings and logprobs through
hold-back, every malformed request answered 4xx with one plain sentence in an OpenAI-style body, fields we
do not implement refused by name, limits (context, max tokens, body size, queue) and API keys. Where a test
needs a reply slower than it can watch (the queue), each engine step is slowed (`serve_support.pace`)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from gpt2chat.serve.app import create_app
from serve_support import (
    ServerThread,
    assert_openai_error,
    tiny_service,
    wait_until,
)

USER = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    service = tiny_service(tiny_checkpoint, max_body_bytes=64 * 1024)
    with ServerThread(create_app(service)) as srv:
        srv.service = service
        yield srv
    service.close()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def reference(server):
    """`reference(messages or prompt, max_tokens, logprobs=None)` -> the engine's own greedy result
    (an `Engine` on the same model, no server): token ids, finish reason, logprobs."""
    from gpt2chat.engine import Engine
    from gpt2chat.sampling import SamplingParams

    service = server.service
    engine = Engine(service.model, device="cpu")

    def run(what, max_tokens: int, logprobs: int | None = None):
        ids = service.render_messages(what) if isinstance(what, list) else service.tokenizer.encode(what)
        params = SamplingParams(max_new_tokens=max_tokens, temperature=0, stop_token_ids=service.pipeline.stop_ids,
                                logprobs=logprobs)
        return engine.generate([ids], params)[0]

    return run


def text_of(server, token_ids) -> str:
    return server.service.tokenizer.decode(token_ids, skip_special_tokens=True)


def sse_events(response: httpx.Response) -> list:
    """Every `data:` payload of an SSE stream, parsed ("[DONE]" kept as a string); checks the framing."""
    events = []
    for block in response.text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---- successful requests -------------------------------------------------------------------------------


def test_chat_completion_has_openai_shape_and_the_engines_reply(client, server, reference):
    expected = reference(USER, 6)
    body = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 6, "temperature": 0}).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == text_of(server, expected.token_ids)
    assert choice["finish_reason"] == expected.finish_reason and choice["logprobs"] is None
    usage = body["usage"]
    generated = len(expected.token_ids) + (expected.finish_reason == "stop")  # the stop token counts
    assert usage["completion_tokens"] == generated
    assert usage["prompt_tokens"] == len(server.service.render_messages(USER))
    assert usage["total_tokens"] == usage["prompt_tokens"] + generated


@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Answer in French."}, *USER],
    [*USER, {"role": "assistant", "content": "Hi."}, {"role": "developer", "content": "Be brief."}, *USER],
    [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "clock", "arguments": "{}"}}]},
     {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}],
], ids=["two-systems", "mid-conversation-system", "after-a-tool-answer"])
def test_system_messages_anywhere_and_tool_turns_are_answered(client, server, reference, messages):
    expected = reference([{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages], 4)
    response = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == text_of(server, expected.token_ids)
    assert body["usage"]["prompt_tokens"] == len(server.service.render_messages(
        [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]))


def test_a_malformed_tool_call_in_the_history_is_a_400_naming_it(client):
    messages = [*USER, {"role": "assistant", "content": None,
                        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]
    error = assert_openai_error(client.post("/v1/chat/completions", json={"messages": [*messages, *USER]}), 400)
    assert error["message"].startswith("messages[1].tool_calls[0].function.arguments: not valid JSON")


def stop_inside(text: str) -> tuple[str, str]:
    """A stop string taken from the middle of `text` and the text shown before it."""
    assert len(text) >= 8, f"the tiny model's reply is too short to cut: {text!r}"
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    return stop, text[: text.find(stop)]


def test_stop_string_ends_reply_with_finish_reason_stop(client, server, reference):
    stop, shown = stop_inside(text_of(server, reference(USER, 20).token_ids))
    body = client.post("/v1/chat/completions", json={
        "messages": USER, "max_tokens": 20, "temperature": 0, "stop": [stop, "\u0000zzz"]}).json()
    assert body["choices"][0]["message"]["content"] == shown
    assert body["choices"][0]["finish_reason"] == "stop"


def test_logprob_entries_follow_their_tokens_through_hold_back_and_stop_strings(client, server, reference):
    """A stop string ends the text mid-reply; every token delivered until it completed keeps its entry,
    streamed (with the chunk that shows its text, or a later one while the text is held back) and not,
    equal to the engine's own logprobs."""
    expected = reference(USER, 20, logprobs=2)
    stop, shown = stop_inside(text_of(server, expected.token_ids))
    delivered = next(n for n in range(1, len(expected.token_ids) + 1)
                     if stop in text_of(server, expected.token_ids[:n]))
    request = {"messages": USER, "max_tokens": 20, "temperature": 0, "stop": [stop], "logprobs": True,
               "top_logprobs": 2}
    choice = client.post("/v1/chat/completions", json=request).json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == (shown, "stop")
    content = choice["logprobs"]["content"]
    from gpt2chat.reply_text import token_text

    tok = server.service.tokenizer
    assert [(e["token"], e["logprob"]) for e in content] == [
        (token_text(tok, e.token_id), e.logprob) for e in expected.logprobs[:delivered]]
    assert [[t["token"] for t in e["top_logprobs"]] for e in content] == [
        [token_text(tok, t) for t, _ in e.top] for e in expected.logprobs[:delivered]]
    assert all(e["bytes"] == list(tok.token_bytes(x.token_id)) for e, x in zip(content, expected.logprobs, strict=False))

    chunks = [e for e in sse_events(client.post("/v1/chat/completions", json={**request, "stream": True}))
              if e != "[DONE]"]
    streamed = [e for c in chunks for e in ((c["choices"][0]["logprobs"] or {}).get("content") or [])]
    assert streamed == content
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == shown


def test_completion_logprobs_have_openais_columns(client, server, reference):
    expected = reference("Hi", 3, logprobs=1)
    columns = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "logprobs": 1,
                                                    "temperature": 0}).json()["choices"][0]["logprobs"]
    assert set(columns) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert columns["token_logprobs"] == [e.logprob for e in expected.logprobs]
    assert columns["text_offset"] == [len("".join(columns["tokens"][:i])) for i in range(len(columns["tokens"]))]
    for entry, top in zip(expected.logprobs, columns["top_logprobs"], strict=True):
        assert len(top) in (1, 2) and max(top.values()) == entry.top[0][1]  # the most likely + the chosen


@pytest.mark.parametrize("route, body", [("/v1/chat/completions", {"messages": USER}),
                                         ("/v1/completions", {"prompt": "Hi"})])
def test_another_model_name_is_a_404_as_openai_and_vllm_answer(client, route, body):
    error = assert_openai_error(client.post(route, json={**body, "max_tokens": 2, "model": "gpt-4o"}), 404)
    assert (error["code"], error["param"], error["type"]) == ("model_not_found", "model", "invalid_request_error")
    assert "'gpt-4o'" in error["message"] and "'tiny'" in error["message"]
    for named in ({"model": "tiny"}, {}, {"model": ""}):  # vLLM: no model (or "") is the served one
        answered = client.post(route, json={**body, "max_tokens": 2, **named})
        assert answered.status_code == 200 and answered.json()["model"] == "tiny"
    assert assert_openai_error(client.get("/v1/models/gpt-4o"), 404)["code"] == "model_not_found"


def test_streaming_chat_follows_openai_chunks(client, server, reference):
    expected = reference(USER, 4)
    response = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4, "stream": True,
                                                          "temperature": 0})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == text_of(server, expected.token_ids)
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == expected.finish_reason
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_stream_options_include_usage_adds_a_usage_chunk(client, reference):
    expected = reference(USER, 3)
    events = sse_events(client.post("/v1/chat/completions", json={
        "messages": USER, "max_tokens": 3, "stream": True, "temperature": 0,
        "stream_options": {"include_usage": True}}))
    *chunks, usage_chunk, done = events
    assert done == "[DONE]"
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == len(expected.token_ids) + (expected.finish_reason == "stop")
    assert all(c["usage"] is None for c in chunks)


def test_usage_reports_the_prompt_tokens_the_cache_supplied_streamed_and_whole(client):
    """OpenAI's `usage.prompt_tokens_details.cached_tokens`: the engine's count for this request. A prompt
    sent again (a retry, a regenerate) is served from the cache but for its last token."""
    messages = [{"role": "system", "content": "You answer in one word about caches."},
                {"role": "user", "content": "Which prefix of this prompt was cached?"}]
    request = {"messages": messages, "max_tokens": 2, "temperature": 0}
    body = client.post("/v1/chat/completions", json=request).json()
    prompt_tokens = body["usage"]["prompt_tokens"]
    assert set(body["usage"]["prompt_tokens_details"]) == {"cached_tokens"}
    again = client.post("/v1/chat/completions", json=request).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == prompt_tokens - 1
    events = sse_events(client.post("/v1/chat/completions", json={
        **request, "stream": True, "stream_options": {"include_usage": True}}))
    usage = events[-2]["usage"]
    assert usage["prompt_tokens"] == prompt_tokens
    assert usage["prompt_tokens_details"] == {"cached_tokens": prompt_tokens - 1}
    # another question under the same system message shares at least the system message's tokens
    other = [messages[0], {"role": "user", "content": "Name a cache."}]
    shared = client.post("/v1/chat/completions", json={**request, "messages": other}).json()["usage"]
    assert 8 < shared["prompt_tokens_details"]["cached_tokens"] < shared["prompt_tokens"] - 1


def test_n_choices_stream_and_non_stream(client):
    body = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, "n": 3, "seed": 5}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert 3 <= body["usage"]["completion_tokens"] <= 6
    events = sse_events(client.post("/v1/chat/completions",
                                    json={"messages": USER, "max_tokens": 2, "n": 2, "stream": True}))
    finished = [c["choices"][0]["index"] for c in events[:-1] if c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1]


def test_text_completions_accept_string_list_and_token_ids(client, server, reference):
    expected = reference("Once", 3)
    body = client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 3, "temperature": 0}).json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == text_of(server, expected.token_ids)
    body = client.post("/v1/completions", json={"prompt": ["A", "B"], "max_tokens": 1, "echo": True}).json()
    assert [c["text"][:1] for c in body["choices"]] == ["A", "B"]
    assert body["usage"]["prompt_tokens"] == 2
    body = client.post("/v1/completions", json={"prompt": [464, 3290], "max_tokens": 1}).json()
    assert body["usage"]["prompt_tokens"] == 2
    events = sse_events(client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 3, "stream": True,
                                                             "temperature": 0}))
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == expected.finish_reason
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == text_of(server, expected.token_ids)


def test_models_health_openapi_and_page(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert client.get("/v1/models/tiny").json()["object"] == "model"
    assert_openai_error(client.get("/v1/models/gpt-4"), 404)
    assert client.get("/health").json()["status"] == "ok"
    schema = client.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(schema["paths"])
    page = client.get("/")
    assert page.status_code == 200 and "<textarea" in page.text
    assert client.get("/static/app.js").status_code == 200


# ---- malformed requests: always 4xx with an OpenAI error body ------------------------------------------

BAD_CHAT_BODIES = {
    "bad json": b'{"messages": [',
    "not an object": b"[1, 2]",
    "missing messages": {"max_tokens": 3},
    "messages not a list": {"messages": "hi"},
    "empty messages": {"messages": []},
    "unknown role": {"messages": [{"role": "wizard", "content": "hi"}]},
    "tool role": {"messages": [{"role": "tool", "content": "hi"}]},
    "content wrong type": {"messages": [{"role": "user", "content": 5}]},
    "message not an object": {"messages": ["hi"]},
    "negative max_tokens": {"messages": USER, "max_tokens": -1},
    "zero max_tokens": {"messages": USER, "max_tokens": 0},
    "max_tokens as string": {"messages": USER, "max_tokens": "5"},
    "max_tokens over server limit": {"messages": USER, "max_tokens": 100000},
    "temperature as word": {"messages": USER, "temperature": "hot"},
    "temperature too high": {"messages": USER, "temperature": 3},
    "top_p zero": {"messages": USER, "top_p": 0},
    "n too large": {"messages": USER, "n": 100},
    "n as bool": {"messages": USER, "n": True},
    "stop wrong type": {"messages": USER, "stop": 5},
    "stream wrong type": {"messages": USER, "stream": "yes"},
    "seed wrong type": {"messages": USER, "seed": 1.5},
    "prompt longer than context": {"messages": [{"role": "user", "content": "word " * 400}]},
}


@pytest.mark.parametrize("body", BAD_CHAT_BODIES.values(), ids=BAD_CHAT_BODIES.keys())
def test_malformed_chat_request_is_400(client, body):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    error = assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("body", BAD_CHAT_BODIES.values(), ids=BAD_CHAT_BODIES.keys())
def test_every_rejected_body_gets_one_plain_sentence(client, body):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    error = assert_openai_error(client.post("/v1/chat/completions", content=content,
                                            headers={"content-type": "application/json"}), 400)
    message = error["message"]
    for jargon in ("Input should", "problem", "list[", "str'", "literal_error", "loc", "body."):
        assert jargon not in message, message
    if error["param"]:
        assert message.startswith(error["param"]) or error["param"] in message


@pytest.mark.parametrize("body, param, message", [
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop",
     "stop must be a string or a list of at most 4 strings; got a list of 5 items."),
    ({"messages": USER, "stop": [1]}, "stop[0]", "stop[0] must be a string; got 1."),
    ({"messages": USER, "stop": ["a", None]}, "stop[1]", "stop[1] must be a string; got null."),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type", 'messages[0].content[0].type must be "text" (this server reads text parts only); '
     'got "image_url".'),
    ({"messages": [*USER, {"role": "assistant", "content": None, "tool_calls": "f()"}]}, "messages[1].tool_calls",
     'messages[1].tool_calls must be a list of tool calls; got "f()".'),
    ({"messages": [*USER, {"role": "tool", "content": "1", "tool_call_id": 7}]}, "messages[1].tool_call_id",
     "messages[1].tool_call_id must be a string; got 7."),
    ({"messages": ["hi"]}, "messages[0]", 'messages[0] must be a message like {"role": "user", "content": "Hi"}; '
     'got "hi".'),
    ({"max_tokens": 3}, "messages", "messages is required: give a non-empty list of messages, each with a role "
     "('system', 'developer', 'user', 'assistant' or 'tool') and a string content."),
    ({"messages": USER, "temperature": "x", "top_p": 5}, "temperature",
     'temperature must be a number from 0 to 2; got "x". Also invalid: top_p.'),
    ({"messages": USER, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage",
     'stream_options.include_usage must be true or false; got "yes".'),
])
def test_validation_errors_name_the_field_and_what_it_accepts(client, body, param, message):
    error = assert_openai_error(client.post("/v1/chat/completions", json=body), 400)
    assert (error["param"], error["message"]) == (param, message)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_a_body_that_is_not_utf8_is_named_so(client, route):
    content = b'{"messages": [{"role": "user", "content": "caf\xe9"}], "prompt": "x"}'  # Latin-1, not UTF-8
    error = assert_openai_error(client.post(route, content=content, headers={"content-type": "application/json"}),
                                400)
    offset = content.index(b"\xe9")
    assert error["message"] == (f"the request body is not valid UTF-8: byte 0xe9 at offset {offset} cannot be "
                                "decoded (send the JSON encoded as UTF-8)")


UNSUPPORTED_CHAT = {
    "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "required",
    "functions": [{"name": "f"}],
    "function_call": {"name": "f"},
    "logit_bias": {"50256": -100},
    "presence_penalty": 0.5,
    "frequency_penalty": -1,
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
}


@pytest.mark.parametrize("field", UNSUPPORTED_CHAT)
def test_a_field_that_would_change_the_answer_is_refused_by_name(client, field):
    error = assert_openai_error(client.post("/v1/chat/completions", json={
        "messages": USER, field: UNSUPPORTED_CHAT[field]}), 400)
    assert error["param"] == field and field in error["message"] and error["code"] == "unsupported_parameter"


@pytest.mark.parametrize("field, value", [("suffix", "tail"), ("best_of", 3), ("logit_bias", {"1": 5})])
def test_completion_fields_we_do_not_implement_are_refused(client, field, value):
    error = assert_openai_error(client.post("/v1/completions", json={"prompt": "x", field: value}), 400)
    assert error["param"] == field


def test_fields_that_change_nothing_are_accepted_and_ignored(client):
    plain = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4, "temperature": 0}).json()
    extras = {"user": "u-1", "metadata": {"a": "b"}, "store": False, "service_tier": "auto",
              "parallel_tool_calls": True, "reasoning_effort": "low", "response_format": {"type": "text"},
              "tool_choice": "none", "tools": [], "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0,
              "modalities": ["text"], "prediction": {"type": "content", "content": "x"}, "some_future_field": 1}
    body = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4, "temperature": 0,
                                                      **extras}).json()
    assert body["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "best_of": 1}).status_code == 200


def test_error_names_the_field_and_the_context_limit(client):
    error = assert_openai_error(client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": -1}), 400)
    assert error["param"] == "max_tokens"
    error = assert_openai_error(client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "word " * 400}]}), 400)
    assert error["code"] == "context_length_exceeded" and "256 tokens" in error["message"]


@pytest.mark.parametrize("body", [{"prompt": 5}, {"prompt": []}, {"prompt": [-1]}, {"prompt": [10**9]},
                                  {"prompt": "x", "max_tokens": -2}, {"prompt": ["a"] * 5, "n": 2}, {}])
def test_malformed_completion_request_is_400(client, body):
    assert_openai_error(client.post("/v1/completions", json=body), 400)


def test_unknown_route_and_wrong_method(client):
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert_openai_error(client.get("/v1/chat/completions"), 405)


def test_truncate_drops_the_oldest_turns(client):
    long_history = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "first " * 200}, {"role": "assistant", "content": "reply " * 60},
                    {"role": "user", "content": "And now?"}]
    assert_openai_error(client.post("/v1/chat/completions", json={"messages": long_history, "max_tokens": 2}), 400)
    body = client.post("/v1/chat/completions",
                       json={"messages": long_history, "max_tokens": 2, "truncate": True}).json()
    assert body["usage"]["prompt_tokens"] < 40  # system + last user turn only
    # a raw text prompt has no turns to drop, and its front is never cut
    error = assert_openai_error(client.post("/v1/completions", json={
        "prompt": "w " * 400, "max_tokens": 1, "truncate": True}), 400)
    assert error["param"] == "truncate"


def test_body_size_limit_is_413_with_and_without_content_length(client, server):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 70_000}]}).encode()
    assert_openai_error(client.post("/v1/chat/completions", content=big,
                                    headers={"content-type": "application/json"}), 413)

    def chunked():
        for start in range(0, len(big), 8192):
            yield big[start:start + 8192]

    assert_openai_error(client.post("/v1/chat/completions", content=chunked(),
                                    headers={"content-type": "application/json"}), 413)


def test_bug_is_a_500_with_an_openai_body(server, client, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(server.service, "start", broken)
    error = assert_openai_error(client.post("/v1/chat/completions", json={"messages": USER}), 500)
    assert error["type"] == "server_error" and "simulated" not in error["message"]


# ---- limits that depend on load ---------------------------------------------------------------------------


def test_queue_full_is_429_and_disconnect_frees_the_slot(tiny_checkpoint):
    service = tiny_service(tiny_checkpoint, step_s=0.05, max_batch_size=1, max_queue=0)
    engine = service.engine
    with ServerThread(create_app(service)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions",
                      json={"messages": USER, "max_tokens": 64, "stream": True, "temperature": 0}) as stream:
            lines = stream.iter_lines()  # keep a reference: a dropped iterator closes the connection
            next(lines)  # the reply has started (its first chunk may precede the engine's admission)
            assert wait_until(lambda: engine.active_count == 1, timeout=2.0) and service.outstanding == 1
            error = assert_openai_error(c.post("/v1/chat/completions", json={"messages": USER}), 429)
            assert error["type"] == "rate_limit_error"
            assert engine.active_count == 1 and service.outstanding == 1  # still running
        # leaving the `with` closed the connection mid-stream: 64 tokens would take 3 s more
        started = time.monotonic()
        assert wait_until(lambda: engine.active_count == 0 and service.outstanding == 0, timeout=2.5)
        assert time.monotonic() - started < 2.5
        assert c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1}).status_code == 200
    service.close()


def test_non_streaming_client_that_gives_up_frees_the_slot(tiny_checkpoint):
    service = tiny_service(tiny_checkpoint, step_s=0.05)
    engine = service.engine
    with ServerThread(create_app(service)) as srv:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": USER, "max_tokens": 64, "temperature": 0},
                       timeout=0.5)
        assert wait_until(lambda: engine.active_count == 0 and service.outstanding == 0, timeout=2.0)
    service.close()


# ---- API key ----------------------------------------------------------------------------------------------


def test_api_key_protects_every_route_but_health(server):
    service = server.service
    with ServerThread(create_app(service, api_key="sekrit")) as srv, httpx.Client(base_url=srv.url) as c:
        assert c.get("/health").status_code == 200
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                             ("GET", "/openapi.json")]:
            error = assert_openai_error(c.request(method, path, json={"messages": USER}), 401)
            assert error["code"] == "invalid_api_key"
            assert_openai_error(c.request(method, path, headers={"Authorization": "Bearer wrong"}), 401)
        ok = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1},
                    headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200
        assert c.get("/metrics").status_code == 401
