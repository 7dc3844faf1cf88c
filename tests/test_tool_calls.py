"""The tool-call text format: render <-> parse round trip, OpenAI argument strings, clear errors."""

from __future__ import annotations

import itertools
import json

import pytest

from gpt2chat.tool_calls import (
    TOOLS_INTRO,
    ToolCallError,
    check_tool_calls,
    check_tools,
    parse_assistant,
    render_assistant,
    render_tools,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _call(name, arguments, call_id="call_1"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _ids():
    counter = itertools.count(1)
    return lambda: f"call_{next(counter)}"


def test_render_one_call_exact_text():
    text = render_assistant(None, [_call("get_weather", '{"city": "Paris"}')])
    assert text == '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def test_render_content_then_calls_and_dict_or_string_arguments_agree():
    as_dict = render_assistant("Let me look.", [_call("a", {"x": 1}), _call("b", {"y": "é"})])
    as_str = render_assistant("Let me look.", [_call("a", '{"x":1}'), _call("b", '{"y": "\\u00e9"}')])
    assert as_dict == as_str
    assert as_dict == ('Let me look.\n<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
                       '<tool_call>{"name": "b", "arguments": {"y": "é"}}</tool_call>')


def test_no_calls_is_the_content():
    assert render_assistant("hi", None) == "hi"
    assert render_assistant("hi", []) == "hi"
    assert parse_assistant("plain reply").content == "plain reply"
    assert parse_assistant("plain reply").tool_calls == []


@pytest.mark.parametrize("content", ["", "Sure.", "two\nlines\n", "ends with newline\n"])
def test_round_trip(content):
    calls = [_call("get_weather", {"city": "Paris", "days": [1, 2], "nested": {"a": None}}, "call_1"),
             _call("noargs", {}, "call_2")]
    parsed = parse_assistant(render_assistant(content, calls), make_id=_ids())
    assert parsed.content == content
    assert [c["id"] for c in parsed.tool_calls] == ["call_1", "call_2"]
    for got, want in zip(parsed.tool_calls, calls, strict=True):
        assert got["type"] == "function"
        assert got["function"]["name"] == want["function"]["name"]
        assert isinstance(got["function"]["arguments"], str)  # OpenAI's response shape: a JSON string
        assert json.loads(got["function"]["arguments"]) == want["function"]["arguments"]


def test_parse_is_lenient_about_whitespace_between_blocks():
    text = 'ok <tool_call> {"name": "f", "arguments": {}} </tool_call>\n\n <tool_call>{"name": "g", "arguments": {"a": 1}}</tool_call>  \n'
    parsed = parse_assistant(text, make_id=_ids())
    assert parsed.content == "ok "
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["f", "g"]


def test_parse_json_string_holding_close_tag():
    text = '<tool_call>{"name": "echo", "arguments": {"s": "</tool_call>"}}</tool_call>'
    (call,) = parse_assistant(text).tool_calls
    assert json.loads(call["function"]["arguments"]) == {"s": "</tool_call>"}


def test_fresh_ids_are_distinct():
    text = render_assistant("", [_call("f", {}), _call("f", {})])
    ids = [c["id"] for c in parse_assistant(text).tool_calls]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)


@pytest.mark.parametrize("text, message", [
    ('<tool_call>{"name": "f", "arguments": {}}', "tool call 1: </tool_call> is missing"),
    ('<tool_call>{"name": "f", "arguments": {}', "tool call 1: the text after <tool_call> is not valid JSON"),
    ('<tool_call>{"name": "f", "arguments": {}} trailing</tool_call>', "tool call 1: expected </tool_call>"),
    ('<tool_call>{"name": "f", "arguments": {oops}}</tool_call>', "tool call 1: the text after <tool_call> is not valid JSON"),
    ('<tool_call>[1, 2]</tool_call>', "tool call 1: expected a JSON object"),
    ('<tool_call>{"name": "", "arguments": {}}</tool_call>', "tool call 1: name: expected a non-empty string"),
    ('<tool_call>{"name": "f"}</tool_call>', "tool call 1: 'arguments' is missing"),
    ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "tool call 1: arguments: expected a JSON object, got list"),
    ('<tool_call>{"name": "f", "arguments": {}, "x": 1}</tool_call>', "tool call 1: unexpected keys ['x']"),
    ('<tool_call>{"name": "f", "arguments": {}}</tool_call> and more', "text after tool call 1"),
    ('<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": 3, "arguments": {}}</tool_call>',
     "tool call 2: name"),
])
def test_parse_errors_name_the_call_and_problem(text, message):
    with pytest.raises(ToolCallError) as info:
        parse_assistant(text)
    assert message in str(info.value)


@pytest.mark.parametrize("calls, message", [
    ("nope", "tool_calls: expected a list, got str"),
    ([3], "tool_calls[0]: expected an object, got int"),
    ([{"type": "code", "function": {"name": "f"}}], "tool_calls[0].type: only 'function'"),
    ([{"type": "function", "function": "f"}], "tool_calls[0].function: expected an object"),
    ([_call("f", "{not json")], "tool_calls[0].function.arguments: not valid JSON"),
    ([_call("f", "[1]")], "tool_calls[0].function.arguments: expected a JSON object, got list"),
    ([_call(None, {})], "tool_calls[0].function.name: expected a non-empty string, got null"),
    ([{"id": 5, "type": "function", "function": {"name": "f", "arguments": {}}}], "tool_calls[0].id: expected a string"),
])
def test_bad_tool_calls_name_the_field(calls, message):
    with pytest.raises(ToolCallError) as info:
        check_tool_calls(calls)
    assert message in str(info.value)


def test_error_field_and_detail():
    with pytest.raises(ToolCallError) as info:
        check_tool_calls([_call("f", "[1]")], "messages[2].tool_calls")
    assert info.value.field == "messages[2].tool_calls[0].function.arguments"
    assert info.value.detail == "expected a JSON object, got list"


def test_hf_shape_without_function_wrapper_and_empty_arguments_string():
    (call,) = check_tool_calls([{"name": "f", "arguments": ""}])
    assert call["function"] == {"name": "f", "arguments": {}}


def test_render_tools_text():
    text = render_tools([WEATHER, {"type": "function", "function": {"name": "now"}}])
    assert text.splitlines() == [TOOLS_INTRO, json.dumps(WEATHER["function"]), '{"name": "now"}']


@pytest.mark.parametrize("tools, message", [
    ({"type": "function"}, "tools: expected a list, got dict"),
    (["x"], "tools[0]: expected an object, got str"),
    ([{"type": "retrieval"}], "tools[0].type: only 'function' tools"),
    ([{"type": "function"}], "tools[0].function: expected an object with 'name', got null"),
    ([{"type": "function", "function": {"description": "d"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": "obj"}}], "tools[0].function.parameters"),
])
def test_bad_tools_name_the_field(tools, message):
    with pytest.raises(ToolCallError) as info:
        check_tools(tools)
    assert message in str(info.value)
