"""The trainer on a tiny random model and synthetic token data: learning, accumulation, packing, resume, NaN.

These tests drive `Trainer` directly (no tokenizer, no dataset files), so they pin the loop itself.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from gpt2chat.config import get_preset
from gpt2chat.losses import sequence_logps, sft_loss
from gpt2chat.model import GPT
from gpt2chat.train import training_state
from gpt2chat.train.batching import (
    BatchPlan,
    collate_preferences,
    collate_sft,
    epoch_order,
    pack_rows,
    sft_rows,
)
from gpt2chat.train.metrics_log import read_metrics
from gpt2chat.train.objectives import DPOObjective, ORPOObjective, SFTObjective, attention_plan, sequence_sums
from gpt2chat.train.trainer import TrainingDivergedError, lr_factor
from train_support import (
    PAD,
    VOCAB,
    Ex,
    Pair,
    losses_of,
    make_trainer,
    pref_examples,
    sft_examples,
    tiny_model,
)


def test_sft_loss_goes_down(tmp_path):
    result = make_trainer(tmp_path, sft_examples(64), max_steps=20).fit()
    losses = losses_of(result)
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 21))
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert training_state.list_checkpoints(tmp_path)[-1].name == "step-0000020"


def test_orpo_and_dpo_learn_the_preference(tmp_path):
    pairs = pref_examples(48)
    orpo = make_trainer(
        tmp_path / "orpo", pairs, kind="preference", objective=ORPOObjective(beta=0.5), max_steps=20
    ).fit()
    assert orpo.history[-1]["loss"] < orpo.history[0]["loss"]
    result = make_trainer(
        tmp_path / "dpo", pairs, kind="preference", objective=DPOObjective(beta=0.5), max_steps=20, name="dpo"
    ).fit()
    first, last = result.history[0], result.history[-1]
    assert abs(first["loss"] - 0.6931) < 1e-3  # policy == reference at step 1: -log sigmoid(0)
    assert last["loss"] < first["loss"]
    assert last["rewards/margins"] > 0 and last["rewards/accuracies"] > 0.5


def test_accumulation_equals_one_big_batch(tmp_path):
    examples = sft_examples(48)
    big = make_trainer(tmp_path / "big", examples, batch_size=8, grad_accum=1, max_steps=4).fit()
    accumulated = make_trainer(tmp_path / "acc", examples, batch_size=2, grad_accum=4, max_steps=4).fit()
    for a, b in zip(losses_of(big), losses_of(accumulated), strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    for a, b in zip(big.history, accumulated.history, strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_packing_gives_the_same_loss_as_padding():
    examples = sft_examples(10)
    model = tiny_model()
    objective = SFTObjective()
    padded = collate_sft(examples, [[i] for i in range(10)], PAD, 64, pack=False)
    packed = collate_sft(examples, [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]], PAD, 64, pack=True)
    assert packed.input_ids.shape[0] == 3 and packed.segment_ids is not None
    assert packed.position_ids[0, len(examples[0].input_ids)] == 0  # positions restart
    assert padded.n_targets == packed.n_targets
    totals = {"targets": padded.n_targets, "pairs": 0}
    loss_padded, _ = objective.micro_loss(model, padded, totals)
    loss_packed, _ = objective.micro_loss(model, packed, totals)
    assert float(loss_packed.detach()) == pytest.approx(float(loss_padded.detach()), abs=1e-5)
    # and the gradients agree
    model.zero_grad()
    loss_padded.backward()
    grads_padded = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    objective.micro_loss(model, packed, totals)[0].backward()
    for a, p in zip(grads_padded, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=1e-4)


def test_packing_fills_rows_best_fit_and_keeps_every_example_once():
    # 500 tokens that fit exactly 5 rows of 100 (90+10, 80+20, 70+30, 60+40, 50+50): greedy in-order packing
    # leaves gaps and needs more rows; best fit decreasing finds the exact fit.
    lengths = [60, 50, 40, 50, 30, 70, 20, 80, 10, 90]
    examples = [Ex(list(range(1, n + 1)), [1] * n) for n in lengths]
    order = epoch_order(len(examples), seed=3, epoch=0)
    rows = pack_rows(examples, order, max_length=100)
    assert sorted(i for row in rows for i in row) == list(range(len(examples)))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert len(rows) == sum(lengths) // 100  # 500 tokens in exactly 5 full rows
    assert pack_rows(examples, order, max_length=100) == rows  # deterministic
    # rows follow the shuffled order (by their earliest example), so another epoch gives another sequence
    position = {index: k for k, index in enumerate(order)}
    assert [min(position[i] for i in row) for row in rows] == sorted(
        min(position[i] for i in row) for row in rows
    )
    other = pack_rows(examples, epoch_order(len(examples), seed=3, epoch=1), max_length=100)
    assert other != rows
    # an example longer than a row is cut to the row, alone in it
    long = examples + [Ex(list(range(1, 151)), [1] * 150)]
    assert [10] in pack_rows(long, list(range(len(long))), max_length=100)


def test_pad_is_never_a_target_and_is_not_eos():
    examples = sft_examples(4)
    batch = collate_sft(examples, [[0], [1], [2], [3]], PAD, 64, pack=False)
    assert bool((batch.loss_mask[batch.input_ids == PAD] == 0).all())
    assert bool((batch.attention_mask.sum(1) == torch.tensor([len(e.input_ids) for e in examples])).all())


def test_resume_from_another_run_is_refused(tmp_path):
    examples = sft_examples(32)
    make_trainer(tmp_path, examples, max_steps=2).fit()
    last = training_state.list_checkpoints(tmp_path)[-1]
    other = make_trainer(tmp_path, examples, max_steps=2, lr=1e-2)
    with pytest.raises(training_state.ResumeError, match="another run.*lr"):
        other.fit(resume_from=last)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    class Poisoned(SFTObjective):
        def micro_loss(self, model, batch, totals, split="train"):
            loss, metrics = super().micro_loss(model, batch, totals, split)
            if torch.initial_seed() == poisoned_seed:
                loss = loss * float("nan")
            return loss, metrics

    from gpt2chat.train.trainer import seed_for_step

    poisoned_seed = seed_for_step(0, 4, 0)  # the 5th step
    trainer = make_trainer(tmp_path, sft_examples(64), objective=Poisoned(), max_steps=10, save_every=2)
    with pytest.raises(TrainingDivergedError, match=r"nan at step 5.*step-0000004"):
        trainer.fit()
    names = [p.name for p in training_state.list_checkpoints(tmp_path)]
    assert names[-1] == "step-0000004"
    state, _ = training_state.read_checkpoint(training_state.list_checkpoints(tmp_path)[-1])
    assert state["step"] == 4


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    make_trainer(tmp_path, sft_examples(64), max_steps=10, save_every=2, keep_last=2).fit()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-0000008", "step-0000010"]
    state, tensors = training_state.read_checkpoint(root / "step-0000010")
    assert state["step"] == 10 and "optimizer" in tensors and "rng" in tensors


def test_schedule_warmup_then_cosine():
    assert lr_factor(0, 100, 10, "cosine", 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(99, 100, 10, "cosine", 0.1) < 0.11
    assert lr_factor(50, 100, 3, "constant", 0.0) == 1.0


@pytest.mark.parametrize("kind", ["sft-padded", "sft-packed", "preference"])
def test_scored_positions_give_the_numbers_of_the_full_logits(kind):
    """Projecting only the scored positions (`select=`) gives the log-probs `losses.sequence_logps` reads off
    the full logits, gradients included, and the SFT objective is `sft_loss` of the full logits."""
    model = tiny_model()
    if kind == "preference":
        batch = collate_preferences(pref_examples(4), [0, 1, 2, 3], PAD)
    else:
        rows = [[0, 1], [2, 3, 4], [5]] if kind == "sft-packed" else [[i] for i in range(6)]
        batch = collate_sft(sft_examples(6), rows, PAD, 64, pack=kind == "sft-packed")
    plan = attention_plan(model, batch)

    def with_grads(compute):
        model.zero_grad()
        values = compute()
        values[0].sum().backward()
        return values, [p.grad.clone() for p in model.parameters()]

    (sums, counts), grads = with_grads(lambda: sequence_sums(model, batch, nullcontext))
    (full_sums, full_counts), full_grads = with_grads(
        lambda: sequence_logps(model(batch.input_ids, plan), batch.input_ids, batch.loss_mask)
    )
    assert counts.tolist() == full_counts.tolist()
    torch.testing.assert_close(sums, full_sums, atol=1e-5, rtol=1e-5)
    for a, b in zip(full_grads, grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)
    if kind != "preference":
        totals = {"targets": batch.n_targets + 7, "pairs": 0}  # a step larger than this micro-batch
        loss, _ = SFTObjective().micro_loss(model, batch, totals)
        full, _ = sft_loss(
            model(batch.input_ids, plan), batch.input_ids, batch.loss_mask, num_items=totals["targets"]
        )
        assert loss.item() == pytest.approx(full.item(), abs=1e-6)


def loss_metrics_grads(model, objective, batch, totals) -> tuple[float, dict, list[torch.Tensor]]:
    """One micro-batch's loss, metrics and parameter gradients (from zero)."""
    model.zero_grad()
    loss, metrics = objective.micro_loss(model, batch, totals)
    loss.backward()
    return float(loss.detach()), metrics, [p.grad.clone() for p in model.parameters()]


