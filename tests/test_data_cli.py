"""`gpt2chat data inspect|stats` on fixtures and on every real file; the shipped quickstart samples."""

from __future__ import annotations

import json

import pytest

from gpt2chat.cli import main
from gpt2chat.data import SAMPLE_PREF_SPEC, SAMPLE_SFT_SPEC, load_conversations, load_preferences
from gpt2chat.data.rows import resource_path
from gpt2chat.data.samples import write_samples


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_marks_trained_tokens_with_brackets_when_piped(capsys, tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello there"}]}) + "\n")
    code, out, _ = run(capsys, "data", "inspect", "--data", f"messages:{path}", "-n", "1")
    assert code == 0
    assert "[[Hello there<|eot_id|>]]" in out and "Hi<|eot_id|>" in out and "[[Hi" not in out
    code, out, _ = run(capsys, "data", "inspect", "--data", f"messages:{path}", "--color", "always")
    assert "\x1b[1;32mHello there<|eot_id|>" in out


def test_stats_and_strict_errors(capsys, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"instruction": "Hi", "output": "Hello"}\n{"instruction": "Hi", "output": 7}\n')
    code, out, _ = run(capsys, "data", "stats", "--data", f"alpaca:{path}", "--no-cache")
    assert code == 0
    assert "wrong type" in out and "line 2: field 'output'" in out and "carrying loss" in out and "p90" in out
    code, _, err = run(capsys, "data", "stats", "--data", f"alpaca:{path}", "--strict", "--no-cache")
    assert code == 2 and err.startswith("error: ") and "line 2: field 'output'" in err
    code, _, err = run(capsys, "data", "inspect", "--data", f"dolly:{path}")
    assert code == 2 and "unknown format 'dolly'" in err
    code, _, err = run(capsys, "data", "inspect", "--data", f"alpaca:{tmp_path / 'missing.json'}")
    assert code == 2 and "not found" in err


def test_samples_are_reproducible_and_load(tmp_path):
    sft, pref = write_samples(tmp_path)
    assert sft.read_bytes() == resource_path("quickstart_sft.jsonl").read_bytes()
    assert pref.read_bytes() == resource_path("quickstart_pref.jsonl").read_bytes()
    conversations, report = load_conversations(SAMPLE_SFT_SPEC, strict=True)
    assert report.rows == len(sft.read_text().splitlines()) == len(conversations) >= 200
    assert any(c.messages[0]["role"] == "system" for c in conversations)
    assert any(len(c.messages) >= 4 for c in conversations)
    pairs, _ = load_preferences(SAMPLE_PREF_SPEC, strict=True)
    assert len(pairs) >= 100 and all(p.chosen != p.rejected for p in pairs)


REAL = [  # (spec relative to shared/data, rows as documented in shared/README.md, kind)
    ("oasst1:oasst1/en-validation.jsonl", 2022, "sft"),
    ("alpaca:alpaca/alpaca-subset-5k.json", 5205, "sft"),
    ("guanaco:guanaco/eval.jsonl", 518, "sft"),
    ("ultrafeedback:ultrafeedback/train-1k.jsonl", 1000, "preference"),
    ("ultrafeedback:ultrafeedback/heldout-200.jsonl", 200, "preference"),
    ("sharegpt:sharegpt/dpo-en-demo.json", 300, "preference"),
]


def _real_spec(shared_dir, spec):
    fmt, _, rel = spec.partition(":")
    return f"{fmt}:{shared_dir / 'data' / rel}"


@pytest.mark.parametrize("spec,rows,kind", REAL, ids=[r[0].split(":")[0] + "-" + str(r[1]) for r in REAL])
def test_real_file_counts_and_inspect(capsys, shared_dir, spec, rows, kind):
    spec = _real_spec(shared_dir, spec)
    loader = load_preferences if kind == "preference" else load_conversations
    items, report = loader(spec)
    assert report.rows == rows
    assert report.kept == len(items) > 0.9 * (191 if spec.startswith("oasst1") else rows)
    code, out, _ = run(capsys, "data", "inspect", "--data", spec, "-n", "2")
    assert code == 0 and out.count("[[") >= 2 and f"{rows} rows read" in out
    assert ("=== pair 1" in out) == (kind == "preference")


QUICK = [r for r in REAL if "alpaca" not in r[0] and r[1] != 1000]  # the two big ones run in the slow pass


@pytest.mark.parametrize("spec,rows,kind", QUICK, ids=[r[0].split(":")[0] + "-" + str(r[1]) for r in QUICK])
def test_real_file_stats(capsys, shared_dir, tmp_path, spec, rows, kind):
    code, out, _ = run(capsys, "data", "stats", "--data", _real_spec(shared_dir, spec), "--cache-dir", str(tmp_path))
    assert code == 0
    assert f"kind: {kind}" in out and f"{rows} rows" in out and "carrying loss" in out


@pytest.mark.slow
@pytest.mark.parametrize("spec,rows,kind", [r for r in REAL if r not in QUICK])
def test_real_big_file_stats(capsys, shared_dir, tmp_path, spec, rows, kind):
    code, out, _ = run(capsys, "data", "stats", "--data", _real_spec(shared_dir, spec), "--cache-dir", str(tmp_path))
    assert code == 0 and f"kind: {kind}" in out and f"{rows} rows" in out


@pytest.mark.parametrize("kind, spec", [("sft", SAMPLE_SFT_SPEC), ("preference", SAMPLE_PREF_SPEC)])
def test_data_commands_take_sample_as_the_training_commands_do(capsys, kind, spec):
    """`--data sample` names the packaged sample on `data stats|inspect` too (it was refused there)."""
    flags = ["--kind", kind, "--json", "--no-cache"]
    code, by_name, err = run(capsys, "data", "stats", "--data", "sample", *flags)
    assert code == 0, err
    code, by_spec, _ = run(capsys, "data", "stats", "--data", spec, *flags)
    named, given = json.loads(by_name), json.loads(by_spec)
    assert code == 0 and named["kind"] == given["kind"] == kind
    assert named["train_examples"] == given["train_examples"] > 0 and named["tokens"] == given["tokens"]
    code, out, _ = run(capsys, "data", "inspect", "--data", "sample", "--kind", kind, "-n", "1")
    assert code == 0 and out.strip()
