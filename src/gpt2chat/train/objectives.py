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
from functools import partial

import torch

from gpt2chat.attention_plan import AttentionPlan
from gpt2chat.chunked_head import chunked_nll_sum, chunked_token_logps
from gpt2chat.losses import dpo_loss, orpo_loss, sum_per_sequence
from gpt2chat.model import attention_kernel
from gpt2chat.train.batching import Batch


def attention_plan(model: torch.nn.Module, batch: Batch) -> AttentionPlan | None:
    """The batch's layout as the model's attention plan (None: plain causal rows); FlexAttention block masks
    on CUDA unless the model trains with attention dropout (`gpt2chat.model.attention_kernel`)."""
    model = getattr(model, "module", model)  # DDP keeps the model in .module
    config = model.config
    if batch.branch_ids is None and batch.segment_ids is None:
        return None
    kernel = attention_kernel(model, batch.input_ids.device)
    if batch.branch_ids is not None:
        return AttentionPlan.shared_prefix(config, batch.branch_ids, batch.position_ids, batch.segment_ids,
                                           kernel=kernel)
    return AttentionPlan.packed(config, batch.segment_ids, batch.position_ids, kernel=kernel)


def through_head(model: torch.nn.Module, batch: Batch, autocast, loss) -> torch.Tensor:
    """`loss(hidden, head weight, targets=..., pad_multiple=...)` over the positions that predict the batch's
    scored tokens, and no others: a `gpt2chat.chunked_head` loss, so no `[N, vocab]` logits are kept.

    For chat data (prompts, padding, rejected prompts) selecting the scored positions skips a large part of
    the `[tokens, vocab]` matmul and its softmax, the biggest cost of a small GPT-2; chunking the rest keeps
    its memory to one chunk. Both happen in the model's forward, so they work the same under DDP, FSDP and
    `torch.compile`.
    """
    multiple = getattr(model, "module", model).head_multiple(batch.input_ids.device)
    head = partial(loss, targets=batch.scored.targets, pad_multiple=multiple)
    with autocast():
        return model(batch.input_ids, attention_plan(model, batch), select=batch.scored.index, head=head)


def chosen_targets(batch: Batch) -> int:
    """Scored tokens of a batch: all of them for SFT, the chosen replies' for preference batches."""
    if batch.n_pairs:
        return batch.n_chosen_targets
    return batch.n_targets


