"""reply.py, the one text side: stop strings with hold-back, the reply decoder (UTF-8, reply prefix),
stop ids from the template, token spellings; and the report card's replies, which must go through the
one truncation policy (gpt2chat.context_fit, tested in test_context_fit.py: never cutting the front of a
rendered prompt)."""

from __future__ import annotations

import json

import pytest

from chat_samples import conversation
from gpt2chat.context_fit import PromptTooLongError
from gpt2chat.pipeline import ReplyStream
from gpt2chat.reply_text import (
    ReplyDecoder,
    StopStrings,
    stop_token_ids,
    token_text,
)
from gpt2chat.tokenizer import Tokenizer


def stream_reply(decoder, ids):
    return ReplyStream(decoder).pieces(ids)


def decode_reply(tokenizer, ids, stop_strings=(), reply_prefix=""):
    """A whole reply's text through the one per-token loop, and whether a stop string ended it."""
    stream = ReplyStream(ReplyDecoder(tokenizer, stop_strings, reply_prefix))
    return "".join(stream.pieces(ids)), stream.done


# ---- stop strings -------------------------------------------------------------------------------------


def run_stops(stops, pieces):
    matcher = StopStrings(stops)
    out, stopped = [], False
    for piece in pieces:
        text, stopped = matcher.push(piece)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(matcher.flush())
    return "".join(out), stopped, out


def test_stop_string_split_over_pieces_is_caught_and_cut():
    assert run_stops(["\nUser:"], ["Hello", " there\n", "Us", "er: more"])[:2] == ("Hello there", True)


def test_text_that_only_looks_like_a_stop_start_is_released():
    text, stopped, out = run_stops(["STOP"], ["a S", "T", "x", " b"])
    assert (text, stopped) == ("a STx b", False)
    assert out[0] == "a "  # "S" held back until it could no longer start "STOP"


def test_earliest_of_several_stop_strings_wins():
    assert run_stops(["bb", "a"], ["xxbba"])[:2] == ("xx", True)


def test_no_stop_strings_passes_everything_through():
    assert run_stops([], ["a", "b"])[2] == ["a", "b", ""]


# ---- the reply decoder ----------------------------------------------------------------------------------


def test_multibyte_characters_split_over_tokens_are_held_until_whole(chat_tokenizer):
    text = "Grüße 🎉 done"
    ids = chat_tokenizer.encode(text)
    assert any("\ufffd" in chat_tokenizer.decode([i]) for i in ids)  # the emoji really is split over tokens
    decoder = ReplyDecoder(chat_tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.finish()]
    assert "".join(pieces) == text == decoder.text
    assert all("\ufffd" not in piece for piece in pieces)
    assert decoder.decoded_chars == len(text)


def test_reply_prefix_is_removed_once_even_when_split_over_tokens(chat_tokenizer):
    space = chat_tokenizer.encode(" ")
    hello = chat_tokenizer.encode("Hello  world")
    assert decode_reply(chat_tokenizer, space + hello, reply_prefix=" ") == ("Hello  world", False)
    assert decode_reply(chat_tokenizer, chat_tokenizer.encode(" Hi"), reply_prefix=" ") == ("Hi", False)
    # a reply that does not start with the prefix is shown as it is
    assert decode_reply(chat_tokenizer, chat_tokenizer.encode("\nHi"), reply_prefix=" ") == ("\nHi", False)
    assert decode_reply(chat_tokenizer, chat_tokenizer.encode(" Hi"), reply_prefix="") == (" Hi", False)


def test_stop_string_ends_the_reply_and_later_tokens_are_ignored(chat_tokenizer):
    ids = chat_tokenizer.encode(" Sure.\nUser: more text")
    decoder = ReplyDecoder(chat_tokenizer, ["\nUser:"], " ")
    pieces = list(stream_reply(decoder, ids))
    assert "".join(pieces) == "Sure." and decoder.stopped
    assert all("\n" not in piece for piece in pieces)  # the start of the stop string was never shown
    assert decoder.push(chat_tokenizer.encode(" again")[0]) == "" and decoder.finish() == ""


