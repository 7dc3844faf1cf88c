"""metrics.jsonl: appended a line at a time, cut back on resume through the atomic writer, and a last
line torn by a kill is no record (it used to stop the resume with a JSON error)."""

from __future__ import annotations

import json

import pytest

from gpt2chat.train.metrics_log import MetricsLog, plot_losses, read_metrics


def test_resume_cuts_the_log_back_and_drops_a_line_torn_by_a_kill(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 4.0 - step, "split": "train"})
    with log.path.open("a") as handle:
        handle.write('{"step": 4, "lo')  # killed mid-append
    assert [r["step"] for r in read_metrics(log.path)] == [1, 2, 3]
    log.truncate_after(2)
    assert log.path.read_text() == "".join(json.dumps({"step": s, "loss": 4.0 - s, "split": "train"}) + "\n"
                                           for s in (1, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left behind


def test_a_bad_line_before_the_last_is_an_error_that_names_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(path)


def test_the_loss_plot_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": 3.0, "split": "train"})
    png = plot_losses(log.path, tmp_path / "loss.png")
    assert png.read_bytes().startswith(b"\x89PNG")
    before = png.read_bytes()
    log.write({"step": 2, "loss": 2.0, "split": "train"})
    monkeypatch.setenv("GPT2CHAT_FAULT", "enospc:write@1")
    with pytest.raises(OSError):
        plot_losses(log.path, png)
    assert png.read_bytes() == before
