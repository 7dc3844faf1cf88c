"""Issue #14, data side: a broken OASST branch loses only itself; over-long prompts are cut, not dropped, as chosen."""

from __future__ import annotations

import pytest

from gpt2chat.data import FormatOptions, load_conversations
from test_data_oasst import msg, texts, write

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
