"""Held-out data: the split a training stage records, model lineages, and the overlap of evaluation rows
with training rows (a warning in the summary, an error with --strict; the run's own split is cleaned)."""

from __future__ import annotations

import json
import shutil

import pytest

from gpt2chat.cli import main
from gpt2chat.data import Conversation, PreferencePair
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.evaluate import heldout
from gpt2chat.evaluate.runner import evaluate_models

QUICK = dict(skip=("speed", "side"), max_new_tokens=2, gen_rows=1, progress=False)


def _chat(question: str, answer: str, *earlier: str) -> list[dict]:
    messages = []
    for text in earlier:
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": text.upper()}]
    return messages + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


TRAIN = [_chat("What is 2 + 2?", "4."), _chat("And times 3?", "12.", "What is 2 + 2?")]
HELD_OUT = [_chat("Name a colour.", "Blue."), _chat("What is 2 + 2?", "4."), _chat("Say hi.", "Hi!")]
PAIRS_TRAIN = [PreferencePair([{"role": "user", "content": "Be nice."}], "Sure!", "No.", "t:1")]
PAIRS_HELD_OUT = [PreferencePair([{"role": "user", "content": "Be nice."}], "Sure!", "Go away.", "v:1"),
                  PreferencePair([{"role": "user", "content": "Count."}], "1, 2.", "3.", "v:2")]


