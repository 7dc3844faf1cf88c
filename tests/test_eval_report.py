"""Report writing from a report dict, loss logs, and the bad-input checks made before any model loads."""

from __future__ import annotations

import json

import pytest

from gpt2chat.errors import Gpt2ChatError
from gpt2chat.evaluate import inputs
from gpt2chat.evaluate.report import human, read_loss_log, render_markdown, write_report
from gpt2chat.evaluate.report_card import evaluate_models


def _report() -> dict:
    ppl = {"assistant": {"ppl": 15.7, "tokens": 100}, "rendered": {"ppl": 20.1, "tokens": 150},
           "plain": {"ppl": 30.2, "tokens": 90}, "measured_on": "oasst1:x.jsonl: 3 conversations; cpu, float32"}
    entry = {"label": "sft", "path": "/x/sft", "template": "llama3-context", "parameters": 124_439_808,
             "flops": {"forward_per_token": 284_812_800, "training_per_token": 854_438_400, "context": 1024},
             "speed": {"prefill_tokens_per_s": 500.0, "prefill_tokens_per_s_range": [480.0, 510.0],
                       "decode_tokens_per_s": 90.2, "decode_tokens_per_s_range": [88.1, 91.0], "prefill_mfu": 0.2,
                       "decode_mbu": 0.5, "measured_on": "batch 1; cpu, float32, 2 threads"},
             "perplexity": ppl,
             "preference": {"mode": "reference-free", "accuracy": 0.5, "mean_margin": 0.1, "mean_chosen_reward": -1,
                            "mean_rejected_reward": -1.1, "pairs": 4, "measured_on": "ultrafeedback:y: 4 pairs"},
             "generation": {"bleu": 9.0, "reward_mean": 3.0, "penalty_mean": 1.0, "distinct_1": 0.5,
                            "distinct_2": 0.8, "mean_reply_words": 12.0, "replies": 2, "measured_on": "greedy"},
             "harness": [{"alias": "ARC (25-shot)", "metric": "acc_norm", "value": 0.213, "status": "ok"},
                         {"alias": "MMLU (5-shot)", "metric": "acc", "value": 0.275, "status": "ok"}],
             "harness_average": 0.244}
    return {"gpt2chat_version": "0.1.0", "seed": 0,
            "environment": {"device": "cpu", "device_name": "x86", "dtype": "float32", "threads": 2, "torch": "2"},
            "datasets": {"conversations": {"spec": "oasst1:x.jsonl", "summary": "oasst1:x.jsonl: 3 used",
                                           "overlap_statement": "checked by content hash: none of the 3"}},
            "warnings": [],
            "peaks": {"matmul_flops_per_s": 1e11, "read_bytes_per_s": 1e10, "matmul_size": 1024,
                      "read_bytes": 1 << 30, "dtype": "float32", "device": "cpu", "threads": 2, "repeats": 3,
                      "measurements": [{"matmul_flops_per_s": 9e10, "read_bytes_per_s": 1e10},
                                       {"matmul_flops_per_s": 1e11, "read_bytes_per_s": 8e9}]},
            "models": [entry, {**entry, "label": "orpo | v2"}],
            "side_by_side": {"measured_on": "3 prompts, greedy", "items": [
                {"prompt": "What's the best way to learn Python?", "replies": {"sft": "Practice.\nDaily.",
                                                                               "orpo | v2": "Read."}}]},
            "notes": ["a note"]}


