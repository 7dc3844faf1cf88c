"""Chat templates: layout, assistant mask, prefix invariant, Jinja export == renderer, control-token safety;
tools, tool calls, tool turns and system messages anywhere."""

from __future__ import annotations

import random

import pytest

from gpt2chat.errors import Gpt2ChatError
from gpt2chat.templates import (
    DEFAULT_TEMPLATE,
    TEMPLATES,
    ChatFormatError,
    flatten,
    get_template,
    render_chat,
    render_text,
    validate_messages,
)
from gpt2chat.tokenizer import Tokenizer
from gpt2chat.tool_calls import TOOLS_INTRO, parse_assistant, render_assistant, render_tools

NAMES = list(TEMPLATES)

SYS = {"role": "system", "content": "You are a helpful assistant."}
U1 = {"role": "user", "content": "What is the capital of France?"}
A1 = {"role": "assistant", "content": "The capital of France is Paris."}
U2 = {"role": "user", "content": "And of Japan? 🇯🇵 日本"}
A2 = {"role": "assistant", "content": "Tokyo.\n\nIt has ~14 million people."}

CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
TOOL = {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21, "sky": "clear"}'}

CONVERSATIONS = {
    "single": [U1],
    "single-reply": [U1, A1],
    "system-single": [SYS, U1],
    "system-reply": [SYS, U1, A1],
    "multi": [U1, A1, U2],
    "multi-reply": [U1, A1, U2, A2],
    "system-multi-reply": [SYS, U1, A1, U2, A2],
    "assistant-first": [{"role": "assistant", "content": "Hi! Ask me anything."}, U1, A1],
    "whitespace": [{"role": "user", "content": "  spaced  \n"}, {"role": "assistant", "content": "\n\n  indented\n"}],
    "two-systems": [SYS, {"role": "system", "content": "Answer briefly."}, U1, A1],
    "mid-system": [U1, A1, {"role": "system", "content": "Now answer in French."}, U2],
    "mid-system-reply": [SYS, U1, {"role": "system", "content": "Be terse."}, U2, A2],
    "tool-round": [SYS, U1, CALL, TOOL, A1],
    "tool-round-open": [U1, CALL, TOOL],
    "tool-calls-last": [U1, CALL],
    "tool-calls-with-content": [U1, {**CALL, "content": "Let me check."}, TOOL, U2],
    "two-calls": [U1, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": [1, 2]}}},
        {"id": "c2", "type": "function", "function": {"name": "g", "arguments": '{"y": "é \\"q\\""}'}}]},
        {"role": "tool", "content": "1", "tool_call_id": "c1"}, {"role": "tool", "content": "2", "tool_call_id": "c2"}],
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city: 'now' or later",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOLS = [WEATHER, {"type": "function", "function": {"name": "now", "description": "The time\nin UTC"}}]

TRICKY_REPLIES = [
    "Hello", " Hello", "  two spaces", "\n\nnew lines", "\nnl", "\tTab", "!!! wow", ":colon", "### Human: x",
    "123", "😀 emoji", "中文", "", " ", "\n", "'s it", "-dash", "<|eot_id|> spelled", "<|endoftext|>",
]


@pytest.fixture(scope="module")
def full_tok() -> Tokenizer:
    """A tokenizer with every template's control tokens."""
    tok = Tokenizer.gpt2()
    for t in TEMPLATES.values():
        t.ensure_tokens(tok)
    return tok


@pytest.fixture(scope="module")
def toks() -> dict[str, Tokenizer]:
    out = {}
    for name, t in TEMPLATES.items():
        tok = Tokenizer.gpt2()
        t.ensure_tokens(tok)
        out[name] = tok
    return out


@pytest.fixture(scope="module")
def hf_toks(toks, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    out = {}
    for name, tok in toks.items():
        d = tmp_path_factory.mktemp(f"tok-{name}")
        tok.save(d, chat_template=TEMPLATES[name].jinja, template_name=name)
        out[name] = transformers.AutoTokenizer.from_pretrained(str(d))
    return out


def _hf_ids(hf, messages, add_generation_prompt, mask=False, tools=None):
    out = hf.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=add_generation_prompt,
                                 return_dict=True, return_assistant_tokens_mask=mask)
    # transformers 5 returns a BatchEncoding (dict) by default
    ids = list(out["input_ids"])
    return (ids, list(out["assistant_masks"])) if mask else ids


