"""The one rule for fitting a conversation into the context (gpt2chat.context_fit), and that training,
chat and evaluation keep the same messages of the same conversation under it."""

from __future__ import annotations

from collections import Counter

import pytest

from chat_samples import conversation
from gpt2chat.context_fit import PromptTooLongError, candidates, fit_messages, reply_reserve
from gpt2chat.data import Budgets, Conversation
from gpt2chat.data.examples import build_preferences, build_sft
from gpt2chat.data.types import PreferencePair
from gpt2chat.templates import get_template, render_chat


@pytest.mark.parametrize("template", ["llama3-context", "user-assistant", "plain"])
def test_oldest_turns_go_first_and_the_prompt_is_a_whole_rendering(chat_tokenizer, template):
    spec = get_template(template)
    messages = conversation(6)
    full = render_chat(chat_tokenizer, messages, spec, add_generation_prompt=True)[0]
    context = len(full) // 2
    fitted = fit_messages(chat_tokenizer, spec, messages, context=context, reserve=10)
    assert len(fitted.ids) <= context - 10
    assert fitted.messages[0]["role"] == "system" and fitted.messages[-1]["content"] == "last question"
    assert fitted.messages[1]["role"] == "user"  # the kept history starts on a user turn
    # whole turns went, oldest first: the kept ones are the newest, in order
    kept_questions = [m["content"].split()[1] for m in fitted.messages if m["content"].startswith("question")]
    assert kept_questions == [str(t) for t in range(6 - len(kept_questions), 6)]
    assert fitted.dropped_turns == 6 - len(kept_questions) > 0
    # exactly the template's rendering of the kept messages: nothing cut off the front
    assert fitted.ids == render_chat(chat_tokenizer, fitted.messages, spec, add_generation_prompt=True)[0]


def test_nothing_is_dropped_when_it_fits_or_when_truncation_is_off(chat_tokenizer):
    spec = get_template("llama3-context")
    messages = conversation(2)
    fitted = fit_messages(chat_tokenizer, spec, messages, context=1024, reserve=100)
    assert fitted.dropped_turns == 0 and fitted.messages == messages
    with pytest.raises(PromptTooLongError, match="send truncate"):
        fit_messages(chat_tokenizer, spec, conversation(6), context=100, truncate=False, hint=" (or send truncate)")


def test_a_reply_without_its_question_at_the_front_is_a_turn_of_its_own(chat_tokenizer):
    spec = get_template("llama3-context")
    messages = [{"role": "assistant", "content": "Welcome! " * 20}, *conversation(1)[1:]]
    fitted = fit_messages(chat_tokenizer, spec, messages, context=60, reserve=1)
    assert [m["role"] for m in fitted.messages] == ["user", "assistant", "user"] and fitted.dropped_turns == 1
    fitted = fit_messages(chat_tokenizer, spec, messages, context=30, reserve=1)
    assert [m["role"] for m in fitted.messages] == ["user"] and fitted.dropped_turns == 2


def test_a_last_message_that_alone_does_not_fit_is_an_error(chat_tokenizer):
    spec = get_template("llama3-context")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "word " * 200}]
    with pytest.raises(PromptTooLongError, match="context is 64 tokens"):
        fit_messages(chat_tokenizer, spec, messages, context=64)


def test_the_reserve_is_the_reply_budget_capped_at_a_quarter_of_the_context():
    assert reply_reserve(1024, 64) == 64
    assert reply_reserve(1024, 1000) == 256
    assert reply_reserve(2, 5) == 1


def roles(messages):
    return [m["role"] for m in messages]


