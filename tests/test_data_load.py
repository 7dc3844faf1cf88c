"""Row reading and format parsing: every format on small fixtures, every kind of bad input (skip + count, or
strict stop with a message naming the file, line / row and field), specs, folders, parquet, the hub offline."""

from __future__ import annotations

import json
import time

import pytest

from gpt2chat.data import DataError, FormatOptions, load_conversations, load_preferences, parse_spec
from gpt2chat.data.formats import FORMATS


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


GOOD_ALPACA = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}


# ---------------------------------------------------------------- formats


def test_alpaca_input_joins_instruction_and_system_optional(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD_ALPACA, {"instruction": "Translate", "input": "chat", "output": "Katze"}])
    conversations, report = load_conversations(f"alpaca:{path}")
    assert report.rows == 2 and report.kept == 2
    assert conversations[0].messages == [{"role": "user", "content": "Add 2 and 3."},
                                         {"role": "assistant", "content": "5"}]
    assert conversations[1].messages[0]["content"] == "Translate\n\nchat"
    assert conversations[0].source == f"{path}:1" and conversations[1].source == f"{path}:2"


def test_alpaca_json_array_sources_are_row_indices(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([GOOD_ALPACA, GOOD_ALPACA]))
    conversations, _ = load_conversations(f"alpaca:{path}")
    assert [c.source for c in conversations] == [f"{path}#0", f"{path}#1"]


def test_guanaco_multi_turn(tmp_path):
    text = "### Human: Hi### Assistant: Hello!### Human: 2+2?### Assistant: 4"
    path = write_jsonl(tmp_path / "g.jsonl", [{"text": text}])
    (conversation,), _ = load_conversations(f"guanaco:{path}")
    assert [m["role"] for m in conversation.messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in conversation.messages] == ["Hi", "Hello!", "2+2?", "4"]


def test_openorca_system_prompt_is_its_own_message(tmp_path):
    path = write_jsonl(tmp_path / "o.jsonl", [
        {"id": "1", "system_prompt": "You are terse.", "question": "Capital of France?", "response": "Paris."},
        {"id": "2", "system_prompt": "", "question": "1+1?", "response": "2"},
    ])
    (with_system, without), _ = load_conversations(f"openorca:{path}")
    assert with_system.messages == [{"role": "system", "content": "You are terse."},
                                    {"role": "user", "content": "Capital of France?"},
                                    {"role": "assistant", "content": "Paris."}]
    assert "terse" not in with_system.messages[1]["content"]
    assert [m["role"] for m in without.messages] == ["user", "assistant"]


def test_sharegpt_conversations_and_system(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "system", "value": "Be nice."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"},
        {"from": "human", "value": "unanswered"}]}])
    (conversation,), _ = load_conversations(f"sharegpt:{path}")
    assert [m["role"] for m in conversation.messages] == ["system", "user", "assistant"]  # trailing user dropped


def test_messages_format_and_content_parts(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]}, {"role": "assistant", "content": "Yo"}]}])
    (conversation,), _ = load_conversations(f"messages:{path}")
    assert conversation.messages[0] == {"role": "user", "content": "Hi"}


def test_ultrafeedback_message_lists_flat_strings_and_mismatch(tmp_path):
    user = {"role": "user", "content": "Q?"}
    path = write_jsonl(tmp_path / "u.jsonl", [
        {"prompt": "Q?", "chosen": [user, {"role": "assistant", "content": "good"}],
         "rejected": [user, {"role": "assistant", "content": "bad"}]},
        {"prompt": "Flat?", "chosen": "yes", "rejected": "no"},
        {"chosen": [user, {"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "b"}]},
    ])
    pairs, report = load_preferences(f"ultrafeedback:{path}")
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ([user], "good", "bad"), ([{"role": "user", "content": "Flat?"}], "yes", "no")]
    assert report.dropped == {"prompt mismatch": 1}
    assert "line 3" in report.problems[0] and "rejected" in report.problems[0]
    conversations, _ = load_conversations(f"ultrafeedback:{path}")  # SFT on prompt + chosen
    assert conversations[0].messages[-1] == {"role": "assistant", "content": "good"}


def test_sharegpt_preference_layout(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}],
                                 "chosen": {"from": "gpt", "value": "good"},
                                 "rejected": {"from": "gpt", "value": "bad"}}]))
    (pair,), report = load_preferences(f"sharegpt:{path}")
    assert pair.prompt == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert (pair.chosen, pair.rejected, report.kept) == ("good", "bad", 1)


