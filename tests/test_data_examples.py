"""Conversations -> token ids + masks: per-turn examples, budgets, preference pairs, the prefetch table."""

from __future__ import annotations

from collections import Counter

import pytest

from data_samples import conv, pair, tokenizer_with_every_template, trained_text
from gpt2chat.data import Budgets
from gpt2chat.data.examples import PrefetchedTokenizer, build_preferences, build_sft, preference_example
from gpt2chat.templates import TEMPLATES, get_template, render_chat

tok = pytest.fixture(scope="module")(tokenizer_with_every_template)


UNICODE = ["Привет! Как дела? 😊", "Très bien, merci — et toi ? 你好", "  spaces\n\n and <|eot_id|> typed ",
           "ไม่เป็นไร 👍🏽 naïve café"]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_prefetched_render_equals_plain_render(tok, template):
    conversations = [conv(*UNICODE, system="Système ✓"), conv("Hi", "Hello!"), conv("1+1?", "2", "x2?", "4")]
    fast = PrefetchedTokenizer(tok)
    fast.prefetch(template, ((c.messages, False) for c in conversations))
    for c in conversations:
        for prompt_only in (False, True):
            messages = c.messages[:-1] if prompt_only else c.messages
            assert render_chat(fast, messages, template, prompt_only) == render_chat(tok, messages, template, prompt_only)


def test_prefetch_matches_on_real_multilingual_text(tok, shared_dir):
    from gpt2chat.data import load_conversations

    conversations, _ = load_conversations(f"guanaco:{shared_dir / 'data/guanaco/eval.jsonl'}")
    sample = conversations[::5]
    fast = PrefetchedTokenizer(tok)
    fast.prefetch("llama3-context", ((c.messages, False) for c in sample))
    for c in sample:
        assert render_chat(fast, c.messages) == render_chat(tok, c.messages)


def test_one_example_per_assistant_turn_loss_on_last_reply_only(tok):
    c = conv("What is 2+2?", "4", "And 3+3?", "6")
    examples = build_sft(tok, [c], "llama3-context", Budgets.sft())
    assert [trained_text(tok, e) for e in examples] == ["4<|eot_id|>", "6<|eot_id|>"]
    last_only = build_sft(tok, [c], "llama3-context", Budgets.sft(), per_turn=False)
    assert len(last_only) == 1 and last_only[0].input_ids == examples[1].input_ids
    assert "<|start_context|>" in tok.decode(examples[1].input_ids)


def test_context_cut_from_oldest_turn_reply_kept(tok):
    filler = "blah " * 40
    c = conv(f"oldest {filler}", f"old reply {filler}", "middle question", f"middle reply {filler}",
             "last question", "final reply", system="Be brief.")
    full = render_chat(tok, c.messages)[0]
    budget = Budgets(max_length=len(full) - 5)
    drops, truncations = Counter(), Counter()
    (example,) = build_sft(tok, [c], "llama3-context", budget, per_turn=False, drops=drops, truncations=truncations)
    text = tok.decode(example.input_ids)
    assert len(example.input_ids) <= budget.max_length
    assert "oldest" not in text and "middle question" in text and "Be brief." in text
    assert trained_text(tok, example) == "final reply<|eot_id|>"
    assert not drops and truncations == {"oldest turns dropped to fit": 1}  # kept, and said to be cut
    truncations.clear()
    build_sft(tok, [c], "llama3-context", Budgets(max_length=len(full)), per_turn=False, truncations=truncations)
    assert not truncations  # a conversation that fits loses nothing and is not counted


def test_reply_that_cannot_fit_is_dropped_and_counted(tok):
    c = conv("Tell me a story", "once upon a time " * 100)
    drops = Counter()
    assert build_sft(tok, [c], "llama3-context", Budgets(max_length=64), drops=drops) == []
    assert drops == {"reply over max_length": 1}
    drops = Counter()
    assert build_sft(tok, [c], "plain", Budgets(max_response_length=10, max_length=512), drops=drops) == []
    assert drops == {"reply over max_response_length": 1}