def test_content_hash_ignores_layout_but_not_roles_or_words():
    messages = _chat("What  is 2 + 2?", "4.")
    assert heldout.content_hash(messages) == heldout.content_hash(_chat("What is 2 + 2? ", "4."))
    assert heldout.content_hash(messages) != heldout.content_hash(_chat("What is 2 + 3?", "4."))
    swapped = [{**m, "role": "system" if m["role"] == "user" else m["role"]} for m in messages]
    assert heldout.content_hash(messages) != heldout.content_hash(swapped)
    # every prefix that ends in an assistant reply is a training row
    long = _chat("And times 3?", "12.", "What is 2 + 2?")
    assert heldout.training_hashes(long) == [heldout.content_hash(long[:2]), heldout.content_hash(long)]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_checkpoint):
    """A fake two-stage run: init -> sft (conversations) -> orpo (pairs), with their split records."""
    root = tmp_path_factory.mktemp("run")
    init = shutil.copytree(tiny_checkpoint, root / "sft" / "init")
    sft_final = shutil.copytree(tiny_checkpoint, root / "sft" / "final")
    orpo_final = shutil.copytree(tiny_checkpoint, root / "orpo" / "final")
    sft_hashes = [h for messages in TRAIN for h in heldout.training_hashes(messages)]
    heldout.write_split(root / "sft", stage="sft", kind="conversations", base_model=str(init),
                        rows=[Conversation(m, f"x:{i}") for i, m in enumerate(HELD_OUT)], hashes=sft_hashes,
                        data=["messages:train.jsonl"], seed=0, val_fraction=0.5)
    orpo_hashes = [h for p in PAIRS_TRAIN for h in heldout.pair_hashes(p.prompt, p.chosen, p.rejected)]
    heldout.write_split(root / "orpo", stage="orpo", kind="pairs", base_model=str(sft_final), rows=PAIRS_HELD_OUT,
                        hashes=orpo_hashes, data=["ultrafeedback:p.jsonl"], seed=0, val_fraction=0.5)
    for stage in ("sft", "orpo"):
        (root / stage / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    return {"root": root, "init": str(init), "sft": str(sft_final), "orpo": str(orpo_final)}


def test_lineage_follows_each_stage_back_to_its_start(run):
    orpo = heldout.lineage_of(run["orpo"])
    assert orpo.label == "sft+orpo" and [s["stage"] for s in orpo.stages] == ["sft", "orpo"]
    assert heldout.content_hash(TRAIN[0]) in orpo.hashes  # sft's rows count for the orpo model too
    assert heldout.lineage_of(run["sft"]).label == "sft"
    # the random start lives inside the sft folder but was not trained there
    assert not heldout.lineage_of(run["init"]).known and heldout.is_stage_input(run["init"])
    split = orpo.split("conversations")
    assert split["count"] == 3 and heldout.heldout_spec(split).startswith("messages:")


def test_the_run_split_is_the_default_and_rows_trained_on_are_removed(run, tmp_path):
    report = evaluate_models([run["init"], run["sft"], run["orpo"]], tmp_path / "out", **QUICK)
    assert [m["label"] for m in report["models"]] == ["sft/init", "sft", "sft+orpo"]
    conversations = report["datasets"]["conversations"]
    # "What is 2 + 2?" -> "4." was held out by the split but is an sft training row: not scored
    assert conversations["origin"] == "run" and conversations["kept"] == 3 and conversations["used"] == 2
    assert conversations["removed"] == {"sft": 1}
    assert conversations["overlap"]["sft+orpo"] == {"rows": 0, "of": 2, "trained_on": "sft+orpo"}
    assert conversations["overlap"]["sft/init"]["rows"] is None  # no record of training rows
    pairs = report["datasets"]["preferences"]
    assert pairs["used"] == 1 and pairs["removed"] == {"sft+orpo": 1}
    assert report["warnings"] == []
    md = (tmp_path / "out" / "report.md").read_text()
    assert "held-out conversations of stage sft" in md and "1 removed that sft trained on" in md
    assert "none of the 2 conversations is a training row of sft, sft+orpo" in md
    assert "sft/init: no record of training rows" in md and "Warning" not in md
    # the loss curves are labelled by the stage their metrics.jsonl belongs to, the base has none
    assert report["plots"]["loss curves"]["series"] == ["sft train", "sft+orpo train"]
    assert "metrics_log" not in report["models"][0]


def test_explicit_data_that_overlaps_training_is_a_warning_or_with_strict_an_error(run, tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in [TRAIN[1], HELD_OUT[0]]))
    report = evaluate_models([run["orpo"]], tmp_path / "out", data=f"messages:{data}", skip=("speed", "side", "pref"),
                             max_new_tokens=2, gen_rows=1, progress=False)
    assert report["datasets"]["conversations"]["overlap"]["sft+orpo"]["rows"] == 1
    assert report["models"][0]["perplexity"]["assistant"]["sequences"] == 2  # scored as given, but flagged
    summary = (tmp_path / "out" / "report.md").read_text().split("## Perplexity")[0]
    assert "> **Warning:** 1 of 2 evaluation conversations" in summary and "training rows of sft+orpo" in summary

    with pytest.raises(Gpt2ChatError, match="(?s)overlaps training data .*1 of 2 evaluation conversations"):
        evaluate_models([run["orpo"]], tmp_path / "strict", data=f"messages:{data}", strict=True, **QUICK)
    assert not (tmp_path / "strict").exists()  # nothing scored, nothing written
    status = main(["eval", "--model", run["orpo"], "--data", f"messages:{data}", "--strict", "--skip", "speed,side",
                   "--out", str(tmp_path / "cli"), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: evaluation data overlaps training data") and "Traceback" not in err


def test_heldout_without_a_run_record_says_what_to_do(tiny_checkpoint, tmp_path):
    with pytest.raises(Gpt2ChatError, match="--data heldout: none of the models comes from a training run"):
        evaluate_models([str(tiny_checkpoint)], tmp_path / "out", data="heldout", **QUICK)


def test_a_corrupt_split_record_names_its_file(tmp_path, tiny_checkpoint):
    final = shutil.copytree(tiny_checkpoint, tmp_path / "sft" / "final")
    (tmp_path / "sft" / "heldout").mkdir()
    (tmp_path / "sft" / "heldout" / "split.json").write_text("{not json")
    with pytest.raises(Gpt2ChatError, match=r"sft/heldout/split.json: unreadable held-out split record"):
        heldout.lineage_of(final)