def test_write_report_files_tables_and_plots(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5, "eval_loss": 2.7}\nnot json\n'
                   '{"step": 3, "loss": 2.6, "split": "val"}\n')
    orpo_log = tmp_path / "orpo.jsonl"
    orpo_log.write_text('{"step": 1, "loss": 1.0}\n')
    report = write_report({**_report(), "loss_curves": {"sft": str(log), "sft+orpo": str(orpo_log)}},
                          tmp_path / "out")
    out = tmp_path / "out"
    # labels read back from the figures: bars per model, curves per training stage
    assert report["plots"] == {"perplexity": {"file": "perplexity.png", "series": ["sft", "orpo | v2"]},
                               "loss curves": {"file": "loss_curves.png",
                                               "series": ["sft train", "sft eval", "sft+orpo train"]}}
    for name in ("perplexity.png", "loss_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text())["models"][0]["parameters"] == 124_439_808
    md = (out / "report.md").read_text()
    assert "| sft | 124M | 285M | 90.2 (88.1-91.0) | 15.700 |" in md  # seed 000's summary table, with the range
    assert "checked by content hash: none of the 3" in md and "Warning" not in md
    assert "start: 90GFLOP/s, 10GB/s, end: 100GFLOP/s, 8GB/s" in md and "read bandwidth 10GB/s" in md
    assert "orpo \\| v2" in md and "Practice.<br>Daily." in md  # cells escaped
    assert "oasst1:x.jsonl: 3 conversations; cpu, float32" in md  # measured-on lines
    assert "| sft | ARC (25-shot) | acc_norm | 21.30% |  |" in md and "| sft | average |  | 24.40% |  |" in md
    assert "Peaks measured on this machine" in md and "![perplexity](perplexity.png)" in md


def test_overlap_warning_sits_in_the_summary():
    report = {**_report(), "warnings": ["2 of 3 evaluation conversations (x) are training rows of sft"]}
    md = render_markdown(report)
    summary = md.split("## Perplexity")[0]
    assert "> **Warning:** 2 of 3 evaluation conversations (x) are training rows of sft" in summary


def test_read_loss_log_both_layouts(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "eval_loss": 2.7}\n{"step": 3, "loss": 2.6, "split": "val"}\n'
                   '{"loss": 9}\n')
    assert read_loss_log(log) == {"train": [(1, 3.0)], "eval": [(2, 2.7), (3, 2.6)]}


def test_human_numbers():
    assert human(124_439_808) == "124M" and human(None) == "—" and human(1.5e9) == "1.5G" and human(12) == "12"


def test_markdown_without_optional_sections():
    report = _report()
    for entry in report["models"]:
        for key in ("perplexity", "preference", "generation", "speed"):
            entry.pop(key)
    report["side_by_side"] = None
    md = render_markdown(report)
    assert "## Perplexity" not in md and "## Side-by-side" not in md and "## Size, compute and speed" in md


# ---------------------------------------------------------------- bad input, before any model loads


def _fake_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def test_missing_model_folder(tmp_path):
    with pytest.raises(Gpt2ChatError, match="checkpoint folder not found"):
        evaluate_models([str(tmp_path / "nope" / "final")], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Gpt2ChatError, match="no config.json"):
        evaluate_models([str(tmp_path / "empty")], tmp_path / "out")
    with pytest.raises(Gpt2ChatError, match="no model"):
        evaluate_models([], tmp_path / "out")


def test_missing_data_file_and_zero_usable_rows(tmp_path):
    model = str(_fake_checkpoint(tmp_path))
    with pytest.raises(Gpt2ChatError, match="file not found: .*missing.jsonl"):
        evaluate_models([model], tmp_path / "out", data=f"oasst1:{tmp_path / 'missing.jsonl'}", skip=("speed",))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": "not a list"}\n{"nothing": 1}\nnot json\n')
    with pytest.raises(Gpt2ChatError, match="no usable rows .*3 rows read, 0 kept"):
        evaluate_models([model], tmp_path / "out", data=f"messages:{bad}", skip=("speed", "pref"))
    with pytest.raises(Gpt2ChatError, match="pref.* file not found"):
        evaluate_models([model], tmp_path / "out", pref_data=f"ultrafeedback:{tmp_path / 'p.jsonl'}",
                        skip=("ppl", "gen", "speed"))


def test_default_data_missing_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "_shared_dirs", lambda: [tmp_path / "no-shared"])
    with pytest.raises(Gpt2ChatError, match="no held-out conversations.*--data"):
        inputs.held_out_conversations(None, None)
    pairs, info = inputs.held_out_pairs(None, None)
    assert pairs is None and "skipped" in info["summary"]