def test_candidates_drop_whole_turns_oldest_first_and_keep_system_messages_and_the_tail():
    messages = [{"role": "system", "content": "s"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
                {"role": "assistant", "content": "a1 again"}, {"role": "system", "content": "mid"},
                {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"},
                {"role": "user", "content": "u3"}, {"role": "assistant", "content": "a3"}]
    seen = [([m["content"] for m in kept], dropped) for kept, dropped in candidates(messages)]
    assert seen == [
        (["s", "hello", "u1", "a1", "a1 again", "mid", "u2", "a2", "u3", "a3"], 0),
        (["s", "u1", "a1", "a1 again", "mid", "u2", "a2", "u3", "a3"], 1),  # the greeting is a turn of its own
        (["s", "mid", "u2", "a2", "u3", "a3"], 2),  # a turn runs to the next user message; system stays
        (["s", "mid", "u3", "a3"], 3),  # the tail (last user message and its reply) is never dropped
    ]
    assert [c for c, _ in candidates([{"role": "user", "content": "only"}])] == [[{"role": "user", "content": "only"}]]


def test_fit_messages_reports_what_it_dropped(chat_tokenizer):
    spec = get_template("llama3-context")
    full = render_chat(chat_tokenizer, conversation(4), spec, add_generation_prompt=True)[0]
    fitted = fit_messages(chat_tokenizer, spec, conversation(4), context=len(full) - 5)
    assert fitted.dropped_turns == 1 and fitted.notice() == "(1 oldest turn dropped to fit the model's context)"
    assert fit_messages(chat_tokenizer, spec, conversation(1), context=1024).notice() == ""


GREETING_FIRST = [{"role": "system", "content": "You are the museum's guide. " * 3},
                  {"role": "assistant", "content": "Welcome to the museum! Ask me anything. " * 3},
                  {"role": "user", "content": "Where are the paintings? " * 4},
                  {"role": "assistant", "content": "Second floor, east wing. " * 4},
                  {"role": "user", "content": "And the statues? " * 4},
                  {"role": "assistant", "content": "In the garden. " * 4},
                  {"role": "user", "content": "When do you close?"},
                  {"role": "assistant", "content": "At six."}]


@pytest.mark.parametrize("template", ["llama3-context", "user-assistant"])
def test_training_keeps_the_context_chat_keeps_for_every_budget(chat_tokenizer, template):
    """For each budget, the SFT example of a conversation is its reply after exactly the messages that
    chat's fit_messages keeps of the same prompt with the room of that reply: one rule, not two."""
    spec = get_template(template)
    prompt, reply = GREETING_FIRST[:-1], GREETING_FIRST[-1]
    full = render_chat(chat_tokenizer, GREETING_FIRST, spec)[0]
    reply_tokens = len(full) - len(render_chat(chat_tokenizer, prompt, spec, add_generation_prompt=True)[0])
    compared = 0
    for max_length in range(len(full), 20, -3):
        budgets = Budgets(max_length=max_length, prompt_truncation="drop")
        drops: Counter = Counter()
        examples = build_sft(chat_tokenizer, [Conversation(GREETING_FIRST, "t:1")], spec, budgets, per_turn=False,
                             drops=drops)
        try:
            fitted = fit_messages(chat_tokenizer, spec, prompt, context=max_length - reply_tokens + 1, reserve=1)
        except PromptTooLongError:  # chat cannot fit even system + last question: training keeps no example
            assert examples == [] and drops == {"last user turn over budget": 1}, max_length
            continue
        (example,) = examples
        assert example.input_ids == render_chat(chat_tokenizer, [*fitted.messages, reply], spec)[0], max_length
        assert fitted.messages[0] == GREETING_FIRST[0]  # the system message is never dropped
        compared += 1
    assert compared >= 5


def test_a_preference_prompt_loses_the_turns_chat_would_lose(chat_tokenizer):
    spec = get_template("llama3-context")
    prompt = GREETING_FIRST[:-1]
    whole = len(render_chat(chat_tokenizer, prompt, spec, add_generation_prompt=True)[0])
    budgets = Budgets(max_prompt_length=whole - 10, max_response_length=16, max_length=whole + 16)
    (example,) = build_preferences(chat_tokenizer, [PreferencePair(prompt, "At six.", "Never.", "t:1")], spec,
                                   budgets)
    fitted = fit_messages(chat_tokenizer, spec, prompt, context=whole - 9, reserve=1)
    assert example.prompt_ids == fitted.ids and fitted.dropped_turns == 1
