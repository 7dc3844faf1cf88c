"""lm-evaluation-harness bridge: the two failure messages (not installed / datasets unreachable), task
parsing, and result extraction, with the module absent or replaced by a stub."""

from __future__ import annotations

import sys
import types

import pytest

from gpt2chat.cli import main
from gpt2chat.evaluate.harness import HarnessError, parse_tasks, require_harness, run_harness


@pytest.fixture
def no_lm_eval(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError


def _stub(monkeypatch, simple_evaluate):
    module = types.ModuleType("lm_eval")
    module.simple_evaluate = simple_evaluate
    monkeypatch.setitem(sys.modules, "lm_eval", module)


def test_missing_harness_is_a_clear_error(no_lm_eval):
    with pytest.raises(HarnessError, match="lm-evaluation-harness .* is not installed.*pip install"):
        require_harness()


def test_cli_says_harness_missing_before_loading_anything(no_lm_eval, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # never loaded: the harness check comes first
    status = main(["eval", "--model", str(folder), "--harness", "leaderboard", "--out", str(tmp_path / "out")])
    assert status == 2
    err = capsys.readouterr().err
    assert "error:" in err and "not installed" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_unreachable_datasets_are_reported_and_not_retried(monkeypatch):
    calls = []

    def simple_evaluate(**kwargs):
        calls.append(kwargs)
        try:
            raise OSError("Max retries exceeded with url: /datasets/allenai/ai2_arc")
        except OSError as inner:
            raise RuntimeError("could not load dataset") from ConnectionError(str(inner))

    _stub(monkeypatch, simple_evaluate)
    rows = run_harness("/ckpt", parse_tasks("arc,hellaswag"))
    assert len(calls) == 1  # the second task needs the same hub: not attempted
    assert calls[0]["model"] == "hf" and calls[0]["model_args"].startswith("pretrained=/ckpt")
    assert calls[0]["tasks"] == ["arc_challenge"] and calls[0]["num_fewshot"] == 25
    assert [r["status"] for r in rows] == ["unavailable", "unavailable"]
    assert "could not reach the datasets" in rows[0]["message"]
    assert rows[1]["message"] == rows[0]["message"]


def test_other_harness_errors_are_failures_and_results_are_read(monkeypatch):
    def simple_evaluate(**kwargs):
        if kwargs["tasks"] == ["mmlu"]:
            raise ValueError("bad task config")
        return {"results": {kwargs["tasks"][0]: {"alias": "x", "acc,none": 0.25, "acc_stderr,none": 0.01,
                                                 "acc_norm,none": 0.3, "acc_norm_stderr,none": 0.02}}}

    _stub(monkeypatch, simple_evaluate)
    rows = run_harness("/ckpt", parse_tasks("hellaswag,mmlu"), limit=5)
    assert rows[0]["status"] == "ok" and rows[0]["metric"] == "acc_norm"
    assert rows[0]["value"] == 0.3 and rows[0]["stderr"] == 0.02 and rows[0]["limit"] == 5
    assert rows[1]["status"] == "failed" and "bad task config" in rows[1]["message"]


def test_parse_tasks():
    tasks = parse_tasks("leaderboard")
    assert [(t.name, t.num_fewshot) for t in tasks] == [("arc_challenge", 25), ("hellaswag", 10), ("mmlu", 5),
                                                        ("truthfulqa_mc2", 0)]
    assert [(t.name, t.num_fewshot) for t in parse_tasks("winogrande:5, truthfulqa")] == [
        ("winogrande", 5), ("truthfulqa_mc2", 0)]
    with pytest.raises(HarnessError):
        parse_tasks(" , ")
    with pytest.raises(HarnessError):
        parse_tasks("arc:many")


def test_evaluate_models_reports_unreachable_harness_datasets(monkeypatch, tiny_checkpoint, tmp_path, capsys):
    from gpt2chat.evaluate.runner import evaluate_models

    def simple_evaluate(**kwargs):
        raise ConnectionError("Couldn't reach 'cais/mmlu' on the Hub (LocalEntryNotFoundError)")

    _stub(monkeypatch, simple_evaluate)
    report = evaluate_models([str(tiny_checkpoint)], tmp_path / "out", harness="mmlu",
                             skip=("ppl", "pref", "gen", "speed", "side"), progress=False)
    rows = report["models"][0]["harness"]
    assert rows[0]["status"] == "unavailable" and "could not reach the datasets of task 'mmlu'" in rows[0]["message"]
    assert "could not reach the datasets" in capsys.readouterr().err
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## lm-evaluation-harness" in md and "unavailable" in md
