"""Structured output through the real stack (tiny random model, BatchedEngine, uvicorn) and stock clients:
openai's `parse` with a nested pydantic model, LangChain's `with_structured_output` (json_schema) and
`bind_tools` through one agent round, streamed tool-call deltas reassembled by the openai client, a cut
constrained reply saying "length", and 400s naming a bad schema, tool_choice or logit_bias."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from gpt2chat.serve.app import create_app
from serve_support import ServerThread, assert_openai_error, tiny_service

USER = [{"role": "user", "content": "Plan a trip."}]
# bounded strings, numbers and arrays: a random model ends only what the grammar makes it end
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
                                                                         "maximum": 99}},
                                  "required": ["a"], "additionalProperties": False}}}
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}


class City(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=8)
    population: int = Field(ge=0, le=1000000)


class Trip(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: City
    days: int = Field(ge=1, le=30)
    tags: list[Literal["food", "art", "sea"]] = Field(max_length=2)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    service = tiny_service(tiny_checkpoint, max_batch_size=4, max_queue=8, max_tokens_limit=200)
    with ServerThread(create_app(service)) as srv:
        yield srv
    service.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def test_openai_parse_gives_a_nested_pydantic_model(client):
    for seed in range(3):
        completion = client.chat.completions.parse(model="tiny", messages=USER, response_format=Trip,
                                                   temperature=1.0, seed=seed, max_tokens=200)
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Trip)  # parsed and validated by the client's pydantic model
        assert Trip.model_validate_json(choice.message.content) == choice.message.parsed


def test_streamed_json_schema_reply_parses_and_validates(client):
    schema = Trip.model_json_schema()
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": schema, "strict": True}}
    stream = client.chat.completions.create(model="tiny", messages=USER, response_format=fmt, temperature=1.0,
                                            seed=5, max_tokens=200, stream=True)
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    Trip.model_validate(json.loads(text))


def test_a_cut_constrained_reply_says_length(client):
    for stream in (False, True):
        reply = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, stream=stream,
                                               response_format={"type": "json_object"})
        if stream:
            chunks = [c for c in reply if c.choices]
            text, finish = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert finish == "length" and text.startswith("{")


def test_langchain_with_structured_output_json_schema(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="none", model="tiny", temperature=1.0, seed=3,
                     max_tokens=200, max_retries=0, timeout=120)
    trip = llm.with_structured_output(Trip, method="json_schema").invoke("Plan a trip.")
    assert isinstance(trip, Trip)


def test_langchain_agent_round_call_tool_answer(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="none", model="tiny", temperature=0,
                     max_tokens=100, max_retries=0, timeout=120)
    history = [HumanMessage("What is the weather in Paris?")]
    call = llm.bind_tools([WEATHER, ADD], tool_choice="get_weather").invoke(history)
    assert len(call.tool_calls) >= 1 and call.response_metadata["finish_reason"] == "tool_calls"
    for tool_call in call.tool_calls:
        assert tool_call["name"] == "get_weather" and tool_call["id"].startswith("call_")
        jsonschema.validate(tool_call["args"], TOOL_SCHEMAS["get_weather"])
    history += [call] + [ToolMessage('{"sky": "clear"}', tool_call_id=c["id"]) for c in call.tool_calls]
    answer = llm.bind_tools([WEATHER, ADD], tool_choice="none").invoke(history)
    assert answer.tool_calls == [] and isinstance(answer.content, str)
    assert answer.response_metadata["finish_reason"] in ("stop", "length")
    # the answer's prompt carried the call and the tool's result: longer than the first round's
    assert answer.usage_metadata["input_tokens"] > call.usage_metadata["input_tokens"]


def test_streamed_tool_calls_reassemble_into_the_non_streamed_ones(client):
    args = {"model": "tiny", "messages": USER, "tools": [WEATHER, ADD], "tool_choice": "required",
            "temperature": 1.0, "seed": 2, "max_tokens": 150}  # greedy repeats calls to the limit
    whole = client.chat.completions.create(**args)
    assert whole.choices[0].finish_reason == "tool_calls"
    expected = [(c.function.name, json.loads(c.function.arguments)) for c in whole.choices[0].message.tool_calls]
    with client.chat.completions.stream(**args) as stream:
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == expected
    assert len({c.id for c in message.tool_calls}) == len(message.tool_calls)
    for name, arguments in expected:
        jsonschema.validate(arguments, TOOL_SCHEMAS[name])


def test_one_call_without_parallel_tool_calls_and_auto_may_answer_in_text(client):
    for seed in range(4):
        reply = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER, ADD], seed=seed,
                                               tool_choice="required", parallel_tool_calls=False, max_tokens=150)
        assert reply.choices[0].finish_reason == "tool_calls" and len(reply.choices[0].message.tool_calls) == 1
    # auto: the random model writes text (it never spells the tag); the tools were in the prompt
    plain = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=0)
    auto = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], max_tokens=8,
                                          temperature=0)
    assert auto.choices[0].message.tool_calls is None and auto.choices[0].message.content
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens


def test_logit_bias_forces_a_token(server):
    body = {"prompt": "Once", "max_tokens": 4, "temperature": 1.0, "logit_bias": {"13": 100}}
    reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    assert reply["choices"][0]["text"] == "...."  # id 13 is "." in GPT-2's vocabulary


@pytest.mark.parametrize("extra, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
     "response_format", "Unimplemented keys"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     "needs json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "'nope', which is not one of the tools (get_weather)"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", "letters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                              "uniqueItems": True, "not": {}}}}]},
     "tools", "tools[0].function.parameters"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "'abc' is not a token id"),
    ({"logit_bias": {"5": -101}}, "logit_bias", "from -100 to 100"),
])
def test_bad_structured_fields_are_400s_naming_them(server, extra, param, words):
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": USER, **extra}, timeout=60)
    error = assert_openai_error(response, 400)
    assert error["param"] == param and words in error["message"], error


def test_bad_schema_is_an_openai_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="Unimplemented keys"):
        client.completions.create(model="tiny", prompt="x", extra_body={"response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"if": {}, "then": {}}}}})


def test_tool_call_stream_splits_any_chunking_like_parse_assistant():
    import random

    from gpt2chat.serve.structured import ToolCallStream
    from gpt2chat.tool_calls import parse_assistant, render_assistant

    calls = [{"id": "a", "type": "function", "function": {"name": "get_weather",
                                                            "arguments": {"city": 'P}a"r\n<', "n": [1, {"x": 2}]}}},
             {"id": "b", "type": "function", "function": {"name": "add", "arguments": {"a": 5}}}]
    text = render_assistant("Let me look <tool", calls)
    expected = parse_assistant(text)
    rng = random.Random(0)
    for _ in range(100):
        reader, content, seen, at = ToolCallStream(lambda: "call_x"), "", {}, 0
        while at < len(text):
            step = rng.randint(1, 6)
            piece, deltas = reader.push(text[at:at + step])
            at += step
            content += piece
            for index, call_id, name, arguments in deltas:
                if call_id is not None:
                    seen[index] = [name, ""]
                seen[index][1] += arguments
        content += reader.finish()
        assert content == expected.content
        assert [(n, json.loads(a)) for n, a in seen.values()] == [
            (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in expected.tool_calls]