def test_preferences_from_an_sft_format_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD_ALPACA])
    with pytest.raises(DataError, match="no preference pairs"):
        load_preferences(f"alpaca:{path}")


def test_folder_and_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "d"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [GOOD_ALPACA])
    pq.write_table(pa.Table.from_pylist([GOOD_ALPACA, {"instruction": "x", "input": "", "output": "  "}]),
                   folder / "b.parquet")
    conversations, report = load_conversations(f"alpaca:{folder}")
    assert report.rows == 3 and report.kept == 2
    assert conversations[1].source.endswith("b.parquet#0")
    assert "b.parquet row 1: field 'output'" in report.problems[0]


# ---------------------------------------------------------------- bad input: one fixture per case

BAD_ROWS = [
    ("invalid JSON", '{"instruction": "x", "output": ', None),
    ("missing field", {"instruction": "x", "input": ""}, "output"),
    ("wrong type", {"instruction": ["x"], "input": "", "output": "y"}, "instruction"),
    ("empty text", {"instruction": "   ", "input": "", "output": "y"}, "instruction"),
    ("text too long", {"instruction": "x", "input": "", "output": "y" * 10_000_000}, "output"),
    ("not an object", "[1, 2]", None),
]


@pytest.mark.parametrize("reason,row,field", BAD_ROWS, ids=[case[0] for case in BAD_ROWS])
def test_bad_alpaca_row_is_skipped_and_counted_or_stops_when_strict(tmp_path, reason, row, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD_ALPACA, row, GOOD_ALPACA])
    conversations, report = load_conversations(f"alpaca:{path}")
    assert len(conversations) == 2 and report.rows == 3
    assert report.dropped == {reason: 1}
    assert f"{path} line 2" in report.problems[0]
    if field:
        assert f"field '{field}'" in report.problems[0]
    assert reason.split()[0].lower() in report.summary().lower()
    with pytest.raises(DataError) as info:
        load_conversations(f"alpaca:{path}", strict=True)
    assert f"{path} line 2" in str(info.value)
    if field:
        assert f"'{field}'" in str(info.value)


def test_unknown_role(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "wizard", "content": "hi"}]}])
    _, report = load_conversations(f"messages:{path}")
    assert report.dropped == {"unknown role": 1}
    with pytest.raises(DataError, match=r"line 1: field 'messages\[0\]\.role': unknown role 'wizard'"):
        load_conversations(f"messages:{path}", strict=True)


def test_sharegpt_unknown_from(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "robot", "value": "hi"}]}])
    with pytest.raises(DataError, match=r"conversations\[0\]\.from"):
        load_conversations(f"sharegpt:{path}", strict=True)


def test_bad_turn_order(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}])
    with pytest.raises(DataError, match=r"messages\[1\]"):
        load_conversations(f"messages:{path}", strict=True)


def test_invalid_utf8_names_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(GOOD_ALPACA).encode()
    path.write_bytes(good + b"\n" + b'{"instruction": "x", "input": "", "output": "caf\xe9"}\n' + good + b"\n")
    conversations, report = load_conversations(f"alpaca:{path}")
    assert len(conversations) == 2 and report.dropped == {"invalid UTF-8": 1}
    with pytest.raises(DataError, match=r"line 2: field 'output': invalid UTF-8"):
        load_conversations(f"alpaca:{path}", strict=True)


