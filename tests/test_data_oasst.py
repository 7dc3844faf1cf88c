"""OASST message tables -> trees -> conversations: ranking, filters, broken trees, all paths; the real file."""

from __future__ import annotations

import json

import pytest

from data_samples import msg, texts, write
from gpt2chat.data import DataError, FormatOptions, load_conversations

TREE = [
    msg("r", None, "prompter", "Q1"),
    msg("a1", "r", "assistant", "second best", rank=1),
    msg("a0", "r", "assistant", "best", rank=0),
    msg("ax", "r", "assistant", "unranked"),
    msg("q2", "a0", "prompter", "Q2", rank=0),
    msg("q2b", "a0", "prompter", "Q2 unanswered", rank=None),
    msg("b1", "q2", "assistant", "B1", rank=1),
    msg("b0", "q2", "assistant", "B0", rank=0),
    msg("z", "a1", "prompter", "follow-up to the second best"),
    msg("z1", "z", "assistant", "Z1"),
]


def test_best_ranked_path(tmp_path):
    conversations, report = load_conversations(write(tmp_path, TREE))
    assert [texts(c) for c in conversations] == [["Q1", "best", "Q2", "B0"]]
    assert [m["role"] for m in conversations[0].messages] == ["user", "assistant", "user", "assistant"]
    assert report.info["trees"] == 1 and report.kept == 1


def test_rank_ties_and_none_prefer_ranked_then_earlier(tmp_path):
    rows = [msg("r", None, "prompter", "Q"),
            msg("u", "r", "assistant", "unranked", created_date="2023-01-01"),
            msg("late", "r", "assistant", "late tie", rank=0, created_date="2023-02-02"),
            msg("early", "r", "assistant", "early tie", rank=0, created_date="2023-01-05")]
    (conversation,), _ = load_conversations(write(tmp_path, rows))
    assert texts(conversation) == ["Q", "early tie"]


def test_all_paths(tmp_path):
    conversations, _ = load_conversations(write(tmp_path, TREE), options=FormatOptions(all_paths=True))
    paths = sorted(tuple(texts(c)) for c in conversations)
    assert paths == sorted([("Q1", "best", "Q2", "B0"), ("Q1", "best", "Q2", "B1"), ("Q1", "best"),
                            ("Q1", "second best", "follow-up to the second best", "Z1"), ("Q1", "unranked")])


def test_filters_drop_whole_subtrees(tmp_path):
    rows = [msg("r", None, "prompter", "Q"),
            msg("a0", "r", "assistant", "deleted best", rank=0, deleted=True),
            msg("q", "a0", "prompter", "under the deleted one"),
            msg("qa", "q", "assistant", "also gone"),
            msg("a1", "r", "assistant", "failed review", rank=1, review_result=False),
            msg("a2", "r", "assistant", "kept", rank=2),
            msg("a3", "r", "assistant", "other language", rank=0, lang="de")]
    (conversation,), report = load_conversations(write(tmp_path, rows))
    assert texts(conversation) == ["Q", "kept"]
    assert report.dropped["oasst: deleted message"] == 1
    assert report.dropped["oasst: failed review"] == 1
    assert report.dropped["oasst: language not en"] == 1
    assert report.dropped["oasst: reply to a dropped message"] == 2
    (german,), _ = load_conversations(write(tmp_path, rows), options=FormatOptions(lang=None))
    assert texts(german) == ["Q", "other language"]


def test_broken_trees_are_counted_and_skipped(tmp_path):
    rows = TREE + [
        # missing parent
        msg("o1", "nowhere", "assistant", "orphan", tree="t2"),
        # cycle
        msg("c1", "c2", "prompter", "c1", tree="t3"), msg("c2", "c1", "assistant", "c2", tree="t3"),
        # prompter replying to a prompter
        msg("p", None, "prompter", "P", tree="t4"), msg("pp", "p", "prompter", "PP", tree="t4"),
        msg("ppa", "pp", "assistant", "A", tree="t4"),
        # an assistant root
        msg("ar", None, "assistant", "I start", tree="t5"), msg("arq", "ar", "prompter", "Q", tree="t5"),
        # a tree with no answer
        msg("lonely", None, "prompter", "anyone?", tree="t6"),
    ]
    conversations, report = load_conversations(write(tmp_path, rows), strict=True)  # structure is not a row fault
    assert [texts(c) for c in conversations] == [["Q1", "best", "Q2", "B0"]]
    assert report.dropped["oasst: broken tree (missing parent)"] == 1
    assert report.dropped["oasst: broken tree (cycle)"] == 1
    assert report.dropped["oasst: broken tree (turns do not alternate)"] == 2
    assert report.dropped["oasst: tree without an assistant reply"] == 1
    assert report.info["trees"] == 6


def test_bad_message_rows(tmp_path):
    rows = [msg("r", None, "prompter", "Q"), msg("a", "r", "assistant", "A", rank=0),
            msg("b", "r", "robot", "?"), msg("c", "r", "assistant", ""), msg("d", "r", "assistant", "x", rank="high"),
            msg("a", "r", "assistant", "dup")]
    conversations, report = load_conversations(write(tmp_path, rows))
    assert len(conversations) == 1
    assert report.dropped == {"unknown role": 1, "empty text": 1, "wrong type": 1, "duplicate message_id": 1}
    with pytest.raises(DataError, match=r"oasst.jsonl line 3: field 'role': unknown role 'robot'"):
        load_conversations(write(tmp_path, rows), strict=True)


def test_real_oasst1_validation_file(shared_dir):
    path = shared_dir / "data/oasst1/en-validation.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    roots = [r for r in rows if r["parent_id"] is None and not r["deleted"] and r["review_result"] is not False]
    conversations, report = load_conversations(f"oasst1:{path}")
    assert report.rows == len(rows) == 2022
    assert report.info["trees"] == 191  # as documented in shared/README.md
    assert len(conversations) == len(roots)  # every surviving root has an answered best path here
    assert all(c.messages[0]["role"] == "user" and c.messages[-1]["role"] == "assistant" for c in conversations)
    everything, _ = load_conversations(f"oasst1:{path}", options=FormatOptions(all_paths=True))
    assert len(everything) > len(conversations)
