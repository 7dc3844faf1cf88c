"""Issue #14: faults injected inside checkpoint writes (gpt2chat.faults): SIGKILL, then --resume; a full disk.

A training run on the tiny model and the packaged sample data is killed (SIGKILL, in a subprocess) halfway
through writing a checkpoint; `--resume` must continue from the last complete checkpoint, never from the
half-written one nor from a partial folder, and reproduce the uninterrupted run's losses. A full disk
(injected ENOSPC, and a real one: a small tmpfs, when the tests may mount one) must stop the run with one
clear message and leave the previous checkpoint whole.
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

from gpt2chat import faults
from gpt2chat.atomic_files import write_text_atomic
from gpt2chat.cli import main
from gpt2chat.train import training_state
from gpt2chat.train.metrics_log import read_metrics

RUN = ["sft", "--model", "init:tiny", "--data", "sample", "--max-steps", "3", "--save-every", "1",
       "--keep-last", "3", "--batch-size", "2", "--max-length", "96", "--no-progress", "--lr", "3e-3",
       "--dropout", "0.1", "--schedule", "cosine"]


@pytest.fixture(autouse=True)
def fresh_faults(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.reset()
    yield
    faults.reset()


def run_with_fault(fault: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`gpt2chat ARGV` in a subprocess with the fault rule `fault` (a kill or a SIGINT must hit a real process)."""
    env = {**os.environ, faults.ENV: fault, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gpt2chat", *argv], env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=as_in_a_terminal)


def as_in_a_terminal() -> None:
    """The child starts with SIGINT's default action, as a command typed in a terminal does. A test run
    started in the background of a non-interactive shell (`pytest &`, a CI script) inherits SIGINT ignored,
    and Python then installs no KeyboardInterrupt handler: the injected Ctrl-C would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def train_losses(out) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]


def test_fault_points_do_nothing_unset_and_fire_exactly_at_the_nth_arrival(monkeypatch):
    for _ in range(3):
        faults.fault_point("checkpoint")  # unset: nothing
    monkeypatch.setenv(faults.ENV, "enospc:checkpoint@2")
    faults.fault_point("write")  # another point: not counted for this rule
    faults.fault_point("checkpoint")
    with pytest.raises(OSError) as caught:
        faults.fault_point("checkpoint")
    assert caught.value.errno == errno.ENOSPC and "injected" in str(caught.value)
    faults.fault_point("checkpoint")  # only the 2nd
    monkeypatch.setenv(faults.ENV, "explode:checkpoint@1")
    with pytest.raises(ValueError, match="ACTION:POINT@N"):
        faults.fault_point("checkpoint")


def test_a_full_disk_while_writing_a_file_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "config.json"
    write_text_atomic(target, "old")
    monkeypatch.setenv(faults.ENV, "enospc:write@1")
    with pytest.raises(OSError):
        write_text_atomic(target, "new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]


def test_sigkill_inside_a_checkpoint_write_then_resume_reproduces_the_uninterrupted_losses(tmp_path, capsys):
    assert main([*RUN, "--out", str(tmp_path / "full")]) == 0
    full = train_losses(tmp_path / "full")

    out = tmp_path / "killed"
    killed = run_with_fault("kill:checkpoint@2", [*RUN, "--out", str(out)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    root = training_state.checkpoints_root(out)
    staged = [p for p in root.iterdir() if p.name.startswith(".step-0000002")]
    assert staged and (staged[0] / "model.safetensors").is_file()  # the kill came halfway through step 2's write
    assert [p.name for p in training_state.list_checkpoints(out)] == ["step-0000001"]
    # A folder with a checkpoint's name but no trainer state (copied by hand, half-synced...) is never picked.
    shutil.copytree(root / "step-0000001", root / "step-0000009")
    (root / "step-0000009" / training_state.STATE_TENSORS).unlink()
    assert training_state.resolve_resume("last", out) == root / "step-0000001"

    assert main([*RUN, "--out", str(out), "--resume"]) == 0
    assert train_losses(out) == pytest.approx(full, abs=1e-6)
    assert len(full) == 3
    assert not list(root.glob(".step-*.tmp"))  # the killed write's staging folder is cleaned up
    assert (out / "final" / "model.safetensors").is_file()


def test_a_full_disk_while_saving_stops_clearly_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "full-disk"
    monkeypatch.setenv(faults.ENV, "enospc:checkpoint@2")
    assert main([*RUN, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    first = training_state.checkpoints_root(out) / "step-0000001"
    assert err.startswith("error: could not write ") and "step-0000002" in err and "No space left on device" in err
    assert f"the last complete checkpoint {first} is intact" in err and "Traceback" not in err
    assert [p.name for p in training_state.list_checkpoints(out)] == ["step-0000001"]
    assert not list(first.parent.glob(".step-*"))  # nothing half-written left behind
    state, tensors = training_state.read_checkpoint(first)
    assert state["step"] == 1 and "optimizer" in tensors
    monkeypatch.delenv(faults.ENV)
    assert main([*RUN, "--out", str(out), "--resume"]) == 0  # and the run continues from it
    assert len(train_losses(out)) == 3


@pytest.mark.slow
def test_a_failed_checkpoint_write_on_rank_0_stops_every_process_of_a_distributed_run(tmp_path):
    """Two gloo processes (torchrun); only rank 0 writes checkpoints, and its first write finds the disk full.
    Every process stops with its own message. Before, rank 1 knew nothing: torchrun's agent SIGTERMed it when
    rank 0 exited, and a launcher that does not would have left it waiting at the next collective."""
    env = {**os.environ, faults.ENV: "enospc:checkpoint@1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = [*RUN[:RUN.index("--batch-size")], "--batch-size", "1", *RUN[RUN.index("--batch-size") + 2:]]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29531", "-m", "gpt2chat", *run, "--out", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert "error: could not write " in done.stderr and "No space left on device" in done.stderr, done.stderr[-3000:]
    assert "process 1: stopping because another process failed" in done.stderr, done.stderr[-3000:]
    assert not training_state.list_checkpoints(tmp_path / "run")


def folder_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_a_real_full_disk_while_saving_stops_clearly_then_resumes_to_the_same_losses(tmp_path, capsys, tmpfs):
    """The kernel's own ENOSPC, on a tmpfs with room for the run up to its first checkpoint and half of the
    second: torch's and safetensors' writers raise their own errors there, not OSError(ENOSPC)."""
    assert main([*RUN, "--out", str(tmp_path / "full")]) == 0
    full = train_losses(tmp_path / "full")
    step = folder_bytes(training_state.checkpoints_root(tmp_path / "full") / "step-0000001")
    room = folder_bytes(tmp_path / "full" / "init") + step + step // 2 + (1 << 20)  # + metrics, split, plot
    disk = tmpfs(room)
    out = disk.path / "run"
    capsys.readouterr()
    assert main([*RUN, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    first = training_state.checkpoints_root(out) / "step-0000001"
    assert err.startswith("error: could not write ") and "step-0000002" in err, err
    assert "No space left on device" in err and "the disk is full" in err and "Traceback" not in err
    assert f"the last complete checkpoint {first} is intact" in err
    assert [p.name for p in training_state.list_checkpoints(out)] == ["step-0000001"]
    assert not list(first.parent.glob(".step-*"))  # nothing half-written left behind
    disk.resize(room + 4 * step)  # space freed: the run continues from step 1
    assert main([*RUN, "--out", str(out), "--resume"]) == 0
    assert train_losses(out) == pytest.approx(full, abs=1e-6)


def file_writes_of_a_run(out) -> int:
    """How many atomic file writes one uninterrupted run makes (each a `write` fault point)."""
    return sum(1 for p in out.rglob("*") if p.is_file() and p.name not in ("metrics.jsonl", "loss.png")
               and p.suffix != ".pt" and p.name != training_state.STATE_JSON)


def model_file_writes_of_a_run(out) -> int:
    """The atomic file writes of RUN's models: the init folder's, then those of each of its 3 checkpoints and
    of the final folder (each the same files); the last one is inside final/."""
    return file_writes_of_a_run(out / "init") + 4 * file_writes_of_a_run(out / "final")


def test_a_kill_while_the_final_model_is_written_leaves_no_partial_final_folder(tmp_path):
    """SIGKILL at the last file write of a run (inside final/): no final/ under its name, so the pipeline
    never takes a half-written one as done, and the rerun writes it whole with the same losses."""
    assert main([*RUN, "--out", str(tmp_path / "full")]) == 0
    full = train_losses(tmp_path / "full")
    out = tmp_path / "killed"
    writes = model_file_writes_of_a_run(tmp_path / "full")
    killed = run_with_fault(f"kill:write@{writes}", [*RUN, "--out", str(out)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "final").exists() and list(out.glob(".final.*.tmp"))  # only a hidden staging folder
    assert [p.name for p in training_state.list_checkpoints(out)][-1] == "step-0000003"
    assert main([*RUN, "--out", str(out), "--resume"]) == 0
    assert train_losses(out) == pytest.approx(full, abs=1e-6)
    assert (out / "final" / "config.json").is_file() and (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 60 s per kill under load
def test_sigkill_at_file_writes_all_through_a_run_always_resumes_to_the_same_losses(tmp_path):
    """SIGKILL at the N-th atomic file write (init model, checkpoints, final model), N spread over the whole run
    (every GPT2CHAT_KILL_STRIDE-th, default 5), then the run again (--resume when a checkpoint exists): the
    same losses as one uninterrupted run, a loadable final model, nothing half-written under a real name."""
    from gpt2chat.checkpoint import load_model

    run = [*RUN[:RUN.index("--keep-last")], "--keep-last", "1", *RUN[RUN.index("--keep-last") + 2:]]
    assert main([*run, "--out", str(tmp_path / "full")]) == 0
    full = train_losses(tmp_path / "full")
    writes = model_file_writes_of_a_run(tmp_path / "full")
    survived = 0
    for nth in range(1, writes + 1, int(os.environ.get("GPT2CHAT_KILL_STRIDE", "5"))):
        out = tmp_path / f"kill-{nth}"
        killed = run_with_fault(f"kill:write@{nth}", [*run, "--out", str(out)])
        assert killed.returncode == -signal.SIGKILL, (nth, killed.stderr[-2000:])
        again = [*run, "--out", str(out)] + (["--resume"] if training_state.list_checkpoints(out) else [])
        assert main(again) == 0, nth
        assert train_losses(out) == pytest.approx(full, abs=1e-6), nth
        load_model(out / "final", device="cpu")
        # a killed writer's temporary file stays, but only under a hidden name no loader reads
        assert all(p.name.startswith(".") for p in out.rglob("*.tmp")), nth
        assert not list(training_state.checkpoints_root(out).glob(".step-*")), nth
        survived += 1
    print(f"survived {survived} SIGKILLs at file writes 1..{writes} (stride {os.environ.get('GPT2CHAT_KILL_STRIDE', '5')})")
    assert survived >= 3


def test_ctrl_c_inside_a_checkpoint_write_names_the_intact_checkpoint_and_a_resume_command_that_works(tmp_path):
    """Issue 26: Ctrl-C (a real SIGINT, in the 2nd checkpoint's write) says which checkpoint is intact and
    prints the command that goes on; that command reproduces the uninterrupted losses."""
    assert main([*RUN, "--out", str(tmp_path / "full")]) == 0
    full = train_losses(tmp_path / "full")
    out = tmp_path / "interrupted"
    run = run_with_fault("sigint:checkpoint@2", [*RUN, "--out", str(out)])
    assert run.returncode == 130, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    step1 = training_state.checkpoints_root(out) / "step-0000001"
    assert f"interrupted: [sft] step 2 of 3; the last complete checkpoint {step1} is intact" in run.stderr
    assert [p.name for p in training_state.list_checkpoints(out)] == ["step-0000001"]
    command = shlex.split(run.stderr.split("continue with: ", 1)[1].splitlines()[0])
    assert command[:2] == ["gpt2chat", "sft"] and command[-1] == "--resume"
    assert main(command[1:]) == 0
    assert train_losses(out) == pytest.approx(full, abs=1e-6)


def test_ctrl_c_before_any_checkpoint_says_there_is_nothing_to_resume(tmp_path):
    out = tmp_path / "interrupted"
    run = run_with_fault("sigint:checkpoint@1", [*RUN, "--out", str(out)])
    assert run.returncode == 130, run.stderr[-2000:]
    assert "step 1 of 3; no checkpoint was written before it" in run.stderr
    again = run.stderr.split("nothing to resume from; start again with: ", 1)[1].splitlines()[0]
    assert "--resume" not in again and shlex.split(again)[1:] == [*RUN, "--out", str(out)]
