"""A training step waits for the device once, for its log line, and a non-finite step changes nothing.

On a GPU every read of a device value (`.item()`, `.tolist()`, `float(t)`, `if t:`, boolean indexing) stalls
the host until the queue drains. CPU has no queue, so these tests catch the reads themselves: every such
call made from gpt2chat's code during the device part of a step (after the host has built the batches)
is recorded, and only the one read-back of the step's numbers may remain.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gpt2chat.train.objectives import DPOObjective, ORPOObjective, SFTObjective
from gpt2chat.train.trainer import TrainingDivergedError, seed_for_step
from train_support import make_trainer, pref_examples, sft_examples

PACKAGE = str(Path(__import__("gpt2chat").__file__).parent)
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "nonzero")


@pytest.fixture
def device_reads(monkeypatch):
    """Records (file, line, what) of each device read called from gpt2chat code while `recording[0]` is on."""
    reads: list[tuple[str, int, str]] = []
    recording = [False]

    def watch(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1)
            if recording[0] and caller.f_code.co_filename.startswith(PACKAGE):
                reads.append((Path(caller.f_code.co_filename).name, caller.f_lineno, name))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in READS:
        watch(name)
    original_getitem = torch.Tensor.__getitem__

    def getitem(self, index):
        caller = sys._getframe(1)
        masks = index if isinstance(index, tuple) else (index,)
        if recording[0] and caller.f_code.co_filename.startswith(PACKAGE) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in masks):
            reads.append((Path(caller.f_code.co_filename).name, caller.f_lineno, "boolean index"))
        return original_getitem(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)
    return reads, recording


@pytest.mark.parametrize("kind", ["sft", "dpo", "orpo"])
def test_a_training_step_reads_the_device_once(tmp_path, device_reads, kind):
    reads, recording = device_reads
    if kind == "sft":
        trainer = make_trainer(tmp_path, sft_examples(32), max_steps=3, grad_accum=2, batch_size=2, pack=True)
    else:
        objective = DPOObjective(beta=0.1) if kind == "dpo" else ORPOObjective(beta=0.1)
        trainer = make_trainer(tmp_path, pref_examples(32), kind="preference", objective=objective, name=kind,
                               max_steps=3, grad_accum=2, batch_size=2)
    plan = trainer.train_plan
    build_batches = plan.micro_batches

    def batches_then_record(*args):
        built = build_batches(*args)             # host work: reads of host tensors are fine here
        recording[0] = True
        return built

    plan.micro_batches = batches_then_record
    original_step = trainer._train_step

    def step(*args):
        record = original_step(*args)
        recording[0] = False
        return record

    trainer._train_step = step
    trainer.cfg.save_every = 0
    trainer._save = lambda *args, **kwargs: None
    trainer.fit()
    per_step = [r for r in reads if r[2] != "tolist" or r[0] != "trainer.py"]
    assert per_step == [], f"device reads inside a training step: {per_step}"
    assert len([r for r in reads if r[0] == "trainer.py"]) == 3     # one read-back per step, for the log


def test_a_non_finite_step_changes_no_weight(tmp_path):
    poisoned_seed = seed_for_step(0, 2, 0)           # the third step
    snapshot: dict[str, torch.Tensor] = {}

    class Poisoned(SFTObjective):
        def micro_loss(self, model, batch, totals, split="train"):
            loss, metrics = super().micro_loss(model, batch, totals, split)
            if torch.initial_seed() == poisoned_seed:
                snapshot.update({n: p.detach().clone() for n, p in model.named_parameters()})
                loss = loss * float("nan")
            return loss, metrics

    trainer = make_trainer(tmp_path, sft_examples(32), objective=Poisoned(), max_steps=5, save_every=0)
    with pytest.raises(TrainingDivergedError, match="loss became nan at step 3"):
        trainer.fit()
    assert snapshot
    for name, param in trainer.raw_model.named_parameters():
        assert torch.equal(param.detach(), snapshot[name]), f"{name} changed in the skipped step"