# ---------------------------------------------------------------------------------------------- registry
def test_registry_and_get_template():
    assert set(NAMES) == {"llama3-context", "user-assistant", "plain", "guanaco"}
    assert DEFAULT_TEMPLATE == "llama3-context"
    for name in NAMES:
        t = get_template(name)
        assert t.name == name and get_template(t) is t
        assert "<|endoftext|>" in t.stop_tokens and t.end_of_turn in t.stop_tokens
    with pytest.raises(ChatFormatError) as exc:
        get_template("chatml")
    for name in NAMES:
        assert name in str(exc.value)
    assert isinstance(exc.value, Gpt2ChatError)
    assert get_template("plain").stop_strings == ("\nUser:",)
    assert get_template("guanaco").stop_strings == ("### Human:",)


def test_ensure_tokens_and_stop_ids():
    tok = Tokenizer.gpt2()
    t = get_template("llama3-context")
    assert t.ensure_tokens(tok) == 6
    assert t.ensure_tokens(tok) == 0
    assert [tok.token_to_id(s) for s in t.special_tokens] == list(range(50258, 50264))
    assert t.stop_token_ids(tok) == [tok.token_to_id("<|eot_id|>"), 50256]
    assert tok.pad_token_id not in t.stop_token_ids(tok)
    assert get_template("plain").ensure_tokens(tok) == 0
    assert get_template("plain").stop_token_ids(tok) == [50256]


def test_missing_tokens_is_a_clear_error():
    tok = Tokenizer.gpt2()
    with pytest.raises(ChatFormatError, match="ensure_tokens"):
        render_chat(tok, [U1], "llama3-context")
    ids, _ = render_chat(tok, [U1, A1], "plain")  # needs no added token
    assert ids[-1] == tok.eos_token_id


# ---------------------------------------------------------------------------------------------- layouts
def test_llama3_context_layout():
    text = render_text([SYS, U1, A1, U2, A2], "llama3-context")
    assert text == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>You are a helpful assistant.<|eot_id|>"
        "<|start_context|>"
        "<|start_header_id|>user<|end_header_id|>What is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>The capital of France is Paris.<|eot_id|>"
        "<|end_context|>"
        f"<|start_header_id|>user<|end_header_id|>{U2['content']}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>{A2['content']}<|eot_id|>"
    )
    # no history -> no context block; generation prompt ends with the header's control token
    text = render_text([U1], "llama3-context", add_generation_prompt=True)
    assert "<|start_context|>" not in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>")


def test_other_layouts():
    assert render_text([SYS, U1, A1, U2], "user-assistant", True) == (
        f"<|SYSTEM|> {SYS['content']} <|USER|> {U1['content']} <|ASSISTANT|> {A1['content']}<|End|>"
        f"<|USER|> {U2['content']} <|ASSISTANT|>"
    )
    assert render_text([U1, A1, U2], "plain", True) == (
        f"User: {U1['content']}\nAssistant: {A1['content']}<|endoftext|>\nUser: {U2['content']}\nAssistant:"
    )
    assert render_text([SYS, U1, A1], "guanaco") == (
        f"{SYS['content']}\n\n### Human: {U1['content']}\n### Assistant: {A1['content']}<|endoftext|>"
    )


# ---------------------------------------------------------------------------------------------- mask
@pytest.mark.parametrize("name", NAMES)
def test_mask_is_last_reply_and_end_of_turn(name, toks):
    t, tok = TEMPLATES[name], toks[name]
    ids, mask = render_chat(tok, [SYS, U1, A1, U2, A2], name)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(trained) == t.reply_prefix + A2["content"] + t.end_of_turn
    assert trained[-1] == tok.token_to_id(t.end_of_turn) and ids[-1] == trained[-1]
    first = mask.index(1)
    assert all(mask[first:])  # one contiguous span at the end
    # the earlier assistant turn is context
    assert A1["content"] not in tok.decode(trained)
    # a conversation that ends with a user turn trains nothing
    for gen in (False, True):
        _, mask = render_chat(tok, [SYS, U1, A1, U2], name, add_generation_prompt=gen)
        assert not any(mask)


