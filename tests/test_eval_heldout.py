"""Held-out data: the split a training stage records, model lineages, and the overlap of evaluation rows
with training rows (a warning in the summary, an error with --strict; the run's own split is cleaned)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gpt2chat.cli import main
from gpt2chat.data.mixing import content_hash, pair_hashes, training_hashes
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.evaluate import heldout
from gpt2chat.evaluate.report_card import evaluate_models

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICK = dict(skip=("speed", "side"), max_new_tokens=2, gen_rows=1, progress=False)


def _chat(question: str, answer: str, *earlier: str) -> list[dict]:
    messages = []
    for text in earlier:
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": text.upper()}]
    return messages + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


TRAIN = [_chat("What is 2 + 2?", "4."), _chat("And times 3?", "12.", "What is 2 + 2?")]
HELD_OUT = [_chat("Name a colour.", "Blue."), _chat("What is 2 + 2?", "4."), _chat("Say hi.", "Hi!")]
PAIRS_TRAIN = [{"prompt": [{"role": "user", "content": "Be nice."}], "chosen": "Sure!", "rejected": "No."}]
PAIRS_HELD_OUT = [{"prompt": [{"role": "user", "content": "Be nice."}], "chosen": "Sure!", "rejected": "Go away.",
                   "source": "v:1"},
                  {"prompt": [{"role": "user", "content": "Count."}], "chosen": "1, 2.", "rejected": "3.",
                   "source": "v:2"}]


def test_content_hash_ignores_layout_but_not_roles_or_words():
    messages = _chat("What  is 2 + 2?", "4.")
    assert content_hash(messages) == content_hash(_chat("What is 2 + 2? ", "4."))
    assert content_hash(messages) != content_hash(_chat("What is 2 + 3?", "4."))
    swapped = [{**m, "role": "system" if m["role"] == "user" else m["role"]} for m in messages]
    assert content_hash(messages) != content_hash(swapped)
    # every prefix that ends in an assistant reply is a training row
    long = _chat("And times 3?", "12.", "What is 2 + 2?")
    assert training_hashes(long) == [content_hash(long[:2]), content_hash(long)]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_checkpoint):
    """A fake two-stage run: init -> sft (conversations) -> orpo (pairs), with their split records."""
    root = tmp_path_factory.mktemp("run")
    init = shutil.copytree(tiny_checkpoint, root / "sft" / "init")
    sft_final = shutil.copytree(tiny_checkpoint, root / "sft" / "final")
    orpo_final = shutil.copytree(tiny_checkpoint, root / "orpo" / "final")
    sft_hashes = [h for messages in TRAIN for h in training_hashes(messages)]
    heldout.write_split(root / "sft", stage="sft", kind="conversations", base_model=str(init),
                        rows=[{"messages": m, "source": f"x:{i}"} for i, m in enumerate(HELD_OUT)], hashes=sft_hashes,
                        data=["messages:train.jsonl"], seed=0, val_fraction=0.5)
    orpo_hashes = [h for p in PAIRS_TRAIN for h in pair_hashes(p["prompt"], p["chosen"], p["rejected"])]
    heldout.write_split(root / "orpo", stage="orpo", kind="pairs", base_model=str(sft_final), rows=PAIRS_HELD_OUT,
                        hashes=orpo_hashes, data=["ultrafeedback:p.jsonl"], seed=0, val_fraction=0.5)
    for stage in ("sft", "orpo"):
        (root / stage / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    return {"root": root, "init": str(init), "sft": str(sft_final), "orpo": str(orpo_final)}


def test_lineage_follows_each_stage_back_to_its_start(run):
    orpo = heldout.lineage_of(run["orpo"])
    assert orpo.label == "sft+orpo" and [s["stage"] for s in orpo.stages] == ["sft", "orpo"]
    assert content_hash(TRAIN[0]) in orpo.hashes  # sft's rows count for the orpo model too
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
    assert "checked by content hash against each model's training rows: 1 of 2 are training rows of sft+orpo." in summary

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


def test_builders_record_the_validation_rows_and_the_training_hashes():
    from gpt2chat.data import SAMPLE_PREF_SPEC, SAMPLE_SFT_SPEC, build_preference_examples, build_sft_examples
    from gpt2chat.data.mixing import messages_key
    from gpt2chat.tokenizer import Tokenizer

    tokenizer = Tokenizer.gpt2()
    _, val, stats = build_sft_examples([SAMPLE_SFT_SPEC], tokenizer, "plain", val_fraction=0.1, use_cache=False)
    split = stats["split"]
    assert len(split["heldout"]) == 40 and {e.source for e in val} <= {r["source"] for r in split["heldout"]}
    trained = set(split["train_hashes"])
    assert not any(content_hash(r["messages"]) in trained for r in split["heldout"]
                   if sum(messages_key(r["messages"]) == messages_key(o["messages"]) for o in split["heldout"]) == 1
                   and len(r["messages"]) > 2 and r["messages"][0]["role"] == "system")
    _, _, stats = build_preference_examples([SAMPLE_PREF_SPEC], tokenizer, "plain", val_fraction=0.1, use_cache=False)
    pairs = stats["split"]["heldout"]
    assert len(pairs) == 20 and set(pairs[0]) == {"prompt", "chosen", "rejected", "source"}
    assert len(stats["split"]["train_hashes"]) == 2 * 180  # prompt + chosen and prompt + rejected of each


def test_quickstart_scores_only_held_out_rows_and_warns_when_told_to_score_training_rows(tmp_path):
    out = tmp_path / "qs"
    command = ["pipeline", "--config", str(CONFIGS / "quickstart.toml"), "--out", str(out),
               "--set", "sft.max_steps=2", "--set", "sft.warmup_steps=1", "--set", "orpo.max_steps=1",
               "--set", "orpo.warmup_steps=0", "--set", "batch_size=4", "--set", "max_length=128",
               "--set", "progress=false", "--set", "sft.eval_every=0", "--set", "orpo.eval_every=0",
               "--set", "eval.gen_rows=1", "--set", "eval.max_new_tokens=2", "--set", "eval.heldout_prompts=1",
               "--set", "eval.progress=false", "--set", 'eval.skip=["speed"]']
    assert main(command) == 0
    report = json.loads((out / "eval" / "report.json").read_text())
    conversations, pairs = report["datasets"]["conversations"], report["datasets"]["preferences"]
    assert conversations["origin"] == pairs["origin"] == "run" and report["warnings"] == []
    assert conversations["kept"] == heldout.read_split(out / "sft")["count"]
    assert pairs["kept"] == heldout.read_split(out / "orpo")["count"]
    for info in (conversations, pairs):  # every scored row is held out from every trained model
        assert {label: o["rows"] for label, o in info["overlap"].items()} == {
            "base (random init)": None, "sft": 0, "sft+orpo": 0}
    assert report["plots"]["perplexity"]["series"] == ["base (random init)", "sft", "sft+orpo"]
    assert report["plots"]["loss curves"]["series"] == ["sft train", "sft eval", "sft+orpo train", "sft+orpo eval"]
    md = (out / "eval" / "report.md").read_text()
    assert "held-out conversations of stage sft" in md and "held-out preference pairs of stage orpo" in md
    assert "is a training row of sft, sft+orpo" in md and "Warning" not in md

    # the same run scored on the packaged sample it trained on: the summary says so
    assert main([*command, "--resume", "--set", "eval.data=sample", "--set", 'eval.skip=["speed", "pref"]']) == 0
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["datasets"]["conversations"]["origin"] == "given"
    assert any("are training rows of sft" in warning for warning in report["warnings"])
    summary = (out / "eval" / "report.md").read_text().split("## Perplexity")[0]
    assert "> **Warning:**" in summary and "its figures on them are not held-out" in summary
