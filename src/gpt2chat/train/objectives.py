"""What one micro-batch contributes to a step, for each objective (SFT, DPO, ORPO).

An objective turns a model and a `Batch` into a loss that is already divided by the whole step's
normaliser (assistant tokens for SFT, pairs for DPO / ORPO, across every micro-batch and process), so
that summing micro-batches gives exactly the loss of one big batch, and gradient accumulation or extra
processes change nothing but speed. Metrics come back weighted the same way: summed over a step they are
the step's means.

The loss formulas live in `gpt2chat.losses`; this module only wires model outputs to them. It knows
nothing about optimisers, files or processes.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F

from gpt2chat.losses import dpo_loss, orpo_loss, sequence_logps, sft_loss
from gpt2chat.train.batching import Batch

Forward = Callable[[Batch], torch.Tensor]


def forward_logits(model: torch.nn.Module, batch: Batch, return_hidden: bool = False) -> torch.Tensor:
    """Logits (or final hidden states) for every position; packed and shared-prompt rows pass their layout."""
    layout = {}
    if batch.segment_ids is not None:
        layout = {"position_ids": batch.position_ids, "segment_ids": batch.segment_ids}
    if batch.branch_ids is not None:
        layout["branch_ids"] = batch.branch_ids
    return model(batch.input_ids, return_hidden=return_hidden, **layout)


def chosen_targets(batch: Batch) -> int:
    """Scored tokens of a batch: all of them for SFT, the chosen replies' for preference batches."""
    if batch.n_pairs:
        return batch.n_chosen_targets
    return batch.n_targets


