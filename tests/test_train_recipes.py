"""Commands end to end on the tiny model and the packaged sample data: pipeline, vocab growth, resume
checks, and (slow) two gloo processes against one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2chat.cli import main
from gpt2chat.train.metrics_log import read_metrics

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = ["--batch-size", "2", "--max-length", "96", "--no-progress", "--lr", "3e-3", "--dropout", "0"]


def train_losses(folder: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(folder / "metrics.jsonl") if r["split"] == "train"]


def test_quickstart_pipeline_reduced(tmp_path, capsys):
    """The README command with fewer steps: SFT -> ORPO -> report card, loss going down."""
    out = tmp_path / "qs"
    code = main(["pipeline", "--config", str(CONFIGS / "quickstart.toml"), "--out", str(out),
                 "--set", "sft.max_steps=8", "--set", "sft.warmup_steps=2", "--set", "orpo.max_steps=2",
                 "--set", "batch_size=4", "--set", "max_length=128", "--set", "progress=false",
                 "--set", "sft.eval_every=4", "--set", "orpo.eval_every=0",
                 "--set", "eval.max_rows=4", "--set", "eval.gen_rows=1", "--set", "eval.max_new_tokens=4",
                 "--set", 'eval.skip=["speed", "side"]'])
    assert code == 0
    losses = train_losses(out / "sft")
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5
    assert (out / "sft" / "final" / "model.safetensors").is_file()
    assert (out / "sft" / "loss.png").is_file()
    orpo = read_metrics(out / "orpo" / "metrics.jsonl")
    assert [r["step"] for r in orpo if r["split"] == "train"] == [1, 2]
    assert "log_odds_ratio" in orpo[0] and "nll_loss" in orpo[0]
    assert (out / "orpo" / "final" / "config.json").is_file()
    assert (out / "eval").is_dir() and any((out / "eval").iterdir())
    printed = capsys.readouterr().out
    assert "[pipeline] orpo:" in printed

    # --resume skips finished stages
    code = main(["pipeline", "--config", str(CONFIGS / "quickstart.toml"), "--out", str(out), "--resume",
                 "--set", "sft.max_steps=8", "--set", "sft.warmup_steps=2", "--set", "orpo.max_steps=2",
                 "--set", "batch_size=4", "--set", "max_length=128", "--set", "progress=false",
                 "--set", "sft.eval_every=4", "--set", "orpo.eval_every=0",
                 "--set", "eval.max_rows=4", "--set", "eval.gen_rows=1", "--set", "eval.max_new_tokens=4",
                 "--set", 'eval.skip=["speed", "side", "gen", "pref"]'])
    assert code == 0
    assert "sft: already done" in capsys.readouterr().out


def test_template_tokens_are_added_and_the_embedding_resized(tmp_path, capsys):
    from gpt2chat.checkpoint import init_checkpoint, load_model

    base = init_checkpoint("tiny", tmp_path / "plain-base", template="plain", seed=0)
    model, tokenizer = load_model(base, device="cpu")
    before = model.config.vocab_size
    code = main(["sft", "--model", str(base), "--template", "llama3-context", "--data", "sample",
                 "--out", str(tmp_path / "run"), "--max-steps", "1", *SMALL])
    assert code == 0
    printed = capsys.readouterr().out
    assert "resized the embedding" in printed
    trained, trained_tokenizer = load_model(tmp_path / "run" / "final", device="cpu")
    assert trained.config.vocab_size > before
    assert trained_tokenizer.token_to_id("<|start_context|>") is not None


def test_resume_with_another_config_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["sft", "--model", "init:tiny", "--data", "sample", "--out", str(out), "--max-steps", "2", *SMALL]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--resume", "--lr", "1e-2"]) == 2
    err = capsys.readouterr().err
    assert "another run" in err and "lr" in err
    assert main(["sft", "--data", "sample", "--out", str(tmp_path / "empty"), "--resume", *SMALL]) == 2
    assert "no checkpoint found" in capsys.readouterr().err


def test_max_length_past_the_model_context_fails_before_any_data_work(tmp_path, capsys):
    """The seed-004 recipe (max_length 512) on a 256-token model: the error names the flag to change, and comes
    before the (missing) data file is read."""
    missing = tmp_path / "not-there.jsonl"
    code = main(["sft", "--config", str(CONFIGS / "neo-lora-guanaco.toml"), "--model", "init:tiny-neo",
                 "--data", f"guanaco:{missing}", "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "max_length 512" in err and "256 tokens" in err and "--max-length 256" in err
    assert "not-there" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def same_weights(folder_a: Path, folder_b: Path, names: tuple[str, ...] = ("model.safetensors",)) -> None:
    import torch
    from safetensors.torch import load_file

    for name in names:
        a, b = load_file(folder_a / name), load_file(folder_b / name)
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)


def test_resume_continues_an_interrupted_run_exactly(tmp_path):
    """Stopped after 2 of 4 steps and resumed: the same losses and the same final weights as one run (dropout
    on, so the RNG state must come back too, and a cosine schedule, so the step must)."""
    common = ["--model", "init:tiny", "--data", "sample", "--max-steps", "4", "--save-every", "2",
              "--schedule", "cosine", "--warmup-steps", "1", *SMALL, "--dropout", "0.1"]
    assert main(["sft", *common, "--out", str(tmp_path / "full")]) == 0
    assert main(["sft", *common, "--out", str(tmp_path / "part"), "--stop-after-steps", "2"]) == 0
    assert not (tmp_path / "part" / "final").exists()
    assert main(["sft", *common, "--out", str(tmp_path / "part"), "--resume"]) == 0
    full, resumed = train_losses(tmp_path / "full"), train_losses(tmp_path / "part")
    assert len(full) == len(resumed) == 4
    assert resumed == pytest.approx(full, abs=1e-6)
    same_weights(tmp_path / "full" / "final", tmp_path / "part" / "final")


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = ["--model", "init:tiny", "--data", "sample", "--max-steps", "3", "--no-progress",
              "--max-length", "96", "--lr", "3e-3", "--dropout", "0", "--seed", "3"]
    single = subprocess.run([sys.executable, "-m", "gpt2chat", "sft", *common, "--batch-size", "4",
                             "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", "29517", "-m", "gpt2chat", "sft", *common, "--batch-size", "2",
                             "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                            timeout=900)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "2 process(es)" in double.stdout
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, abs=1e-5)
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-0000003" / "trainer_state.json").read_text())
    assert state["world_size"] == 2



@pytest.mark.slow
def test_fsdp_on_two_gloo_processes_equals_one_process_saves_a_loadable_model_and_resumes(tmp_path):
    """FSDP2 shards each block and the root (tied head included); gradients, checkpoints and resume must be
    those of one process with the same global batch."""
    import torch

    from gpt2chat.checkpoint import load_model

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = ["--model", "init:tiny", "--data", "sample", "--max-steps", "3", "--no-progress",
              "--max-length", "96", "--lr", "3e-3", "--dropout", "0", "--seed", "3", "--save-every", "2"]

    def fsdp(out: str, *extra: str) -> None:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               "--master-port", "29523", "-m", "gpt2chat", "sft", *common, "--batch-size", "2",
                               "--distributed", "fsdp", "--out", str(tmp_path / out), *extra],
                              env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]

    single = subprocess.run([sys.executable, "-m", "gpt2chat", "sft", *common, "--batch-size", "4",
                             "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-2000:]
    fsdp("two")
    one = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if r["split"] == "train"]
    two = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if r["split"] == "train"]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    # Adam hides a wrongly scaled gradient from the losses; the norm shows it (FSDP averages over processes).
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=1e-4)
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-0000003" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["config"]["distributed"] == "fsdp"

    reference, _ = load_model(tmp_path / "one" / "final", device="cpu")
    trained, _ = load_model(tmp_path / "two" / "final", device="cpu")
    assert trained.lm_head.weight is trained.transformer.wte.weight
    expected, got = reference.state_dict(), trained.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in got.items():
        assert torch.isfinite(tensor).all(), name
        torch.testing.assert_close(tensor, expected[name], atol=1e-4, rtol=0, msg=name)

    fsdp("part", "--stop-after-steps", "2")
    assert not (tmp_path / "part" / "final").exists()
    fsdp("part", "--resume")
    assert train_losses(tmp_path / "part") == pytest.approx([r["loss"] for r in two], abs=1e-6)
    resumed, _ = load_model(tmp_path / "part" / "final", device="cpu")
    for name, tensor in resumed.state_dict().items():     # equal only if the optimizer state came back too
        torch.testing.assert_close(tensor, got[name], atol=1e-6, rtol=0, msg=name)

def test_lora_run_saves_a_peft_adapter_and_a_merged_model_and_resumes(tmp_path, capsys):
    from gpt2chat.checkpoint import load_model

    common = ["--model", "init:tiny", "--data", "sample", "--max-steps", "3", "--save-every", "1",
              "--lora-r", "4", "--lora-alpha", "8", *SMALL]
    out = tmp_path / "lora"
    assert main(["sft", *common, "--out", str(out), "--stop-after-steps", "2"]) == 0
    assert main(["sft", *common, "--out", str(out), "--resume"]) == 0
    capsys.readouterr()
    assert main(["sft", *common, "--out", str(tmp_path / "whole")]) == 0
    out_text = capsys.readouterr().out  # the run names both folders: the merged model and the adapter
    assert f"model: {tmp_path / 'whole' / 'final'}" in out_text
    assert f"LoRA adapter (PEFT layout, for --adapter): {tmp_path / 'whole' / 'adapter'}" in out_text
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    model, _ = load_model(out / "final", device="cpu")
    assert not any("lora" in name for name, _ in model.named_parameters())
    # the resumed adapter (and the model merged from it) are those of the uninterrupted run
    same_weights(tmp_path / "whole" / "adapter", out / "adapter", ("adapter_model.safetensors",))
    same_weights(tmp_path / "whole" / "final", out / "final")


def test_no_command_on_a_tiny_model_needs_max_length_and_one_validation_fraction_serves_all():
    """The default max_length is 512 or the model's context when shorter (the config keeps None, so a resumed
    run matches its checkpoint); `gpt2chat data stats` holds out the share training does."""
    from gpt2chat.cli import build_parser
    from gpt2chat.data.mixing import build_sft_examples
    from gpt2chat.train.config import TrainConfig, effective_max_length

    cfg = TrainConfig(data=["sample"]).validate()
    assert cfg.max_length is None
    assert effective_max_length(cfg, 256) == 256 and effective_max_length(cfg, 1024) == 512
    assert effective_max_length(TrainConfig(data=["sample"], max_length=100).validate(), 256) == 100
    stats_args = build_parser().parse_args(["data", "stats", "--data", "sample"])
    assert stats_args.val_fraction == cfg.val_fraction
    import inspect
    assert inspect.signature(build_sft_examples).parameters["val_fraction"].default == cfg.val_fraction


@pytest.mark.parametrize("command", ["sft", "orpo"])
def test_a_tiny_model_trains_without_max_length(command, tmp_path):
    out = tmp_path / command
    code = main([command, "--model", "init:tiny", "--data", "sample", "--max-steps", "1", "--batch-size", "2",
                 "--no-progress", "--out", str(out)])
    assert code == 0 and (out / "final" / "config.json").is_file()


def test_validation_lines_print_above_the_progress_bar_not_into_it(tmp_path, monkeypatch):
    """Issue 26: the bar and the validation lines share a terminal; each validation line starts a line of its own
    (the bar is cleared first), so it is never glued to the end of a half-drawn bar."""
    import io

    screen = io.StringIO()  # what a terminal shows: stdout and stderr interleaved
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    args = ["sft", "--model", "init:tiny", "--data", "sample", "--max-steps", "3", "--eval-every", "1",
            "--batch-size", "2", "--max-length", "96", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    lines = [line for line in screen.getvalue().split("\n") if "validation:" in line]
    assert len(lines) >= 2 and "%|" in screen.getvalue()  # the bar was drawn and validation ran mid-run
    for line in lines:
        assert line.rsplit("\r", 1)[-1].startswith("[sft] step "), repr(line[-200:])


def test_a_new_run_into_a_folder_with_checkpoints_says_so_and_keeps_them(tmp_path, capsys):
    run = ["sft", "--model", "init:tiny", "--data", "sample", "--max-steps", "1", "--out", str(tmp_path), *SMALL]
    assert main(run) == 0
    assert "already holds" not in capsys.readouterr().out
    assert main(run) == 0
    said = capsys.readouterr().out
    assert f"{tmp_path} already holds 1 checkpoint(s) of an earlier run (newest step-0000001)" in said
    assert "pass --resume to continue" in said