def test_invalid_utf8_in_json_array_names_row(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b'[{"instruction": "ok", "output": "fine"}, {"instruction": "\xff\xfe", "output": "y"}]')
    with pytest.raises(DataError, match=r"bad.json row 1: field 'instruction': invalid UTF-8"):
        load_conversations(f"alpaca:{path}", strict=True)


def test_broken_json_array_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"instruction": "x", "output": "y"},\n {"instruction": \n]')
    with pytest.raises(DataError, match=r"broken.json line 4: invalid JSON"):
        load_conversations(f"alpaca:{path}")


def test_missing_file_and_unknown_format_and_bad_weight(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        load_conversations(f"alpaca:{tmp_path / 'nope.jsonl'}")
    with pytest.raises(DataError, match="unknown format 'dolly'"):
        load_conversations(f"dolly:{tmp_path}")
    with pytest.raises(DataError, match="FORMAT:LOCATION"):
        parse_spec("just-a-path.json", FORMATS)
    with pytest.raises(DataError, match="weight must be"):
        parse_spec("alpaca:x.json@0", FORMATS)


def test_spec_weight_parsing():
    spec = parse_spec("alpaca:data/my@file.json@2.5", FORMATS)
    assert (spec.format, spec.location, spec.weight) == ("alpaca", "data/my@file.json", 2.5)
    assert parse_spec("oasst1:OpenAssistant/oasst1#validation", FORMATS).weight == 1.0


def test_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(DataError, match="hub is unavailable.*HF_HUB_OFFLINE"):
        load_conversations("ultrafeedback:trl-lib/ultrafeedback_binarized")
    assert time.monotonic() - started < 30  # a generous bound: the point is "does not hang"


def test_options_max_chars(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x" * 50, "input": "", "output": "y"}])
    _, report = load_conversations(f"alpaca:{path}", options=FormatOptions(max_chars=10))
    assert report.dropped == {"text too long": 1}


# ---------------------------------------------------------------- tool use (TRL's messages + tools layout)

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def tool_row(arguments=None, tools=None):
    """A TRL-style tool-use row: question, a call, the tool's result, the answer."""
    return {"tools": [WEATHER_TOOL] if tools is None else tools, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris"} if arguments is None else arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "21C, clear"},
        {"role": "assistant", "content": "It is 21C and clear in Paris."}]}


def test_tool_rows_load_flattened_with_tools_as_list_or_json_string(tmp_path):
    from gpt2chat.templates import flatten
    from gpt2chat.tool_calls import render_tools

    as_string = tool_row(arguments='{"city": "Paris"}', tools=json.dumps([WEATHER_TOOL]))
    path = write_jsonl(tmp_path / "t.jsonl", [tool_row(), as_string])
    (first, second), report = load_conversations(f"messages:{path}")
    assert report.kept == 2
    assert first.messages == second.messages == flatten(tool_row()["messages"], [WEATHER_TOOL])
    assert [m["role"] for m in first.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert first.messages[0]["content"] == render_tools([WEATHER_TOOL])
    assert first.messages[2]["content"] == (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')


def test_tool_row_ending_in_a_tool_result_trains_the_call(tmp_path):
    row = tool_row()
    row["messages"] = row["messages"][:3]
    (conversation,), _ = load_conversations(f"messages:{write_jsonl(tmp_path / 't.jsonl', [row])}")
    assert [m["role"] for m in conversation.messages] == ["system", "user", "assistant"]


def _broken(change):
    row = tool_row()
    change(row)
    return row


@pytest.mark.parametrize("row, reason, field, detail", [
    (tool_row(arguments="{city: Paris}"), "bad tool call", "messages[1].tool_calls[0].function.arguments",
     "not valid JSON"),
    (tool_row(arguments="[1]"), "bad tool call", "messages[1].tool_calls[0].function.arguments",
     "expected a JSON object, got list"),
    (tool_row(tools=[{"type": "function", "function": {"description": "nameless"}}]), "bad tools",
     "tools[0].function.name", "expected a non-empty string"),
    (tool_row(tools="[{oops"), "bad tools", "tools", "not valid JSON"),
    (_broken(lambda r: r["messages"][0].update(tool_calls=r["messages"][1]["tool_calls"])), "bad tool call",
     "messages[0].tool_calls", "only an assistant message"),
    (_broken(lambda r: r["messages"][2].update(content=None)), "missing field", "messages[2].content",
     "a tool message has the tool's result"),
    (_broken(lambda r: r["messages"].insert(1, {"role": "tool", "content": "early"})), "bad turn order",
     "messages[1]", "expected assistant next, got tool"),
    (_broken(lambda r: r["messages"].pop(2)), "bad turn order", "messages[2]",
     "expected tool next, got assistant (an assistant's tool calls are answered by tool messages)"),
    (_broken(lambda r: r["messages"][1].update(tool_calls=None)), "missing field", "messages[1].content",
     "missing (or null)"),
])
def test_bad_tool_rows_name_the_row_and_field(tmp_path, row, reason, field, detail):
    path = write_jsonl(tmp_path / "t.jsonl", [tool_row(), row])
    conversations, report = load_conversations(f"messages:{path}")
    assert len(conversations) == 1 and report.dropped == {reason: 1}
    with pytest.raises(DataError) as info:
        load_conversations(f"messages:{path}", strict=True)
    message = str(info.value)
    assert f"{path} line 2: field '{field}'" in message
    if detail:
        assert detail in message


def test_messages_rows_take_system_messages_anywhere(tmp_path):
    user, reply = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
    two = {"role": "system", "content": "Be brief."}
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "system", "content": "Be kind."}, two, user, reply]},
        {"messages": [user, reply, two, user, reply]},
        {"messages": [user, two, {"role": "user", "content": "again"}, reply]},  # still must alternate
    ])
    conversations, report = load_conversations(f"messages:{path}")
    assert [[m["role"] for m in c.messages] for c in conversations] == [
        ["system", "system", "user", "assistant"], ["user", "assistant", "system", "user", "assistant"]]
    assert report.dropped == {"bad turn order": 1}
    with pytest.raises(DataError, match=r"line 3: field 'messages\[2\]': expected assistant next, got user"):
        load_conversations(f"messages:{path}", strict=True)