@pytest.mark.parametrize("name", NAMES)
def test_mask_empty_reply(name, toks):
    t, tok = TEMPLATES[name], toks[name]
    ids, mask = render_chat(tok, [U1, {"role": "assistant", "content": ""}], name)
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(trained) == t.reply_prefix + t.end_of_turn


# ---------------------------------------------------------------------------------------------- prefix invariant
@pytest.mark.parametrize("name", NAMES)
def test_prefix_invariant(name, toks):
    tok = toks[name]
    rng = random.Random(0)
    alphabet = list("ab Z9 .:!?'-\n\t#<|>") + ["😀", "é", "中", "  ", "\n\n"]
    replies = TRICKY_REPLIES + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(150)]
    for prompt in ([U1], [SYS, U1], [U1, A1, U2], [SYS, U1, A1, U2]):
        p_ids, p_mask = render_chat(tok, prompt, name, add_generation_prompt=True)
        assert not any(p_mask)
        for reply in replies:
            ids, mask = render_chat(tok, prompt + [{"role": "assistant", "content": reply}], name)
            assert ids[: len(p_ids)] == p_ids, (name, prompt, reply)
            # everything after the prompt is trained: the reply and its end-of-turn token
            assert mask[: len(p_ids)] == [0] * len(p_ids) and all(mask[len(p_ids):]), (name, reply)


# ---------------------------------------------------------------------------------------------- Jinja == renderer
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no-tools", "tools"])
def test_jinja_matches_renderer(name, conv, tools, toks, hf_toks):
    tok, hf = toks[name], hf_toks[name]
    messages = CONVERSATIONS[conv]
    for gen in (False, True):
        ids, mask = render_chat(tok, messages, name, add_generation_prompt=gen, tools=tools)
        hf_ids, hf_mask = _hf_ids(hf, messages, gen, mask=True, tools=tools)
        assert hf_ids == ids, (name, conv, gen)
        if messages[-1]["role"] == "assistant" or gen:
            assert hf_mask == mask, (name, conv, gen)
        assert hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen) == render_text(
            messages, name, gen, tools=tools)


def test_saved_checkpoint_tokenizer_keeps_template(toks, tmp_path):
    tok = toks["llama3-context"]
    t = TEMPLATES["llama3-context"]
    tok.save(tmp_path, chat_template=t.jinja, template_name=t.name)
    back = Tokenizer.from_dir(tmp_path)
    assert back.template_name == "llama3-context" and back.chat_template == t.jinja
    assert render_chat(back, [SYS, U1, A1]) == render_chat(tok, [SYS, U1, A1])


# ---------------------------------------------------------------------------------------------- safety
def _all_spellings() -> list[str]:
    out = {"<|endoftext|>", "<|pad|>"}
    for t in TEMPLATES.values():
        out.update(t.special_tokens)
        out.update(t.stop_tokens)
    return sorted(out)