def assert_same_step(expected: tuple, actual: tuple) -> None:
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = expected, actual
    assert loss_b == pytest.approx(loss_a, abs=1e-5)
    for key in metrics_a:
        assert float(metrics_b[key]) == pytest.approx(float(metrics_a[key]), abs=1e-4)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", ["dpo", "orpo"])
def test_shared_prompt_rows_give_the_loss_and_gradients_of_two_rows_per_pair(kind):
    """`prompt, chosen, rejected` in one row (the prompt run once) is the same computation as the two
    prompt+reply rows, down to the gradients; the batch runs fewer tokens and scores the same ones."""
    model = tiny_model()
    pairs = pref_examples(5, seed=4)
    two_rows = collate_preferences(pairs, [0, 1, 2, 3, 4], PAD)
    shared = collate_preferences(pairs, [0, 1, 2, 3, 4], PAD, share_prompt=True)
    assert shared.input_ids.shape[0] == 5 and two_rows.input_ids.shape[0] == 10
    assert int(shared.attention_mask.sum()) == int(two_rows.attention_mask.sum()) - sum(
        len(p.prompt_ids) for p in pairs
    )
    assert shared.n_chosen_targets == two_rows.n_chosen_targets == sum(len(p.chosen_ids) for p in pairs)
    assert shared.n_targets == int(two_rows.loss_mask[:, 1:].sum())
    totals = {"targets": shared.n_chosen_targets, "pairs": 5}
    results = []
    for batch in (two_rows, shared):
        objective = DPOObjective(0.1) if kind == "dpo" else ORPOObjective(0.1)
        if kind == "dpo":
            objective.ref_logps["train"] = torch.linspace(-80.0, -40.0, 10).view(5, 2)
        results.append(loss_metrics_grads(model, objective, batch, totals))
    assert_same_step(*results)


