"""The objectives' chunked head against the unchunked one, and DPO's reference log-probs (precomputed = live).

The chunked path (`objectives.through_head` with `gpt2chat.chunked_head`) must give the loss, metrics and
gradients of every parameter that the plain projection of the same positions gives: the tied embedding
(gradient from the embedding lookup and from the head), the blocks, and LoRA factors over a frozen base.
"""

from __future__ import annotations

import copy

import pytest
import torch

from gpt2chat import chunked_head
from gpt2chat.lora import apply_lora
from gpt2chat.losses import token_logps
from gpt2chat.train import objectives
from gpt2chat.train.batching import BatchPlan, collate_preferences, collate_sft
from gpt2chat.train.objectives import DPOObjective, ORPOObjective, SFTObjective, attention_plan
from train_support import PAD, pref_examples, sft_examples, tiny_model


def unchunked_head(model, batch, autocast, loss):
    """What `through_head` computed before chunking: `[N, vocab]` logits of the scored positions."""
    with autocast():
        logits = model(batch.input_ids, attention_plan(model, batch), select=batch.scored.index)
    logps = token_logps(logits, batch.scored.targets)
    return -logps.sum() if loss is chunked_head.chunked_nll_sum else logps


def model_for(variant: str):
    model = tiny_model(seed=3)
    if variant == "lora":
        apply_lora(model, r=4, alpha=8, dropout=0.0)
        with torch.no_grad():              # lora_B starts at 0: move it so every factor gets a gradient
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
    return model


def step(model, objective, batch, totals):
    model.zero_grad(set_to_none=True)
    loss, metrics = objective.micro_loss(model, batch, totals)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads


def batch_for(kind: str, share_prompt: bool = True):
    if kind == "sft":
        return collate_sft(sft_examples(6), [[0, 1], [2, 3, 4], [5]], PAD, 64, pack=True)
    return collate_preferences(pref_examples(5, seed=2), [0, 1, 2, 3, 4], PAD, share_prompt=share_prompt)


def objective_for(kind: str):
    if kind == "sft":
        return SFTObjective()
    if kind == "orpo":
        return ORPOObjective(beta=0.2)
    objective = DPOObjective(beta=0.1)
    objective.ref_logps["train"] = torch.linspace(-70.0, -30.0, 10).view(5, 2)
    return objective


@pytest.mark.parametrize("variant", ["full", "lora"])
@pytest.mark.parametrize("kind", ["sft", "dpo", "orpo"])
def test_chunked_head_gives_the_loss_and_gradients_of_the_unchunked_head(monkeypatch, kind, variant):
    monkeypatch.setattr(chunked_head, "CHUNK_ELEMENTS", 5 * 96)          # chunks of 5 positions: many chunks
    model = model_for(variant)
    batch = batch_for(kind)
    totals = {"targets": batch.n_chosen_targets if kind != "sft" else batch.n_targets + 3, "pairs": 5}
    chunked = step(model, objective_for(kind), batch, totals)
    with monkeypatch.context() as patch:
        patch.setattr(objectives, "through_head", unchunked_head)
        plain = step(model, objective_for(kind), batch, totals)
    assert chunked[0].item() == pytest.approx(plain[0].item(), abs=1e-6)
    for key, value in plain[1].items():
        assert chunked[1][key].item() == pytest.approx(value.item(), abs=1e-6), key
    assert chunked[2].keys() == plain[2].keys()
    if variant == "full":
        assert "transformer.wte.weight" in chunked[2]                  # the tied embedding: lookup + head
    else:
        assert "transformer.wte.weight" not in chunked[2] and any("lora_B" in n for n in chunked[2])
    for name, grad in plain[2].items():
        torch.testing.assert_close(chunked[2][name], grad, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_the_vocabulary_padding_of_the_head_changes_nothing(monkeypatch):
    """`vocab_multiple` pads the head's matmul (CUDA's default); the chunked loss slices it back off."""
    model = model_for("full")
    batch = batch_for("dpo")
    totals = {"targets": batch.n_chosen_targets, "pairs": 5}
    model.vocab_multiple = 0
    plain = step(model, objective_for("dpo"), batch, totals)
    model.vocab_multiple = 64                                            # 96 -> 128 columns
    padded = step(model, objective_for("dpo"), batch, totals)
    assert padded[0].item() == pytest.approx(plain[0].item(), abs=1e-6)
    for name, grad in plain[2].items():
        torch.testing.assert_close(padded[2][name], grad, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------- DPO's reference
def preference_plan(pairs, batch_size=2):
    return BatchPlan(pairs, "preference", batch_size=batch_size, grad_accum=2, world_size=1, seed=0,
                     max_length=64, pad_id=PAD)


def test_precomputed_reference_log_probs_equal_the_live_reference_model():
    """`precompute_ref` (one pass before training, a table by example) and a frozen reference model run on
    each batch give the same reference log-probs, loss and gradients; the live reference keeps no graph."""
    pairs = pref_examples(8, seed=6)
    plan = preference_plan(pairs)
    policy = tiny_model(seed=1)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    precomputed = DPOObjective(beta=0.1)
    precomputed.prepare(policy, {"train": plan}, torch.device("cpu"))
    assert precomputed.ref_logps["train"].shape == (8, 2)
    live = DPOObjective(beta=0.1, reference=reference)
    with torch.no_grad():                    # move the policy away from the reference: the ratios matter
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    totals = plan.step_totals(0, 0)
    for batch in plan.micro_batches(0, 0, 0):
        table = precomputed.reference_logps(batch, "train")
        computed = live.reference_logps(batch, "train")
        assert not computed[0].requires_grad and computed[0].grad_fn is None
        for a, b in zip(table, computed, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)
        expected = step(policy, live, batch, totals)
        got = step(policy, precomputed, batch, totals)
        assert got[0].item() == pytest.approx(expected[0].item(), abs=1e-6)
        for name, grad in expected[2].items():
            torch.testing.assert_close(got[2][name], grad, atol=1e-6, rtol=1e-5)


def test_a_resumed_run_reuses_the_saved_reference_table_without_recomputing():
    pairs = pref_examples(6, seed=7)
    plan = preference_plan(pairs)
    first = DPOObjective(beta=0.1)
    first.prepare(tiny_model(seed=1), {"train": plan}, torch.device("cpu"))
    resumed = DPOObjective(beta=0.1)
    resumed.load_state_tensors(first.state_tensors())
    resumed.prepare(tiny_model(seed=9), {"train": plan}, torch.device("cpu"))   # another model: not used
    torch.testing.assert_close(resumed.ref_logps["train"], first.ref_logps["train"], atol=0, rtol=0)
