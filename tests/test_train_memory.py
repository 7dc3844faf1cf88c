"""Training's memory options change memory only: the optimizer step inside the backward (`step_in_backward`)
gives the plain step's parameters to the bit, frees each gradient as it is applied, resumes across the switch,
refuses what it cannot do exactly; and loaded weights are the process's own memory, not the file's pages."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from gpt2chat.train import training_state
from gpt2chat.train.config import ConfigError, build_config
from gpt2chat.train.distributed import DistState
from gpt2chat.train.objectives import DPOObjective, ORPOObjective, SFTObjective
from gpt2chat.train.recipes import set_dropout
from gpt2chat.train.step_in_backward import StepInBackward
from gpt2chat.train.trainer import Trainer, TrainingDivergedError, seed_for_step
from train_support import make_trainer, pref_examples, sft_examples, tiny_model


def _objective(kind: str):
    return {"sft": SFTObjective, "dpo": lambda: DPOObjective(beta=0.1), "orpo": lambda: ORPOObjective(beta=0.1)}[kind]()


def _run(tmp: Path, kind: str, model, **overrides):
    examples = sft_examples(48) if kind == "sft" else pref_examples(48)
    trainer = make_trainer(tmp, examples, kind="sft" if kind == "sft" else "preference", objective=_objective(kind),
                           model=model, name=kind, max_grad_norm=0.0, max_steps=5, weight_decay=0.1, **overrides)
    return trainer, trainer.fit()


@pytest.mark.parametrize("kind", ["sft", "dpo", "orpo"])
def test_step_in_backward_gives_the_plain_steps_parameters_to_the_bit(tmp_path, kind):
    start = tiny_model()
    plain_model, hooked_model = copy.deepcopy(start), copy.deepcopy(start)
    _, plain = _run(tmp_path / "plain", kind, plain_model)
    _, hooked = _run(tmp_path / "hooked", kind, hooked_model, step_in_backward=True)
    for (name, a), b in zip(plain_model.named_parameters(), hooked_model.parameters(), strict=True):
        assert not torch.equal(a, start.get_parameter(name)), name        # it did train
        assert torch.equal(a, b), name
    assert [r["loss"] for r in plain.history] == [r["loss"] for r in hooked.history]
    for a, b in zip(plain.history, hooked.history, strict=True):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert all(p.grad is None for p in hooked_model.parameters())


@pytest.mark.parametrize("kind, dropout, options", [("sft", 0.1, {}), ("dpo", 0.0, {}),
                                                     ("orpo", 0.0, {"step_in_backward": True})])
def test_gradient_checkpointing_gives_the_plain_runs_parameters(tmp_path, kind, dropout, options):
    """Recomputing each block in the backward (dropout's random draws included) changes memory, not numbers."""
    start = tiny_model()
    set_dropout(start, dropout)
    plain_model, recomputed_model = copy.deepcopy(start), copy.deepcopy(start)
    recomputed: list[int] = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        recomputed.append(1)
        return original(*args, **kwargs)

    _, plain = _run(tmp_path / "plain", kind, plain_model, **options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("gpt2chat.model.checkpoint", counting)
        _, again = _run(tmp_path / "again", kind, recomputed_model, gradient_checkpointing=True, **options)
    assert len(recomputed) == 5 * len(start.transformer.h)       # every block of every step went through it
    assert [r["loss"] for r in plain.history] == pytest.approx([r["loss"] for r in again.history], abs=1e-6)
    for (name, a), b in zip(plain_model.named_parameters(), recomputed_model.parameters(), strict=True):
        assert not torch.equal(a, start.get_parameter(name)), name
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_each_gradient_is_freed_as_it_is_applied(tmp_path, monkeypatch):
    alive: list[int] = []
    original = StepInBackward._apply

    def counting(self, param):
        alive.append(sum(p.grad is not None for p in self._singles))
        original(self, param)

    monkeypatch.setattr(StepInBackward, "_apply", counting)
    model = tiny_model()
    _run(tmp_path, "sft", model, step_in_backward=True)
    n_params = sum(1 for _ in model.parameters())
    assert len(alive) == 5 * n_params                    # every parameter, every step
    assert max(alive) == 1                               # only the gradient being applied exists


def test_a_run_resumes_across_the_switch(tmp_path):
    examples = sft_examples(48)
    options = dict(max_grad_norm=0.0, max_steps=6, save_every=3)
    straight = tiny_model()
    make_trainer(tmp_path / "straight", examples, model=straight, **options).fit()
    model = tiny_model()
    make_trainer(tmp_path / "split", examples, model=model, stop_after_steps=3, **options).fit()
    checkpoint = training_state.list_checkpoints(tmp_path / "split")[-1]
    make_trainer(tmp_path / "split", examples, model=model, step_in_backward=True, **options).fit(resume_from=checkpoint)
    for a, b in zip(straight.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_nan_loss_changes_nothing_and_stops(tmp_path):
    class Poisoned(SFTObjective):
        def micro_loss(self, model, batch, totals, split="train"):
            loss, metrics = super().micro_loss(model, batch, totals, split)
            return (loss * float("nan") if torch.initial_seed() == seed_for_step(0, 2, 0) else loss), metrics

    model = tiny_model()
    trainer = make_trainer(tmp_path, sft_examples(48), objective=Poisoned(), model=model, max_grad_norm=0.0,
                           max_steps=5, step_in_backward=True)
    before: dict[str, torch.Tensor] = {}
    original = trainer._train_step

    def step(index, optimizer):
        if index == 2:
            before.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return original(index, optimizer)

    trainer._train_step = step
    with pytest.raises(TrainingDivergedError, match="nan at step 3"):
        trainer.fit()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


@pytest.mark.parametrize("overrides, message", [
    ({"max_grad_norm": 1.0}, "step_in_backward cannot clip.*max_grad_norm = 0"),
    ({"max_grad_norm": 0.0, "grad_accum": 2}, "step_in_backward cannot accumulate.*grad_accum = 1"),
])
def test_what_it_cannot_do_exactly_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config("sft", {"data": ["x:y"]}, {"step_in_backward": True, **overrides})


def test_it_is_refused_across_processes(tmp_path):
    plain = make_trainer(tmp_path, sft_examples(48), max_grad_norm=0.0, step_in_backward=True)
    with pytest.raises(Exception, match="step_in_backward needs one process.*DDP"):
        Trainer(plain.cfg, tiny_model(), SFTObjective(), plain.train_plan, None, DistState(world_size=2, mode="ddp"),
                torch.device("cpu"), lambda model, folder: None)


def test_max_grad_norm_zero_means_no_clipping(tmp_path):
    start = tiny_model()
    unclipped, zero = copy.deepcopy(start), copy.deepcopy(start)
    make_trainer(tmp_path / "none", sft_examples(48), model=unclipped, max_grad_norm=None, max_steps=3).fit()
    result = make_trainer(tmp_path / "zero", sft_examples(48), model=zero, max_grad_norm=0.0, max_steps=3).fit()
    assert max(r["grad_norm"] for r in result.history) > 1.0          # clipping at 1 would have changed them
    for a, b in zip(unclipped.parameters(), zero.parameters(), strict=True):
        assert torch.equal(a, b)


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            low, high = (int(x, 16) for x in fields[0].split("-"))
            spans.append((low, high))
    return spans


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_loaded_weights_are_not_views_of_the_weights_file(tmp_path):
    from gpt2chat.checkpoint import init_checkpoint, load_model

    folder = init_checkpoint("tiny", tmp_path / "tiny", seed=0)
    model, _ = load_model(folder, device="cpu")
    weights = (Path(folder) / "model.safetensors").resolve()
    spans = _file_mappings(weights)
    for name, param in model.named_parameters():
        address = param.untyped_storage().data_ptr()
        assert not any(low <= address < high for low, high in spans), f"{name} is a view of {weights}"


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_state_made_up_front_is_the_state_its_first_step_makes(fused):
    from gpt2chat.train.trainer import allocate_state

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    lazy = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1, fused=fused or None, foreach=None if fused else True)
    early = torch.optim.AdamW(copies, lr=0.1, weight_decay=0.1, fused=fused or None, foreach=None if fused else True)
    allocate_state(early)
    assert all(state for state in early.state.values())
    for _ in range(2):
        for p, q in zip(params, copies, strict=True):
            p.grad = torch.full_like(p, 0.5)
            q.grad = torch.full_like(q, 0.5)
        lazy.step()
        early.step()
    a, b = lazy.state_dict()["state"], early.state_dict()["state"]
    assert a.keys() == b.keys()
    for index in a:
        for key, value in a[index].items():
            other = b[index][key]
            assert (value.dtype, value.device, value.shape) == (other.dtype, other.device, other.shape), key
            assert torch.equal(value, other), key
    assert all(torch.equal(p, q) for p, q in zip(params, copies, strict=True))