def test_preference_plan_shares_prompts_by_default_and_counts_the_tokens_it_runs():
    pairs = pref_examples(8)
    common = {"batch_size": 2, "grad_accum": 2, "world_size": 1, "seed": 0, "max_length": 64, "pad_id": PAD}
    shared = BatchPlan(pairs, "preference", **common)
    separate = BatchPlan(pairs, "preference", share_prompt=False, **common)
    assert shared.micro_batches(0, 0, 0)[0].branch_ids is not None
    assert separate.micro_batches(0, 0, 0)[0].branch_ids is None
    rows = shared.step_rows(0, 0)
    prompts = sum(len(pairs[row[0]].prompt_ids) for row in rows)
    assert separate.step_totals(0, 0)["tokens"] - shared.step_totals(0, 0)["tokens"] == prompts
    assert shared.step_totals(0, 0)["targets"] == separate.step_totals(0, 0)["targets"]


CONTEXT = 24  # a tiny position table: rows of every max_length up to it, padding included, must fit


def rows_up_to(max_length: int, kind: str) -> list:
    """Examples of every length class at `max_length`: ones that fill it, short ones beside them (in this
    order a batch pads a short row to the width of a long one), a prompt that is most of the row."""
    long, half = max_length, max_length // 2
    if kind == "sft":
        return [
            Ex(list(range(1, 1 + n)), [0] * k + [1] * (n - k))
            for n, k in ((long, half), (3, 1), (long - 1, 2), (half, half - 1), (2, 1))
        ]
    return [
        Pair(list(range(1, 1 + p)), [60 + k % 3 for k in range(c)], [70 + k % 9 for k in range(r)])
        for p, c, r in (
            (1, long - 1, long - 1),
            (1, 1, 1),
            (half, long - half, long - half),
            (2, 2, long - 2),
            (3, 2, 2),
            (long - 2, 1, 2),
        )
    ]