def test_long_last_user_turn_is_dropped_when_asked(tok):
    c = conv("question " * 200, "short answer")
    drops = Counter()
    assert build_sft(tok, [c], "llama3-context", Budgets(max_length=100, prompt_truncation="drop"), drops=drops) == []
    assert drops == {"last user turn over budget": 1}


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_every_example_has_a_nonempty_mask(tok, template):
    conversations = [conv(*UNICODE), conv("a", "b", "c", "d", "e", "f", system="s")]
    for example in build_sft(tok, conversations, template, Budgets.sft()):
        assert sum(example.assistant_mask) > 0
        assert len(example.input_ids) == len(example.assistant_mask)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_preference_example_concatenates_to_the_full_render(tok, template):
    p = pair(["Hello", "Hi!", "Is the sky blue?"], system="Be kind.")
    example, reason = preference_example(tok, p, template, Budgets(max_length=1024))
    assert reason is None
    for reply, ids in ((p.chosen, example.chosen_ids), (p.rejected, example.rejected_ids)):
        full, mask = render_chat(tok, p.prompt + [{"role": "assistant", "content": reply}], template)
        assert example.prompt_ids + ids == full
        assert mask[len(example.prompt_ids):] == [1] * len(ids)  # the trainer's mask: prompt 0, reply 1
        end_of_turn = tok.token_to_id(get_template(template).end_of_turn)
        assert ids[-1] == end_of_turn


def test_preference_budgets_like_seed_002(tok):
    long_reply = "word " * 200
    history = ["early question " * 30, "early answer " * 30]
    p = pair([*history, "Final question?"], chosen=long_reply, rejected="Short.")
    truncations = Counter()
    example, _ = preference_example(tok, p, "plain", Budgets.preference(), truncations)
    assert len(example.prompt_ids) <= 96 and len(example.chosen_ids) == 64
    assert len(example.prompt_ids) + len(example.chosen_ids) <= 160
    assert "Final question?" in tok.decode(example.prompt_ids) and "early" not in tok.decode(example.prompt_ids)
    assert example.rejected_ids[-1] == tok.eos_token_id  # not cut: still ends with end-of-turn
    assert truncations == {"chosen reply cut": 1, "oldest turns dropped to fit": 1}  # "early" went
    drops = Counter()
    drop = Budgets(max_prompt_length=96, max_response_length=64, max_length=160, prompt_truncation="drop")
    assert build_preferences(tok, [pair(["too long " * 100])], "plain", drop, drops) == []
    assert drops == {"last user turn over max_prompt_length": 1}


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_tool_use_loss_on_calls_and_replies_not_tool_results_or_definitions(tok, template, tmp_path):
    import json

    from gpt2chat.data import load_conversations

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    row = {"tools": tools, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "TOOLRESULT 21C"},
        {"role": "assistant", "content": "Sunny, 21C."}]}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (c,), _ = load_conversations(f"messages:{path}")
    t = get_template(template)
    call, answer = build_sft(tok, [c], template, Budgets.sft())
    call_text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert trained_text(tok, call) == t.reply_prefix + call_text + t.end_of_turn
    assert trained_text(tok, answer) == t.reply_prefix + "Sunny, 21C." + t.end_of_turn
    # the tool's definition and its result are in the context, never in the loss
    assert "TOOLRESULT" in tok.decode(answer.input_ids) and '"parameters"' in tok.decode(answer.input_ids)
    assert render_chat(tok, row["messages"], template, tools=tools) == (answer.input_ids, answer.assistant_mask)


def test_tool_rows_tokenize_as_trls_sft_does(tmp_path):
    """TRL's SFTTrainer on the same tool-use rows (messages + tools, assistant_only_loss) with our exported
    tokenizer gives the ids and loss mask of our last-turn example: TRL renders the whole row and trains the
    last assistant turn through the template's {% generation %} span."""
    import json

    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    transformers = pytest.importorskip("transformers")
    from gpt2chat.checkpoint import init_checkpoint
    from gpt2chat.data import load_conversations

    folder = init_checkpoint("tiny", tmp_path / "tiny", seed=0)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}}}}]
    rows = []
    for city in ("Paris", "Oslo", "Lima"):
        rows.append({"tools": json.dumps(tools), "messages": [
            {"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}]},
            {"role": "tool", "content": f"{len(city)}C"},
            {"role": "assistant", "content": f"It is {len(city)}C in {city}."}]})
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, save_strategy="no",
                         bf16=False, assistant_only_loss=True, max_length=None, dataset_num_proc=None)
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=hf_tok,
                             train_dataset=datasets.Dataset.from_list(rows))
    theirs = [(list(r["input_ids"]), [int(label != -100) for label in r["labels"]]) for r in trainer.train_dataset]

    from gpt2chat.tokenizer import Tokenizer

    ours_tok = Tokenizer.from_dir(folder)
    conversations, _ = load_conversations(f"messages:{path}")
    ours = [(e.input_ids, e.assistant_mask)
            for e in build_sft(ours_tok, conversations, ours_tok.template_name, Budgets.sft(), per_turn=False)]
    assert ours == theirs