def test_bad_options_and_prompts(tmp_path):
    model = str(_fake_checkpoint(tmp_path))
    with pytest.raises(Gpt2ChatError, match="unknown section"):
        evaluate_models([model], tmp_path / "out", skip=("everything",))
    with pytest.raises(Gpt2ChatError, match="--prompts file not found"):
        inputs.side_by_side_prompts(str(tmp_path / "p.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(Gpt2ChatError, match="no prompt"):
        inputs.side_by_side_prompts(str(empty))
    listed = tmp_path / "p.json"
    listed.write_text('["Hi?", " "]')
    assert inputs.side_by_side_prompts(str(listed)) == ["Hi?"]
    assert inputs.side_by_side_prompts(None)[0] == "What's the best way to learn Python?"


def test_packaged_sample_specs_load():
    from gpt2chat.data import SAMPLE_PREF_SPEC, SAMPLE_SFT_SPEC

    conversations, info = inputs.held_out_conversations(SAMPLE_SFT_SPEC, 2)
    assert len(conversations) == 2 and info["used"] == 2 and info["kept"] >= 2
    pairs, info = inputs.held_out_pairs(SAMPLE_PREF_SPEC, 3)
    assert len(pairs) == 3 and info["spec"] == SAMPLE_PREF_SPEC


def test_cli_bad_input_is_one_line_error(tmp_path, capsys):
    from gpt2chat.cli import main

    assert main(["eval", "--model", str(tmp_path / "missing" / "final"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model") and "not found" in err and "Traceback" not in err
    model = str(_fake_checkpoint(tmp_path))
    assert main(["eval", "--model", model, "--data", f"oasst1:{tmp_path / 'nope.jsonl'}", "--skip", "speed",
                 "--out", str(tmp_path / "o")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_a_figure_over_its_bound_or_too_spread_reads_busy_machine_not_a_number():
    """The quickstart printed "prefill MFU 149.15%" and decode "40.9-920.6 tok/s" as results."""
    from gpt2chat.evaluate.speed import busy_machine_reasons

    report = _report()
    quiet = report["models"][0]
    busy_speed = {**quiet["speed"], "prefill_mfu": 1.4915, "decode_tokens_per_s": 300.0,
                  "decode_tokens_per_s_range": [40.9, 920.6]}
    busy_speed["busy_machine"] = busy_machine_reasons(busy_speed)
    assert busy_machine_reasons(quiet["speed"]) == {}
    assert set(busy_speed["busy_machine"]) == {"prefill_tokens_per_s", "prefill_mfu", "decode_tokens_per_s",
                                               "decode_mbu"}
    report["models"] = [quiet, {**quiet, "label": "loaded", "speed": busy_speed}]
    md = render_markdown(report)
    assert "149" not in md.split("## Size, compute and speed")[1].split("\n- ")[0]  # not in the table
    assert "40.9-920.6" not in md.split("## Summary")[1].split("\n- ")[0]
    assert "| loaded | 124M | 285M | 854M | busy machine (see below) | busy machine (see below) |" in md
    assert "prefill MFU 149% is over 100%" in md and "wider than the median 300.0" in md
    assert "500.0 (480.0-510.0) | 90.2 (88.1-91.0) | 20.00% | 50.00%" in md  # the quiet row is a result


def test_busy_machine_reasons_name_each_bound():
    from gpt2chat.evaluate.speed import busy_machine_reasons

    row = {"decode_tokens_per_s": 50.0, "decode_tokens_per_s_range": [45.0, 60.0], "decode_mbu": 1.25,
           "decode_mfu": 0.1, "prefill_tokens_per_s": 400.0, "prefill_tokens_per_s_range": [390.0, 410.0],
           "prefill_mfu": 0.99}
    reasons = busy_machine_reasons(row)
    assert set(reasons) == {"decode_tokens_per_s", "decode_mbu", "decode_mfu"}  # prefill at 99% is a result
    assert "decode MBU 125% is over 100% (50.0 tok/s above the 40.0 tok/s the measured read bandwidth allows)" \
        in reasons["decode_tokens_per_s"]
    wide = busy_machine_reasons({"prefill_tokens_per_s": 10.0, "prefill_tokens_per_s_range": [5.0, 15.1]})
    assert wide == {"prefill_tokens_per_s": "its repeats ranged 5.0-15.1 tok/s, wider than the median 10.0"}


def test_a_report_write_that_fails_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_report(_report(), out)
    before = {name: (out / name).read_bytes() for name in ("report.md", "report.json", "perplexity.png")}
    changed = _report()
    changed["models"][0]["label"] = "renamed"
    monkeypatch.setenv("GPT2CHAT_FAULT", "enospc:write@3")  # perplexity.png, report.json, then report.md
    with pytest.raises(OSError, match="No space left"):
        write_report(changed, out)
    assert (out / "report.md").read_bytes() == before["report.md"]  # the old one, not a torn new one
    assert "renamed" in (out / "report.json").read_text()  # the files before it were each replaced whole
    assert sorted(p.name for p in out.iterdir()) == ["perplexity.png", "report.json", "report.md"]  # no temp files