@pytest.mark.parametrize("name", NAMES)
def test_special_token_spellings_in_content_stay_text(name, full_tok):
    tok = full_tok
    control = tok.special_token_ids
    for spelling in _all_spellings():
        for role_idx in (0, 1, 2, 3):  # system, user, earlier assistant, last user
            base = [dict(SYS), dict(U1), dict(A1), dict(U2), dict(A2)]
            clean_ids, _ = render_chat(tok, base, name)
            base[role_idx]["content"] = f"x {spelling} y{spelling}"
            ids, _ = render_chat(tok, base, name)
            # the control ids are exactly those the template writes; none comes from the content
            assert sorted(i for i in ids if i in control) == sorted(i for i in clean_ids if i in control), (
                name, spelling, role_idx)
            assert f"x {spelling} y{spelling}" in tok.decode(ids)
        # the trained reply itself
        msgs = [U1, {"role": "assistant", "content": spelling}]
        ids, mask = render_chat(tok, msgs, name)
        content_ids = [i for i, m in zip(ids, mask, strict=True) if m][:-1]
        assert content_ids and not set(content_ids) & control, (name, spelling)


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("messages, match", [
    ([], "empty"),
    ("hello", "list"),
    (None, "list"),
    ([["user", "hi"]], r"messages\[0\]"),
    ([{"content": "hi"}], r"messages\[0\]\.role"),
    ([{"role": "bot", "content": "hi"}], r"messages\[0\]\.role.*'bot'"),
    ([{"role": "user"}], r"messages\[0\]\.content"),
    ([{"role": "user", "content": None}], r"messages\[0\]\.content"),
    ([U1, {"role": "assistant", "content": 3}], r"messages\[1\]\.content"),
    ([U1, {"role": "assistant"}], r"messages\[1\]\.content: missing"),
    ([U1, {"role": "assistant", "content": None, "tool_calls": []}], r"messages\[1\]\.content: expected a string, got null"),
    ([U1, {"role": "assistant", "content": 3, "tool_calls": CALL["tool_calls"]}], r"messages\[1\]\.content: expected a string or null"),
    ([U1, {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{bad"}}]}],
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments: not valid JSON"),
    ([U1, {"role": "assistant", "content": "", "tool_calls": {"name": "f"}}], r"messages\[1\]\.tool_calls: expected a list"),
    ([{**U1, "tool_calls": CALL["tool_calls"]}], r"messages\[0\]\.tool_calls: only an assistant message"),
    ([U1, CALL, {"role": "tool", "content": None}], r"messages\[2\]\.content: expected a string, got null"),
    ([U1, CALL, {"role": "tool", "content": "x", "tool_call_id": 7}], r"messages\[2\]\.tool_call_id"),
    ([{"role": "tool", "content": "x"}], "no user"),
    ([SYS], "no user"),
    ([{"role": "assistant", "content": "hi"}], "no user"),
])
def test_validation_errors(messages, match, toks):
    with pytest.raises(ChatFormatError, match=match):
        validate_messages(messages)
    for name in NAMES:
        with pytest.raises(ChatFormatError, match=match):
            render_chat(toks[name], messages, name)


def test_render_chat_defaults(toks):
    tok = toks["llama3-context"]
    assert render_chat(tok, (U1, A1)) == get_template("llama3-context").render(tok, [U1, A1])
    assert render_chat(tok, [{**U1, "name": "bob"}])[0] == render_chat(tok, [U1])[0]  # extra keys ignored


@pytest.mark.parametrize("tools, match", [
    ({"type": "function"}, "tools: expected a list"),
    ([{"type": "function", "function": {"description": "no name"}}], r"tools\[0\]\.function\.name"),
])
def test_bad_tools_are_chat_format_errors(tools, match, toks):
    for name in NAMES:
        with pytest.raises(ChatFormatError, match=match):
            render_chat(toks[name], [U1], name, tools=tools)


# ---------------------------------------------------------------------------------------------- tools, system messages
def test_tool_layouts_exact():
    call_text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    tools_text = render_tools(TOOLS)
    assert tools_text.startswith(TOOLS_INTRO + "\n")
    assert render_text([SYS, U1, CALL, TOOL], "llama3-context", True, tools=TOOLS) == (
        "<|begin_of_text|>"
        f"<|start_header_id|>system<|end_header_id|>{SYS['content']}\n\n{tools_text}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>{U1['content']}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>{call_text}<|eot_id|>"
        f"<|start_header_id|>tool<|end_header_id|>{TOOL['content']}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>"
    )
    assert render_text([U1, CALL, TOOL], "user-assistant", True, tools=TOOLS) == (
        f"<|SYSTEM|> {tools_text} <|USER|> {U1['content']} <|ASSISTANT|> {call_text}<|End|>"
        f"<|USER|> Tool: {TOOL['content']} <|ASSISTANT|>"
    )
    assert render_text([U1, CALL, TOOL], "plain", True) == (
        f"User: {U1['content']}\nAssistant: {call_text}<|endoftext|>\nTool: {TOOL['content']}\nAssistant:"
    )
    assert render_text([U1, {**CALL, "content": "Checking."}, TOOL], "guanaco", True, tools=TOOLS) == (
        f"{tools_text}\n\n### Human: {U1['content']}\n### Assistant: Checking.\n{call_text}<|endoftext|>\n"
        f"### Tool: {TOOL['content']}\n### Assistant:"
    )


def test_system_messages_merged_at_the_start_in_place_later():
    two = [SYS, {"role": "system", "content": "Answer briefly."}, U1]
    merged = [{"role": "system", "content": SYS["content"] + "\n\nAnswer briefly."}, U1]
    for name in NAMES:
        assert render_text(two, name, True) == render_text(merged, name, True)
    late = [U1, A1, {"role": "system", "content": "Be terse."}, U2]
    assert "<|start_header_id|>system<|end_header_id|>Be terse.<|eot_id|><|end_context|>" in render_text(
        late, "llama3-context", True)
    assert "<|End|><|SYSTEM|> Be terse. <|USER|>" in render_text(late, "user-assistant", True)
    assert "<|endoftext|>\nSystem: Be terse.\nUser: " in render_text(late, "plain", True)
    assert "<|endoftext|>\n### System: Be terse.\n### Human: " in render_text(late, "guanaco", True)


@pytest.mark.parametrize("name", NAMES)
def test_flatten_is_the_rendering_rule(name, toks):
    tok = toks[name]
    for messages in CONVERSATIONS.values():
        for tools in (None, TOOLS):
            flat = flatten(messages, tools)
            assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in flat)
            assert flatten(flat) == flat
            assert render_chat(tok, flat, name) == render_chat(tok, messages, name, tools=tools)


@pytest.mark.parametrize("name", NAMES)
def test_mask_trains_the_call_not_the_tool_result(name, toks):
    t, tok = TEMPLATES[name], toks[name]
    ids, mask = render_chat(tok, [SYS, U1, CALL], name, tools=TOOLS)
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == t.reply_prefix + render_assistant("", CALL["tool_calls"]) + t.end_of_turn
    ids, mask = render_chat(tok, [SYS, U1, CALL, TOOL, A1], name, tools=TOOLS)
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == t.reply_prefix + A1["content"] + t.end_of_turn
    assert TOOL["content"] not in trained and "get_weather" not in trained


@pytest.mark.parametrize("name", NAMES)
def test_prefix_invariant_after_tools_and_late_system(name, toks):
    tok = toks[name]
    calls = [CALL, {**CALL, "content": "Let me see. "}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "now", "arguments": "{}"}}] * 2}]
    late = {"role": "system", "content": "Be terse."}
    for prompt in ([U1, CALL, TOOL], [SYS, U1, CALL, TOOL, TOOL], [U1, A1, late, U2], [U1, late], [U1]):
        for tools in (None, TOOLS):
            p_ids, _ = render_chat(tok, prompt, name, add_generation_prompt=True, tools=tools)
            for reply in [*(dict(c) for c in calls), *({"role": "assistant", "content": r} for r in TRICKY_REPLIES)]:
                ids, mask = render_chat(tok, [*prompt, reply], name, tools=tools)
                assert ids[: len(p_ids)] == p_ids, (name, prompt, reply)
                assert mask[: len(p_ids)] == [0] * len(p_ids) and all(mask[len(p_ids):]), (name, reply)