def test_partial_stop_string_at_the_end_is_shown(chat_tokenizer):
    assert decode_reply(chat_tokenizer, chat_tokenizer.encode("Done.\nUser"), ["\nUser:"]) == ("Done.\nUser", False)


def test_control_tokens_are_hidden_unless_asked_for(chat_tokenizer):
    eot = chat_tokenizer.token_to_id("<|eot_id|>")
    ids = [*chat_tokenizer.encode("a"), eot, *chat_tokenizer.encode("b")]
    assert decode_reply(chat_tokenizer, ids)[0] == "ab"
    shown = "".join(stream_reply(ReplyDecoder(chat_tokenizer, skip_special_tokens=False), ids))
    assert shown == chat_tokenizer.decode(ids) == "a<|eot_id|>b"


def test_token_text_spells_partial_characters_as_bytes(chat_tokenizer):
    ids = chat_tokenizer.encode("🎉")
    spellings = [token_text(chat_tokenizer, i) for i in ids]
    assert all(s.startswith("bytes:\\x") for s in spellings) and len(set(spellings)) == len(ids)
    assert token_text(chat_tokenizer, chat_tokenizer.encode(" Hello")[0]) == " Hello"
    assert token_text(chat_tokenizer, chat_tokenizer.token_to_id("<|eot_id|>")) == "<|eot_id|>"


# ---- stop ids -------------------------------------------------------------------------------------------


def test_stop_ids_come_from_the_template_and_match_the_saved_generation_config(tiny_checkpoint):
    tok = Tokenizer.from_dir(tiny_checkpoint)
    ids = stop_token_ids(tok)  # the checkpoint's own template
    saved = json.loads((tiny_checkpoint / "generation_config.json").read_text())["eos_token_id"]
    assert sorted(ids) == sorted(saved if isinstance(saved, list) else [saved])
    assert tok.token_to_id("<|eot_id|>") in ids and tok.eos_token_id in ids
    assert stop_token_ids(Tokenizer.gpt2()) == (50256,)  # no template: end-of-text alone


# ---- the report card's replies ---------------------------------------------------------------------------


def test_evaluation_replies_equal_the_chat_session_and_drop_turns_not_tokens(tiny_checkpoint, monkeypatch):
    from gpt2chat.chat import ChatSession
    from gpt2chat.checkpoint import load_model
    from gpt2chat.engine import Engine
    from gpt2chat.evaluate.generated_replies import generate_replies
    from gpt2chat.sampling import SamplingParams

    model, tok = load_model(tiny_checkpoint, device="cpu")
    session = ChatSession(Engine(model), tok, system="Be brief.",
                          params=SamplingParams(temperature=0, max_new_tokens=8))
    expected = "".join(session.send("Hello")).strip()
    prompts = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
               conversation(8, words=20)]  # longer than the tiny model's 256 positions
    seen: list[list[int]] = []
    original = Engine.generate

    def recording_generate(self, prompt_ids, params):
        seen.extend(prompt_ids)
        return original(self, prompt_ids, params)

    monkeypatch.setattr(Engine, "generate", recording_generate)
    replies = generate_replies(model, tok, "llama3-context", prompts, max_new_tokens=8, progress=False)
    assert replies[0] == expected
    long_prompt = tok.decode(seen[1])
    assert long_prompt.startswith("<|begin_of_text|>") and "Be brief." in long_prompt  # the front survived
    assert "last question" in long_prompt and "question 0" not in long_prompt
    with pytest.raises(PromptTooLongError, match="prompt 2 of 2"):
        generate_replies(model, tok, "llama3-context", [prompts[0], [{"role": "user", "content": "x " * 300}]],
                         progress=False)