def sequence_sums(model, batch: Batch, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and scored-token counts per sequence ([S], [S]; S = 2 per pair)."""
    logps = through_head(model, batch, autocast, chunked_token_logps)
    return sum_per_sequence(logps, batch.scored.sequence, batch.n_sequences)


class Objective:
    """Base: `micro_loss` for training, `eval_metrics` for validation."""

    name = "base"
    per_pair = False

    def __init__(self, autocast: Callable[[], AbstractContextManager] | None = None):
        self.autocast = autocast or nullcontext

    def prepare(self, model: torch.nn.Module, plans: dict, device: torch.device) -> None:
        """Work done once before training (DPO: reference log-probs)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def micro_loss(self, model, batch: Batch, totals: dict[str, int],
                   split: str = "train") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, metrics) of one micro-batch; metrics are detached 0-dim tensors on the batch's device (summed
        by the caller and read back once, so that a step does not wait for the device per micro-batch)."""
        raise NotImplementedError

    @torch.no_grad()
    def eval_metrics(self, model, batches: list[Batch], device: torch.device) -> dict[str, float]:
        """Mean metrics over fixed validation batches (one normaliser over all of them)."""
        totals = {"targets": sum(chosen_targets(b) for b in batches), "pairs": sum(b.n_pairs for b in batches)}
        summed: dict[str, torch.Tensor] = {}
        for batch in batches:
            loss, metrics = self.micro_loss(model, batch.to(device), totals, split="val")
            metrics["loss"] = loss.detach()
            for key, value in metrics.items():
                summed[key] = summed[key] + value if key in summed else value
        keys = sorted(summed)
        values = torch.stack([summed[key].float() for key in keys]).tolist() if keys else []
        return dict(zip(keys, values, strict=True))


class SFTObjective(Objective):
    """Cross-entropy on assistant tokens, per token over the whole step."""

    name = "sft"

    def micro_loss(self, model, batch, totals, split="train"):
        # sft_loss's sum over the scored tokens, divided by the step's count (`totals`), as one chunked pass
        nll_sum = through_head(model, batch, self.autocast, chunked_nll_sum)
        return nll_sum / totals["targets"], {}


class DPOObjective(Objective):
    """Sigmoid DPO against reference log-probs (precomputed once, or from a frozen reference model)."""

    name = "dpo"
    per_pair = True

    def __init__(self, beta: float, reference: torch.nn.Module | None = None, autocast=None):
        super().__init__(autocast)
        self.beta = beta
        self.reference = reference              # None: use the precomputed table
        self.ref_logps: dict[str, torch.Tensor] = {}   # split -> [n_examples, 2] (chosen, rejected)
        self._ref_on_device: dict[tuple[str, torch.device], torch.Tensor] = {}   # copied once, not per batch

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
                    sums, _ = sequence_sums(model, batch, self.autocast)
                    n = batch.n_pairs
                    table[batch.example_index.cpu(), 0] = sums[:n].float().cpu()
                    table[batch.example_index.cpu(), 1] = sums[n:].float().cpu()
            self.ref_logps[split] = table
        self._ref_on_device.clear()
        model.train(was_training)

    def state_tensors(self):
        return {f"ref_logps.{split}": table for split, table in self.ref_logps.items()}

    def load_state_tensors(self, tensors):
        for key, value in tensors.items():
            if key.startswith("ref_logps."):
                self.ref_logps[key.removeprefix("ref_logps.")] = value
        self._ref_on_device.clear()

    def reference_logps(self, batch: Batch, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        n = batch.n_pairs
        if self.reference is not None:
            with torch.no_grad():
                sums, _ = sequence_sums(self.reference, batch, self.autocast)
            return sums[:n], sums[n:]
        device = batch.input_ids.device
        if (split, device) not in self._ref_on_device:
            self._ref_on_device[(split, device)] = self.ref_logps[split].to(device)
        rows = self._ref_on_device[(split, device)][batch.example_index]
        return rows[:, 0], rows[:, 1]

    def micro_loss(self, model, batch, totals, split="train"):
        sums, _ = sequence_sums(model, batch, self.autocast)
        n = batch.n_pairs
        ref_chosen, ref_rejected = self.reference_logps(batch, split)
        loss, metrics = dpo_loss(sums[:n], sums[n:], ref_chosen, ref_rejected, beta=self.beta)
        weight = n / totals["pairs"]
        return loss * weight, {key: value * weight for key, value in metrics.items()}


class ORPOObjective(Objective):
    """ORPO: NLL of the chosen reply (per token over the step) + beta * odds-ratio term (per pair)."""

    name = "orpo"
    per_pair = True

    def __init__(self, beta: float, autocast=None):
        super().__init__(autocast)
        self.beta = beta

    def micro_loss(self, model, batch, totals, split="train"):
        sums, counts = sequence_sums(model, batch, self.autocast)
        n = batch.n_pairs
        counts = counts.clamp(min=1)
        chosen_nll_sum = -sums[:n].sum()
        micro_chosen_nll = chosen_nll_sum / counts[:n].sum()
        loss, metrics = orpo_loss(micro_chosen_nll, sums[:n] / counts[:n], sums[n:] / counts[n:], beta=self.beta)
        odds_term = loss - micro_chosen_nll              # -beta * mean log sigmoid(log odds), this micro-batch
        pair_weight = n / totals["pairs"]
        step_loss = chosen_nll_sum / totals["targets"] + odds_term * pair_weight
        logged = {key: value * pair_weight for key, value in metrics.items() if key != "nll_loss"}
        logged["nll_loss"] = chosen_nll_sum.detach() / totals["targets"]
        return step_loss, logged