def _scored(states: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The states ([R, T, ...]) that predict scored tokens, the tokens, and the sequence of each."""
    if batch.score_index is not None:
        return states.flatten(0, 1)[batch.score_index], batch.score_targets, batch.score_rows
    target_mask = batch.loss_mask[:, 1:].bool()
    rows = torch.arange(batch.input_ids.shape[0], device=states.device).unsqueeze(1).expand_as(target_mask)
    return states[:, :-1][target_mask], batch.input_ids[:, 1:][target_mask], rows[target_mask]


def scored_token_logps(model, batch: Batch, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token) for every scored token (mask 1, position > 0) and the row each belongs to.

    The same numbers `gpt2chat.losses.sequence_logps` sums (shift: position t predicts token t + 1), but the
    vocabulary projection runs on the scored positions only: for chat data (prompts, padding, rejected
    prompts) that skips a large part of the `[tokens, vocab]` matmul and its softmax, the biggest cost of a
    small GPT-2.
    """
    head_weight = getattr(model, "module", model).lm_head.weight  # tied to the embedding; DDP-wrapped or not
    with autocast():
        hidden = forward_logits(model, batch, return_hidden=True)
    selected, targets, rows = _scored(hidden, batch)
    with autocast():
        logits = F.linear(selected, head_weight)
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")
    return token_logps, rows


def sequence_sums(model, batch: Batch, autocast, fast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and scored-token counts per sequence ([S], [S]; S = rows, or 2 per shared pair)."""
    if not fast:
        with autocast():
            logits = forward_logits(model, batch)
        if batch.score_index is None:
            return sequence_logps(logits, batch.input_ids, batch.loss_mask)
        selected, targets, rows = _scored(logits, batch)
        token_logps = -F.cross_entropy(selected.float(), targets, reduction="none")
    else:
        token_logps, rows = scored_token_logps(model, batch, autocast)
    n_rows = batch.n_sequences
    sums = torch.zeros(n_rows, device=token_logps.device, dtype=token_logps.dtype).index_add(0, rows, token_logps)
    counts = torch.zeros(n_rows, device=rows.device, dtype=torch.long).index_add(0, rows, torch.ones_like(rows))
    return sums, counts


class Objective:
    """Base: `micro_loss` for training, `eval_metrics` for validation."""

    name = "base"
    per_pair = False

    def __init__(self, autocast: Callable[[], AbstractContextManager] | None = None, fast_head: bool = True):
        self.autocast = autocast or nullcontext
        self.fast_head = fast_head     # project only scored positions (off under FSDP / torch.compile)

    def prepare(self, model: torch.nn.Module, plans: dict, device: torch.device) -> None:
        """Work done once before training (DPO: reference log-probs)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def micro_loss(self, model, batch: Batch, totals: dict[str, int],
                   split: str = "train") -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    @torch.no_grad()
    def eval_metrics(self, model, batches: list[Batch], device: torch.device) -> dict[str, float]:
        """Mean metrics over fixed validation batches (one normaliser over all of them)."""
        totals = {"targets": sum(chosen_targets(b) for b in batches), "pairs": sum(b.n_pairs for b in batches)}
        summed: dict[str, float] = {}
        for batch in batches:
            loss, metrics = self.micro_loss(model, batch.to(device), totals, split="val")
            metrics["loss"] = float(loss)
            for key, value in metrics.items():
                summed[key] = summed.get(key, 0.0) + value
        return summed


class SFTObjective(Objective):
    """Cross-entropy on assistant tokens, per token over the whole step."""

    name = "sft"

    def micro_loss(self, model, batch, totals, split="train"):
        if not self.fast_head:
            with self.autocast():
                logits = forward_logits(model, batch)
            loss, _ = sft_loss(logits, batch.input_ids, batch.loss_mask, num_items=totals["targets"])
            return loss, {}
        token_logps, _ = scored_token_logps(model, batch, self.autocast)
        return -token_logps.sum() / totals["targets"], {}


def split_logps(model, batch: Batch, autocast, fast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over chosen and rejected rows -> (summed logps [2N], token counts [2N])."""
    return sequence_sums(model, batch, autocast, fast)


class DPOObjective(Objective):
    """Sigmoid DPO against reference log-probs (precomputed once, or from a frozen reference model)."""

    name = "dpo"
    per_pair = True

    def __init__(self, beta: float, reference: torch.nn.Module | None = None, autocast=None,
                 fast_head: bool = True):
        super().__init__(autocast, fast_head)
        self.beta = beta
        self.reference = reference              # None: use the precomputed table
        self.ref_logps: dict[str, torch.Tensor] = {}   # split -> [n_examples, 2] (chosen, rejected)

    def prepare(self, model, plans, device):
        if self.reference is not None or self.ref_logps:
            return
        was_training = model.training
        model.eval()
        for split, plan in plans.items():
            table = torch.zeros(len(plan.examples), 2, dtype=torch.float32)
            indices = list(range(len(plan.examples)))
            with torch.no_grad():
                for start in range(0, len(indices), plan.batch_size):
                    batch = plan.collate([[i] for i in indices[start : start + plan.batch_size]]).to(device)
                    sums, _ = split_logps(model, batch, self.autocast, self.fast_head)
                    n = batch.n_pairs
                    table[batch.example_index.cpu(), 0] = sums[:n].float().cpu()
                    table[batch.example_index.cpu(), 1] = sums[n:].float().cpu()
            self.ref_logps[split] = table
        model.train(was_training)

    def state_tensors(self):
        return {f"ref_logps.{split}": table for split, table in self.ref_logps.items()}

    def load_state_tensors(self, tensors):
        for key, value in tensors.items():
            if key.startswith("ref_logps."):
                self.ref_logps[key.removeprefix("ref_logps.")] = value

    def reference_logps(self, batch: Batch, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        n = batch.n_pairs
        if self.reference is not None:
            with torch.no_grad():
                sums, _ = split_logps(self.reference, batch, self.autocast, self.fast_head)
            return sums[:n], sums[n:]
        table = self.ref_logps[split].to(batch.input_ids.device)
        rows = table[batch.example_index]
        return rows[:, 0], rows[:, 1]

    def micro_loss(self, model, batch, totals, split="train"):
        sums, _ = split_logps(model, batch, self.autocast, self.fast_head)
        n = batch.n_pairs
        ref_chosen, ref_rejected = self.reference_logps(batch, split)
        loss, metrics = dpo_loss(sums[:n], sums[n:], ref_chosen, ref_rejected, beta=self.beta)
        weight = n / totals["pairs"]
        return loss * weight, {key: float(value) * weight for key, value in metrics.items()}


class ORPOObjective(Objective):
    """ORPO: NLL of the chosen reply (per token over the step) + beta * odds-ratio term (per pair)."""

    name = "orpo"
    per_pair = True

    def __init__(self, beta: float, autocast=None, fast_head: bool = True):
        super().__init__(autocast, fast_head)
        self.beta = beta

    def micro_loss(self, model, batch, totals, split="train"):
        sums, counts = split_logps(model, batch, self.autocast, self.fast_head)
        n = batch.n_pairs
        counts = counts.clamp(min=1)
        chosen_nll_sum = -sums[:n].sum()
        micro_chosen_nll = chosen_nll_sum / counts[:n].sum()
        loss, metrics = orpo_loss(micro_chosen_nll, sums[:n] / counts[:n], sums[n:] / counts[n:], beta=self.beta)
        odds_term = loss - micro_chosen_nll              # -beta * mean log sigmoid(log odds), this micro-batch
        pair_weight = n / totals["pairs"]
        step_loss = chosen_nll_sum / totals["targets"] + odds_term * pair_weight
        logged = {key: float(value) * pair_weight for key, value in metrics.items() if key != "nll_loss"}
        logged["nll_loss"] = float(chosen_nll_sum.detach()) / totals["targets"]
        return step_loss, logged