def test_generated_call_parses_back(toks):
    for name in NAMES:
        t, tok = TEMPLATES[name], toks[name]
        ids, mask = render_chat(tok, [U1, CALL], name)
        reply = tok.decode([i for i, m in zip(ids, mask, strict=True) if m][:-1])
        parsed = parse_assistant(reply[len(t.reply_prefix):])
        assert parsed.content == "" and parsed.tool_calls[0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("name", NAMES)
def test_control_spellings_in_tools_calls_and_results_stay_text(name, full_tok):
    tok, control = full_tok, full_tok.special_token_ids
    spelled = "x <|eot_id|> <|endoftext|> <|End|>"
    tools = [{"type": "function", "function": {"name": "f", "description": spelled}}]
    call = {"role": "assistant", "content": spelled, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"s": spelled}}}]}
    plain_tools = [{"type": "function", "function": {"name": "f", "description": "x"}}]
    plain_call = {"role": "assistant", "content": "x", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"s": "x"}}}]}
    ids, _ = render_chat(tok, [U1, call, {"role": "tool", "content": spelled}], name, True, tools=tools)
    clean, _ = render_chat(tok, [U1, plain_call, {"role": "tool", "content": "x"}], name, True, tools=plain_tools)
    assert sorted(i for i in ids if i in control) == sorted(i for i in clean if i in control)
    assert tok.decode(ids).count(spelled) == 4
