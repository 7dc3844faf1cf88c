"""chat.py: streamed replies, stop tokens / strings, history as context, trimming, system, reset."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gpt2chat.chat import ChatSession
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.sampling import SamplingParams
from gpt2chat.templates import render_chat
from gpt2chat.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0, max_new_tokens=16)


class ScriptedStream:
    """What Engine.submit returns, with a fixed reply; stops at a stop token like the engine does."""

    def __init__(self, tokens, params):
        self.tokens, self.params = tokens, params
        self.finish_reason = None
        self.closed = False

    def __iter__(self):
        for token in self.tokens:
            if token in self.params.stop_token_ids:
                self.finish_reason = "stop"
                return
            yield token
        self.finish_reason = "length"

    def cancel(self):
        self.closed = True


class ScriptedEngine:
    def __init__(self, replies, n_positions=1024):
        self.replies = list(replies)
        self.prompts = []
        self.streams = []
        self.config = SimpleNamespace(n_positions=n_positions)

    def submit(self, prompt_ids, params):
        self.prompts.append(list(prompt_ids))
        stream = ScriptedStream(self.replies.pop(0), params)
        self.streams.append(stream)
        return stream


def test_stream_stops_on_end_of_turn_and_keeps_history(chat_tokenizer):
    eot = chat_tokenizer.token_to_id("<|eot_id|>")
    reply = chat_tokenizer.encode("Hi! I am fine.")
    engine = ScriptedEngine([reply + [eot] + chat_tokenizer.encode(" junk"), chat_tokenizer.encode("Second.")])
    chat = ChatSession(engine, chat_tokenizer, "llama3-context", system="Be brief.", params=GREEDY)
    pieces = list(chat.send("How are you?"))
    assert len(pieces) > 1  # streamed, not one block
    assert "".join(pieces) == "Hi! I am fine."
    assert chat.last_finish_reason == "stop"
    expected = render_chat(
        chat_tokenizer,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How are you?"}],
        "llama3-context",
        add_generation_prompt=True,
    )[0]
    assert engine.prompts[0] == expected

    assert "".join(chat.send("And you?")) == "Second."
    assert chat.history == [
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Hi! I am fine."},
        {"role": "user", "content": "And you?"},
        {"role": "assistant", "content": "Second."},
    ]
    # the second prompt carries the first turn as context
    second = render_chat(chat_tokenizer, chat.messages()[:-1], "llama3-context", add_generation_prompt=True)[0]
    assert engine.prompts[1] == second


@pytest.mark.parametrize("template, stop", [("plain", "\nUser:"), ("guanaco", "### Human:")])
def test_stop_string_is_never_shown(chat_tokenizer, template, stop):
    text = f" Sure, here it is.{stop} something else"
    engine = ScriptedEngine([chat_tokenizer.encode(text)])
    chat = ChatSession(engine, chat_tokenizer, template, params=GREEDY)
    pieces = list(chat.send("Tell me"))
    shown = "".join(pieces)
    assert shown == "Sure, here it is."  # the template's leading space is stripped, the stop string hidden
    assert all(stop[:2] not in piece for piece in pieces if piece.strip())
    assert chat.last_finish_reason == "stop"
    assert engine.streams[0].closed  # the engine is told to stop
    assert chat.history[-1]["content"] == "Sure, here it is."


def test_partial_stop_string_at_the_end_is_shown(chat_tokenizer):
    engine = ScriptedEngine([chat_tokenizer.encode(" Done.\nUser")])
    chat = ChatSession(engine, chat_tokenizer, "plain", params=GREEDY)
    assert "".join(chat.send("x")) == "Done.\nUser"
    assert chat.last_finish_reason == "length"


def test_multibyte_characters_split_over_tokens(chat_tokenizer):
    text = "Grüße 🎉 done"
    engine = ScriptedEngine([chat_tokenizer.encode(text)])
    chat = ChatSession(engine, chat_tokenizer, "llama3-context", params=GREEDY)
    pieces = list(chat.send("emoji please"))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_oldest_turns_are_trimmed_to_fit(chat_tokenizer):
    long_reply = chat_tokenizer.encode(" word" * 40)
    engine = ScriptedEngine([long_reply] * 6, n_positions=200)
    chat = ChatSession(engine, chat_tokenizer, "llama3-context", params=GREEDY, reply_reserve=20)
    for turn in range(6):
        "".join(chat.send(f"question {turn}"))
        assert len(engine.prompts[-1]) <= 200 - 20
    assert chat.trimmed_turns > 0
    assert chat.history[-2]["content"] == "question 5"
    assert all(m["content"] != "question 0" for m in chat.history)


def test_message_too_long_for_context(chat_tokenizer):
    engine = ScriptedEngine([], n_positions=64)
    chat = ChatSession(engine, chat_tokenizer, "llama3-context", params=GREEDY)
    with pytest.raises(Gpt2ChatError, match="too long.*context is 64"):
        chat.send("word " * 100)
    assert chat.history == []


def test_reset_and_system(chat_tokenizer):
    engine = ScriptedEngine([chat_tokenizer.encode("a"), chat_tokenizer.encode("b")])
    chat = ChatSession(engine, chat_tokenizer, "user-assistant", params=GREEDY)
    list(chat.send("one"))
    chat.reset()
    assert chat.history == []
    chat.set_system("You are a pirate.")
    list(chat.send("two"))
    expected = render_chat(
        chat_tokenizer,
        [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "two"}],
        "user-assistant",
        add_generation_prompt=True,
    )[0]
    assert engine.prompts[-1] == expected


def test_template_tokens_must_exist():
    with pytest.raises(Gpt2ChatError, match="control tokens"):
        ChatSession(ScriptedEngine([]), Tokenizer.gpt2(), "llama3-context")


def test_stop_tokens_of_template_are_added(chat_tokenizer):
    chat = ChatSession(
        ScriptedEngine([]), chat_tokenizer, "user-assistant", params=GREEDY.replace(stop_token_ids=(5,))
    )
    assert 5 in chat.params.stop_token_ids
    assert chat_tokenizer.token_to_id("<|End|>") in chat.params.stop_token_ids
    assert chat_tokenizer.eos_token_id in chat.params.stop_token_ids


# ---------------------------------------------------------------------- with the real engine


def test_real_engine_reply_equals_engine_output(tiny_checkpoint):
    from gpt2chat.checkpoint import load_model
    from gpt2chat.engine import BatchedEngine, Engine

    model, tokenizer = load_model(tiny_checkpoint, device="cpu")
    engine = Engine(model)
    chat = ChatSession(engine, tokenizer, params=GREEDY)
    reply = "".join(chat.send("Hello"))
    prompt = render_chat(tokenizer, [{"role": "user", "content": "Hello"}], add_generation_prompt=True)[0]
    result = engine.generate([prompt], chat.params)[0]
    # llama3-context puts nothing before a reply: the text is the decoded tokens exactly
    assert reply == tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert chat.last_finish_reason == result.finish_reason

    # a BatchedEngine serves the same session code (submit instead of stream)
    with BatchedEngine(model, max_batch_size=2) as batched:
        batched_chat = ChatSession(batched, tokenizer, params=GREEDY)
        assert "".join(batched_chat.send("Hello")) == reply
