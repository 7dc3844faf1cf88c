"""Issue #14, data side: a broken OASST branch loses only itself; over-long prompts are cut, not dropped, as chosen."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from data_samples import conv, msg, pair, texts, tokenizer_with_every_template, trained_text, write
from gpt2chat.cli import main
from gpt2chat.data import Budgets, DataError, FormatOptions, load_conversations
from gpt2chat.data.examples import build_preferences, build_sft
from gpt2chat.data.report import format_stats
from gpt2chat.train.config import ConfigError, TrainConfig

# One tree: a valid two-turn path, a sibling branch where a prompter answers a prompter (with an assistant
# reply under it), and a message of the same tree whose parent is missing.
BROKEN_BRANCH_TREE = [
    msg("r", None, "prompter", "Q1"),
    msg("a0", "r", "assistant", "A0", rank=0),
    msg("q2", "a0", "prompter", "Q2", rank=0),
    msg("b0", "q2", "assistant", "B0", rank=0),
    msg("bad", "q2", "prompter", "a prompter answering a prompter", rank=1),
    msg("bada", "bad", "assistant", "under the broken branch"),
    msg("a1", "r", "assistant", "A1", rank=1),
    msg("lost", "nowhere", "assistant", "parent missing"),
]


def test_a_broken_branch_keeps_every_valid_path_of_its_tree(tmp_path):
    spec = write(tmp_path, BROKEN_BRANCH_TREE)
    (best,), report = load_conversations(spec, strict=True)
    assert texts(best) == ["Q1", "A0", "Q2", "B0"]
    everything, report = load_conversations(spec, options=FormatOptions(all_paths=True))
    assert sorted(tuple(texts(c)) for c in everything) == [("Q1", "A0", "Q2", "B0"), ("Q1", "A1")]
    assert report.dropped["oasst: broken branch (turns do not alternate)"] == 1
    assert report.dropped["oasst: broken branch (missing parent)"] == 1
    assert not any(reason.startswith("oasst: broken tree") for reason in report.dropped)
    assert report.info["trees"] == 1


def test_a_broken_best_branch_falls_back_to_the_next_valid_one(tmp_path):
    rows = [msg("r", None, "prompter", "Q"),
            msg("p", "r", "prompter", "best-ranked but a prompter", rank=0),
            msg("pa", "p", "assistant", "under it"),
            msg("a", "r", "assistant", "the valid reply", rank=1)]
    (conversation,), report = load_conversations(write(tmp_path, rows))
    assert texts(conversation) == ["Q", "the valid reply"]
    assert report.dropped == {"oasst: broken branch (turns do not alternate)": 1}


@pytest.mark.parametrize("all_paths", [False, True])
def test_a_tree_with_nothing_valid_left_is_one_broken_tree(tmp_path, all_paths):
    rows = [msg("p", None, "prompter", "P"), msg("pp", "p", "prompter", "PP"), msg("ppa", "pp", "assistant", "A")]
    conversations, report = load_conversations(write(tmp_path, rows), options=FormatOptions(all_paths=all_paths))
    assert conversations == []
    assert report.dropped == {"oasst: broken tree (turns do not alternate)": 1}


# ------------------------------------------------------------------------------------------------ budgets
tok = pytest.fixture(scope="module")(tokenizer_with_every_template)
LONG_QUESTION = "START " + " ".join(f"w{i}" for i in range(300)) + " END?"
SEED_002 = dict(max_prompt_length=96, max_response_length=64, max_length=160)


@pytest.mark.parametrize("template", ["llama3-context", "plain"])
def test_an_over_long_prompt_keeps_its_end_by_default_like_trl(tok, template):
    truncations, drops = Counter(), Counter()
    (example,) = build_preferences(tok, [pair(["early " * 50, "answer", LONG_QUESTION])], template,
                                   Budgets(**SEED_002), drops, truncations)
    prompt = tok.decode(example.prompt_ids)
    assert len(example.prompt_ids) <= 96
    assert 90 <= len(example.prompt_ids)  # the budget is used, not emptied
    assert "END?" in prompt and "START" not in prompt and "early" not in prompt
    assert prompt.rstrip().endswith(tok.decode(example.prompt_ids[-3:]).rstrip())  # the template's frame kept
    assert truncations["last user turn cut to the budget (keep_end)"] == 1 and not drops


def test_keep_start_and_drop_are_explicit_choices(tok):
    p = pair([LONG_QUESTION])
    truncations = Counter()
    (example,) = build_preferences(tok, [p], "llama3-context", Budgets(**SEED_002, prompt_truncation="keep_start"),
                                   Counter(), truncations)
    prompt = tok.decode(example.prompt_ids)
    assert len(example.prompt_ids) <= 96 and "START" in prompt and "END?" not in prompt
    assert truncations == {"last user turn cut to the budget (keep_start)": 1}
    drops = Counter()
    assert build_preferences(tok, [p], "llama3-context", Budgets(**SEED_002, prompt_truncation="drop"), drops) == []
    assert drops == {"last user turn over max_prompt_length": 1}
    with pytest.raises(DataError, match="prompt_truncation must be one of keep_end, keep_start, drop"):
        Budgets(prompt_truncation="middle")


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_sft_cuts_the_last_user_turn_and_keeps_the_reply_whole(tok, mode):
    truncations, drops = Counter(), Counter()
    (example,) = build_sft(tok, [conv(LONG_QUESTION, "The whole reply.")], "llama3-context",
                           Budgets(max_length=80, prompt_truncation=mode), drops=drops, truncations=truncations)
    assert len(example.input_ids) <= 80
    assert trained_text(tok, example).startswith("The whole reply.")
    context = tok.decode(example.input_ids[: example.assistant_mask.index(1)])
    assert ("END?" in context) == (mode == "keep_end") and ("START" in context) == (mode == "keep_start")
    assert truncations == {f"last user turn cut to the budget ({mode})": 1} and not drops


def test_train_config_carries_the_choice():
    assert TrainConfig(data=["x"]).validate().prompt_truncation == "keep_end"
    with pytest.raises(ConfigError, match="prompt_truncation = 'middle' is not allowed"):
        TrainConfig(data=["x"], prompt_truncation="middle").validate()


def test_the_issues_ultrafeedback_command_keeps_the_pairs_and_reports_the_cuts(shared_dir, capsys, tmp_path):
    spec = f"ultrafeedback:{shared_dir / 'data/ultrafeedback/train-1k.jsonl'}"
    code = main(["data", "stats", "--data", spec, "--max-prompt-length", "96", "--max-response-length", "64",
                 "--max-length", "160", "--no-cache", "--json"])
    stats = json.loads(capsys.readouterr().out)
    assert code == 0
    assert stats["train_examples"] + stats["val_examples"] == 998  # was 499 when over-long prompts were dropped
    assert stats["truncated"]["last user turn cut to the budget (keep_end)"] == 474
    assert stats["prompt_length"]["max"] <= 96 and stats["chosen_length"]["max"] <= 64
    assert "cut        474  last user turn cut to the budget (keep_end)\n" in format_stats(stats)


@pytest.mark.parametrize("mode", ["keep_end", "drop"])
def test_a_training_run_applies_the_configured_truncation(tok, tmp_path, mode):
    from gpt2chat.train.distributed import DistState
    from gpt2chat.train.recipes import build_data

    rows = [conv(LONG_QUESTION, "The whole reply."), conv("A short question?", "A short reply.")]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": row.messages}) + "\n" for row in rows))
    cfg = TrainConfig(data=[f"messages:{path}"], max_length=80, val_fraction=0.0, prompt_truncation=mode).validate()
    train, _, stats = build_data(cfg, tok, DistState(), cfg.max_length)
    assert len(train) == (2 if mode == "keep_end" else 1)
    assert bool(stats.get("truncated")) == (mode == "keep_end")


def test_training_says_what_it_dropped_and_strict_stops_at_the_row(tok, tmp_path, capsys):
    from gpt2chat.errors import Gpt2ChatError
    from gpt2chat.train.distributed import DistState
    from gpt2chat.train.recipes import build_data

    rows = [conv("A short question?", "A short reply."), conv("Another?", "word " * 200)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": row.messages}) + "\n" for row in rows))
    cfg = TrainConfig(data=[f"messages:{path}"], max_length=80, val_fraction=0.0).validate()
    train, _, _ = build_data(cfg, tok, DistState(), cfg.max_length)
    assert len(train) == 1 and "dropped      1  reply over max_length" in capsys.readouterr().out
    strict = TrainConfig(data=[f"messages:{path}"], max_length=80, val_fraction=0.0, strict=True).validate()
    with pytest.raises(Gpt2ChatError, match=r"chats.jsonl:2: reply over max_length.*strict"):
        build_data(strict, tok, DistState(), strict.max_length)