def test_sharegpt_function_call_and_observation_turns(tmp_path):
    from gpt2chat.templates import flatten

    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    row = {"tools": json.dumps([WEATHER_TOOL]), "conversations": [
        {"from": "human", "value": "Weather in Paris?"}, {"from": "function_call", "value": json.dumps(call)},
        {"from": "observation", "value": "21C, clear"}, {"from": "gpt", "value": "It is 21C and clear in Paris."}]}
    bad_json = {**row, "conversations": [row["conversations"][0], {"from": "function_call", "value": "{name"}]}
    bad_call = {**row, "conversations": [row["conversations"][0], {"from": "function_call", "value": "[{}]"}]}
    path = write_jsonl(tmp_path / "s.jsonl", [row, bad_json, bad_call])
    (conversation,), report = load_conversations(f"sharegpt:{path}")
    assert conversation.messages == flatten(tool_row()["messages"], [WEATHER_TOOL])  # the same as TRL's layout
    assert report.dropped == {"bad tool call": 2}
    with pytest.raises(DataError, match=r"line 2: field 'conversations\[1\]\.value': a function_call turn holds JSON"):
        load_conversations(f"sharegpt:{path}", strict=True)
    path = write_jsonl(tmp_path / "s2.jsonl", [bad_call])
    with pytest.raises(DataError, match=r"line 1: field 'conversations\[1\]\.value\[0\]\.name': expected a non-empty"):
        load_conversations(f"sharegpt:{path}", strict=True)
