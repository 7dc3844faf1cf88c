"""lm-evaluation-harness: for real (lm-eval's `hf` backend on our checkpoint, a local multiple-choice task,
its log-likelihoods against our own model's, offline), and the bridge's failure messages (not installed /
datasets unreachable), task parsing and result extraction with the module absent or replaced by a stub."""

from __future__ import annotations

import os
import socket
import sys
import types

import pytest
import torch

from gpt2chat.cli import main
from gpt2chat.evaluate.harness import HarnessError, parse_tasks, require_harness, run_harness
from lm_eval_tasks import QUESTIONS, write_multiple_choice_task

ALL_SECTIONS = ("ppl", "pref", "gen", "speed", "side")


@pytest.fixture
def real_lm_eval():
    """The installed lm_eval; CI installs the harness extra, so there a missing one is a failure."""
    if os.environ.get("CI"):
        import lm_eval
    else:
        lm_eval = pytest.importorskip("lm_eval")
    return lm_eval


@pytest.fixture
def no_network(monkeypatch):
    """Block every connection that leaves this machine; the list records the attempts."""
    attempts = []
    real_connect = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else str(address)
        if self.family == getattr(socket, "AF_UNIX", None) or host in ("localhost", "::1") or host.startswith("127."):
            return real_connect(self, address)
        attempts.append(address)
        raise OSError(f"network blocked by the test: {address}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


def _our_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) by our model, tokenized as lm-eval does (context, then the rest)."""
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids)[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    picked = logprobs.gather(-1, targets[:, None])[:, 0]
    return float(picked[len(context_ids) - 1:].sum())


def test_lm_eval_runs_a_local_task_on_our_checkpoint_offline(real_lm_eval, tiny_checkpoint, tmp_path, monkeypatch,
                                                             no_network):
    from gpt2chat.checkpoint import load_model
    from gpt2chat.evaluate.report_card import evaluate_models

    task = write_multiple_choice_task(tmp_path / "tasks")
    outputs = []
    real_simple_evaluate = real_lm_eval.simple_evaluate

    def spy(**kwargs):  # the real harness, its output kept for the comparison below
        outputs.append(real_simple_evaluate(**kwargs))
        return outputs[-1]

    monkeypatch.setattr(real_lm_eval, "simple_evaluate", spy)
    # a local task file and a registered task, whose dataset is on the hub: unreachable here, said so
    report = evaluate_models([str(tiny_checkpoint)], tmp_path / "out", harness=f"{task},arc_easy",
                             skip=ALL_SECTIONS, progress=False)
    local, registered = report["models"][0]["harness"]
    assert local["status"] == "ok" and local["task"] == "gpt2chat_mc" and local["metric"] == "acc"
    assert local["samples"] == len(QUESTIONS) and local["source"] == str(task.resolve())

    # lm-eval scored every choice with our weights: its log-likelihoods are our model's
    model, tokenizer = load_model(str(tiny_checkpoint), device="cpu", dtype=torch.float32)
    samples = outputs[0]["samples"]["gpt2chat_mc"]
    correct = 0
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        question, choices, answer = QUESTIONS[sample["doc_id"]]
        theirs = [ll for ll, _ in sample["filtered_resps"]]
        ours = [_our_loglikelihood(model, tokenizer, question, " " + choice) for choice in choices]
        assert theirs == pytest.approx(ours, abs=2e-3)
        correct += max(range(len(ours)), key=ours.__getitem__) == answer
    assert local["value"] == pytest.approx(correct / len(QUESTIONS))

    assert registered["status"] == "unavailable" and registered["source"] == "lm-eval registry"
    assert "arc_easy" in registered["message"] and "hub" in registered["message"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"| gpt2chat_mc (gpt2chat_mc.yaml) | acc | {100 * local['value']:.2f}% |" in md
    assert not no_network  # nothing reached for the hub


def test_local_task_files_parse_and_a_missing_one_fails_first(tmp_path):
    task = write_multiple_choice_task(tmp_path)
    parsed = parse_tasks(f"{task}:2, hellaswag")
    assert parsed[0].name == "gpt2chat_mc" and parsed[0].num_fewshot == 2 and parsed[0].path == str(task.resolve())
    assert parsed[1].name == "hellaswag" and parsed[1].path is None
    with pytest.raises(HarnessError, match="task file not found: .*missing.yaml"):
        parse_tasks(str(tmp_path / "missing.yaml"))
    (tmp_path / "other.yaml").write_text("dataset_path: json\n")
    with pytest.raises(HarnessError, match="no `task:` name"):
        parse_tasks(str(tmp_path / "other.yaml"))


@pytest.fixture
def no_lm_eval(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError


class _StubTaskManager:
    def __init__(self, include_defaults=True, include_path=None):
        self.all_tasks = ["arc_challenge", "hellaswag", "mmlu"] if include_defaults else []


def _stub(monkeypatch, simple_evaluate):
    module = types.ModuleType("lm_eval")
    module.simple_evaluate = simple_evaluate
    tasks = types.ModuleType("lm_eval.tasks")
    tasks.TaskManager = _StubTaskManager
    tasks.__file__ = "/nonexistent/lm_eval/tasks/__init__.py"
    module.tasks = tasks
    monkeypatch.setitem(sys.modules, "lm_eval", module)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", tasks)


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
        return {"results": {kwargs["tasks"][0]: {"alias": "x", "sample_len": 5, "acc,none": 0.25, "acc_stderr,none": 0.01,
                                                 "acc_norm,none": 0.3, "acc_norm_stderr,none": 0.02}}}

    _stub(monkeypatch, simple_evaluate)
    rows = run_harness("/ckpt", parse_tasks("hellaswag,mmlu"), limit=5)
    assert rows[0]["status"] == "ok" and rows[0]["metric"] == "acc_norm"  # not "sample_len", not "alias"
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
    from gpt2chat.evaluate.report_card import evaluate_models

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