@pytest.mark.parametrize("arch", ["tiny", "tiny-neo"])
@pytest.mark.parametrize("objective_name", ["sft", "sft-packed", "dpo", "orpo", "orpo-two-rows"])
def test_every_objective_batch_size_and_max_length_up_to_the_context_trains(arch, objective_name):
    """Batches of 1 to 4 rows at every max_length up to the context run (padding positions stay inside the
    position table; shared-prompt rows are nearly twice max_length wide) and a batch's loss is the sum of its
    rows' losses alone: padding changes nothing for the real tokens."""
    torch.manual_seed(0)
    model = GPT(get_preset(arch, vocab_size=VOCAB, n_positions=CONTEXT))
    kind = "sft" if objective_name.startswith("sft") else "preference"
    for max_length in (CONTEXT // 2, CONTEXT // 2 + 1, CONTEXT - 1, CONTEXT):
        examples = rows_up_to(max_length, kind)
        for batch_size in (1, 2, 4):
            plan = BatchPlan(
                examples,
                kind,
                batch_size=batch_size,
                grad_accum=1,
                world_size=1,
                seed=0,
                max_length=max_length,
                pad_id=PAD,
                pack=objective_name == "sft-packed",
                share_prompt=objective_name != "orpo-two-rows",
                vocab_size=VOCAB,
                context=CONTEXT,
            )
            if objective_name.startswith("sft"):
                objective = SFTObjective()
            elif objective_name == "dpo":
                objective = DPOObjective(0.1)
                objective.ref_logps["train"] = torch.linspace(-30.0, -10.0, 2 * len(examples)).view(-1, 2)
            else:
                objective = ORPOObjective(0.1)
            totals = {"targets": 100, "pairs": len(examples)}
            rows = sft_rows(
                examples, list(range(len(examples))), max_length, plan.pack
            )  # in order: mixed widths
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                batch = plan.collate(chunk)
                assert int(batch.input_ids.shape[1]) <= (2 * max_length if kind != "sft" else max_length)
                with torch.no_grad():
                    together = float(objective.micro_loss(model, batch, totals)[0])
                    alone = sum(
                        float(objective.micro_loss(model, plan.collate([row]), totals)[0]) for row in chunk
                    )
                assert together == pytest.approx(alone, abs=1e-5), (max_length, batch_size, chunk)
