"""`python -m benchmarks.gpu_check` on CPU (`--smoke`): the table and JSON lines it writes, and its guards.

The check itself is meant for a CUDA device; `--smoke` runs the same code on CPU with the tiny shape, so
that what the GPU run will execute has run here first. The default run covers the parts that fit in a
minute; the slow test runs every part (training stages, the served request, TRL).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAST_PARTS = ("env", "peak", "parity", "losses", "speed-sft", "decode", "roundtrip", "generate")


def run_smoke(out: Path, parts: tuple[str, ...] | None = None) -> tuple[subprocess.CompletedProcess, list[dict], str]:
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(out), "--budget-s", "1200"]
    if parts:
        command += ["--parts", ",".join(parts)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1500, cwd=REPO)
    rows = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    return done, rows, (out / "gpu_check.md").read_text()


def check_table(rows: list[dict], table: str, parts: tuple[str, ...]) -> None:
    lines = table.strip().splitlines()
    assert lines[0] == "| part | check | status | result | target | detail |"
    assert len(lines) == 2 + len(rows)                       # header, rule, one line per JSON row
    for line, r in zip(lines[2:], rows, strict=True):
        assert line.startswith(f"| {r['part']} | {r['check']} | {r['status']} |")
        assert isinstance(r["seconds"], float) and isinstance(r["data"], dict)
    failed = [(r["part"], r["check"], r["detail"]) for r in rows if r["status"] != "ok"]
    assert not failed, failed
    seen = {r["part"] for r in rows}
    # the speed rows of a part are "speed" rows
    assert seen >= {p if not p.startswith("speed") else "speed" for p in parts}


def test_smoke_writes_the_table_and_json_lines(tmp_path):
    done, rows, table = run_smoke(tmp_path, FAST_PARTS)
    assert done.returncode == 0, done.stderr[-3000:]
    check_table(rows, table, FAST_PARTS)
    checks = {r["check"]: r for r in rows}
    assert checks["logits float32 vs transformers"]["data"]["max_abs_diff"] < 1e-3
    assert checks["greedy tokens float32 (Engine vs generate)"]["data"]["agree"] == 1.0
    assert checks["saved vocabulary = tokenizer (not padded)"]["status"] == "ok"
    sft = next(r for r in rows if r["check"].startswith("SFT tiny, ours"))
    assert sft["data"]["tokens_per_s"] > 0 and sft["data"]["mfu"] > 0
    assert table.strip() in done.stdout        # printed at the end too


@pytest.mark.slow
def test_smoke_runs_every_part(tmp_path):
    done, rows, table = run_smoke(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    parts = ("env", "peak", "parity", "losses", "speed-sft", "decode", "training", "roundtrip", "generate",
             "serve", "speed-dpo", "speed-trl")
    check_table(rows, table, parts)
    checks = [r["check"] for r in rows]
    for expected in ("SFT: 4 steps, tiny", "DPO: 4 steps, tiny", "ORPO: 4 steps, tiny", "LoRA SFT: 4 steps, tiny",
                     "POST /v1/chat/completions to `gpt2chat serve`", "SFT tiny, TRL packed", "DPO tiny, TRL"):
        assert expected in checks


@pytest.fixture
def gpu_check():
    from benchmarks import gpu_check

    return gpu_check


def test_a_failing_part_is_a_row_and_the_next_part_still_runs(tmp_path, gpu_check, monkeypatch):
    import time

    def broken(check):
        raise RuntimeError("kernel exploded")

    def needs_a_wheel(check):
        gpu_check.need("surely_not_a_module_xyz")

    def slow(check):
        time.sleep(5)
        return []

    def fine(check):
        return [gpu_check.row("fine", "it ran", gpu_check.OK, "42")]

    monkeypatch.setattr(gpu_check, "parts", lambda: [("broken", 30, broken), ("wheel", 30, needs_a_wheel),
                                                     ("slow", 1, slow), ("fine", 30, fine)])
    code = gpu_check.main(["--smoke", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert [(r["part"], r["status"]) for r in rows] == [
        ("broken", "FAIL"), ("wheel", "not installed"), ("slow", "timeout"), ("fine", "ok")]
    assert "RuntimeError: kernel exploded" in rows[0]["detail"] and "test_gpu_check.py" in rows[0]["detail"]
    assert "surely_not_a_module_xyz" in rows[1]["detail"]
    assert code == 1                                          # a failed or timed-out part fails the run


def test_without_cuda_the_full_check_says_to_use_smoke(gpu_check, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu_check.main([]) == 2
    assert "--smoke" in capsys.readouterr().err
