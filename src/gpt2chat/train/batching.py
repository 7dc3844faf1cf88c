"""Batches for training: deterministic epoch order, SFT packing or padding, preference pairs.

The order of every epoch is a pure function of (seed, epoch), so a resumed run and every process of a
distributed run rebuild the same plan and take their part of it: a step is `batch_size * grad_accum *
world_size` rows, cut into micro-batches; process `rank` takes micro-batches `rank, rank + world, ...`.

Packing puts several short SFT examples in one row (best fit decreasing, rows nearly full): positions restart at 0 for each example and
`segment_ids` keep examples from attending to each other. Padding uses the tokenizer's pad id (never
end-of-text), pad positions never carry a loss, and pads sit at position 0 (any valid index would do).

Preference pairs share their prompt by default: one row `prompt, chosen, rejected` per pair, the rejected
reply attending to the prompt but not to the chosen reply, its positions restarting where the prompt ends
(`branch_ids`; Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing"). The
prompt is then computed once instead of twice and the two replies need no padding to each other's length.
Every batch lists the tokens it scores and the position that predicts each (`Batch.scored`), built here on
the host once, so a training step reads nothing back from the device; for shared rows it is explicit, since
the first rejected token is predicted from the last prompt token, not from the token before it in the row.

This module knows token ids and masks only: no model, no loss formula, no files.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import torch

from gpt2chat.errors import Gpt2ChatError
from gpt2chat.losses import ScoredTokens, scored_tokens


@dataclass
class Batch:
    """One micro-batch. `loss_mask[b, t] = 1` where token t of row b is a training target; `scored` lists
    those targets with the position that predicts each (see `gpt2chat.losses.ScoredTokens`)."""

    input_ids: torch.Tensor                  # [R, T]
    loss_mask: torch.Tensor                  # [R, T], aligned with input_ids (targets, not inputs)
    attention_mask: torch.Tensor             # [R, T] 1 = real token
    scored: ScoredTokens
    position_ids: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    example_index: torch.Tensor | None = None   # preference batches: dataset index of each pair
    n_pairs: int = 0                           # preference batches: 2 * n_pairs sequences (chosen, rejected)
    # shared-prompt preference rows: branch 0 prompt, 1 chosen, 2 rejected (pair k's chosen reply is
    # sequence k of `scored`, its rejected reply sequence n_pairs + k)
    branch_ids: torch.Tensor | None = None

    @property
    def n_targets(self) -> int:
        return int(self.scored.targets.numel())

    @property
    def n_sequences(self) -> int:
        """Sequences scored separately: rows, or 2 per pair (a pair's replies may share a row)."""
        return 2 * self.n_pairs if self.n_pairs else int(self.input_ids.shape[0])

    @property
    def n_chosen_targets(self) -> int:
        """Scored tokens of the chosen replies (preference batches)."""
        return int((self.scored.sequence < self.n_pairs).sum())

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        """The batch on `device`. To CUDA it goes from pinned host memory: a copy from pageable memory makes the
        host wait until the GPU has finished everything queued before it, a sync in every training step."""
        pin = torch.device(device).type == "cuda"
        moved: dict[str, Any] = {}
        for name, value in vars(self).items():
            if pin:
                value = _pinned(value)
            moved[name] = value.to(device, non_blocking=True) if hasattr(value, "to") else value
        return Batch(**moved)


def _pinned(value: Any) -> Any:
    if isinstance(value, ScoredTokens):
        return ScoredTokens(*(_pinned(t) for t in (value.index, value.targets, value.sequence)))
    if isinstance(value, torch.Tensor) and value.device.type == "cpu":
        return value.pin_memory()
    return value


def epoch_order(n_items: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n_items), the same on every process and every run with this seed."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_items, generator=generator).tolist()


def pack_rows(examples: list, order: list[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing packing: rows of example indices whose lengths sum to at most `max_length`.

    Longest examples first, each into the fullest row it still fits (a new row if none), which fills rows to
    within a few tokens of `max_length`. Ties break by `order`, and rows come out in the order of their
    earliest example in `order`: with a shuffled `order`, a shuffled sequence of rows; the same on every
    process and every resumed run.
    """
    rank = {index: position for position, index in enumerate(order)}
    lengths = {index: min(len(examples[index].input_ids), max_length) for index in order}
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []          # (room left, row number), sorted: the best fit is a bisect away
    for index in sorted(order, key=lambda i: (-lengths[i], rank[i])):
        length = lengths[index]
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            room, row = free.pop(slot)
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(index)
        if room - length > 0:
            bisect.insort(free, (room - length, row))
    for row in rows:
        row.sort(key=rank.__getitem__)
    rows.sort(key=lambda row: rank[row[0]])
    return rows


def sft_rows(examples: list, order: list[int], max_length: int, pack: bool) -> list[list[int]]:
    if pack:
        return pack_rows(examples, order, max_length)
    return [[index] for index in order]


def collate_sft(examples: list, rows: list[list[int]], pad_id: int, max_length: int, pack: bool) -> Batch:
    """Rows of example indices -> a padded micro-batch (packed rows get positions and segments)."""
    ids_rows, mask_rows, pos_rows, seg_rows = [], [], [], []
    for row in rows:
        ids: list[int] = []
        mask: list[int] = []
        positions: list[int] = []
        segments: list[int] = []
        for segment, index in enumerate(row, start=1):
            example = examples[index]
            example_ids = list(example.input_ids[:max_length])
            example_mask = list(example.assistant_mask[:max_length])
            example_mask[0] = 0          # the first token of an example is never predicted from another
            ids += example_ids
            mask += example_mask
            positions += range(len(example_ids))
            segments += [segment] * len(example_ids)
        ids_rows.append(ids)
        mask_rows.append(mask)
        pos_rows.append(positions)
        seg_rows.append(segments)
    width = max(len(r) for r in ids_rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment_ids = torch.zeros((len(rows), width), dtype=torch.long)   # pads: segment 0 of their own
    for b, (ids, mask, positions, segments) in enumerate(zip(ids_rows, mask_rows, pos_rows, seg_rows,
                                                             strict=True)):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        loss_mask[b, :n] = torch.tensor(mask)
        attention_mask[b, :n] = 1
        position_ids[b, :n] = torch.tensor(positions)   # pads stay at position 0 (see `_collate_shared_prompt`)
        segment_ids[b, :n] = torch.tensor(segments)
    scored = scored_tokens(input_ids, loss_mask)
    if not pack:
        # right padding under a causal mask: real tokens never see pads, plain positions suffice
        return Batch(input_ids, loss_mask, attention_mask, scored)
    return Batch(input_ids, loss_mask, attention_mask, scored, position_ids=position_ids, segment_ids=segment_ids)


def collate_preferences(examples: list, indices: list[int], pad_id: int, share_prompt: bool = False) -> Batch:
    """Pairs -> one batch: with `share_prompt`, N rows `prompt, chosen, rejected`; else 2N rows, N
    prompt+chosen rows then N prompt+rejected rows. Either way one forward scores both replies."""
    if share_prompt:
        return _collate_shared_prompt(examples, indices, pad_id)
    sequences, masks = [], []
    for which in ("chosen_ids", "rejected_ids"):
        for index in indices:
            example = examples[index]
            reply = list(getattr(example, which))
            sequences.append(list(example.prompt_ids) + reply)
            masks.append([0] * len(example.prompt_ids) + [1] * len(reply))
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for b, (ids, mask) in enumerate(zip(sequences, masks, strict=True)):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        loss_mask[b, : len(ids)] = torch.tensor(mask)
        attention_mask[b, : len(ids)] = 1
    return Batch(input_ids, loss_mask, attention_mask, scored_tokens(input_ids, loss_mask),
                 example_index=torch.tensor(indices), n_pairs=len(indices))


def _collate_shared_prompt(examples: list, indices: list[int], pad_id: int) -> Batch:
    n = len(indices)
    width = max(len(examples[i].prompt_ids) + len(examples[i].chosen_ids) + len(examples[i].rejected_ids)
                for i in indices)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((n, width), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    branch_ids = torch.zeros((n, width), dtype=torch.long)
    segment_ids = torch.ones((n, width), dtype=torch.long)      # pads: segment 0, apart from real tokens
    score_index: list[int] = []
    score_targets: list[int] = []
    score_rows: list[int] = []
    for b, index in enumerate(indices):
        example = examples[index]
        prompt, chosen, rejected = list(example.prompt_ids), list(example.chosen_ids), list(example.rejected_ids)
        p, c, r = len(prompt), len(chosen), len(rejected)
        total = p + c + r
        input_ids[b, :total] = torch.tensor(prompt + chosen + rejected)
        loss_mask[b, p:total] = 1
        attention_mask[b, :total] = 1
        position_ids[b, :total] = torch.tensor([*range(p + c), *range(p, p + r)])
        # pads stay at position 0: a row is up to p + c + r wide, nearly twice max_length, so counting on
        # through the pads would run past the position table; nothing real attends to a pad (segment 0)
        branch_ids[b, p : p + c] = 1
        branch_ids[b, p + c : total] = 2
        segment_ids[b, total:] = 0
        row = b * width
        for start, reply, sequence in ((p, chosen, b), (p + c, rejected, n + b)):
            # each reply token's predictor: the last prompt token, then the reply's own previous token
            sources = [p - 1] + list(range(start, start + len(reply) - 1))
            if p == 0:          # nothing predicts a first token without a prompt (as in the unshared rows)
                sources, reply = sources[1:], reply[1:]
            score_index += [row + t for t in sources]
            score_targets += reply
            score_rows += [sequence] * len(reply)
    scored = ScoredTokens(*(torch.tensor(values, dtype=torch.long) for values in (score_index, score_targets,
                                                                                  score_rows)))
    return Batch(input_ids, loss_mask, attention_mask, scored, position_ids=position_ids, segment_ids=segment_ids,
                 example_index=torch.tensor(indices), n_pairs=n, branch_ids=branch_ids)


def check_context(max_length: int, context: int, model_name: str = "the model") -> None:
    """Gpt2ChatError when rows of `max_length` tokens need positions past the model's context."""
    if max_length > context:
        raise Gpt2ChatError(f"max_length {max_length} is longer than the context of {model_name} ({context} tokens): "
                            f"set --max-length {context} or less (max_length in a recipe)")


def check_examples_fit(examples: list, kind: str, max_length: int, pad_id: int, vocab_size: int | None,
                       context: int | None) -> None:
    """Gpt2ChatError when a token id (padding included) is outside the vocabulary or a row needs positions
    past the model's context."""
    if context is not None:
        check_context(max_length, context)
    if vocab_size is None:
        return
    fields = ("input_ids",) if kind == "sft" else ("prompt_ids", "chosen_ids", "rejected_ids")
    for index, example in enumerate(examples):
        for name in fields:
            ids = getattr(example, name)
            if ids and not (0 <= min(ids) and max(ids) < vocab_size):
                bad = min(ids) if min(ids) < 0 else max(ids)
                raise Gpt2ChatError(
                    f"{getattr(example, 'source', f'example {index}')}: token id {bad} in {name} is outside the "
                    f"model's vocabulary (0 .. {vocab_size - 1}); the tokenizer and the model do not match")
    if not 0 <= pad_id < vocab_size:
        raise Gpt2ChatError(f"pad id {pad_id} is outside the model's vocabulary (0 .. {vocab_size - 1})")


class BatchPlan:
    """The deterministic sequence of optimizer steps over a dataset, and each process's share of a step.

    `rows_for_epoch(epoch)` gives the rows (lists of example indices) of an epoch; a step is
    `rows_per_step` consecutive rows; incomplete trailing steps are dropped. Given the model's
    `vocab_size` and `context`, every example is checked against them here, once, so that no training
    forward needs to check its input.
    """

    def __init__(self, examples: list, kind: str, *, batch_size: int, grad_accum: int, world_size: int,
                 seed: int, max_length: int, pad_id: int, pack: bool = False, share_prompt: bool = True,
                 vocab_size: int | None = None, context: int | None = None):
        if not examples:
            raise ValueError("no training examples")
        check_examples_fit(examples, kind, max_length, pad_id, vocab_size, context)
        self.examples = examples
        self.kind = kind
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.seed = seed
        self.max_length = max_length
        self.pad_id = pad_id
        self.pack = pack and kind == "sft"
        self.share_prompt = share_prompt and kind != "sft"
        self.rows_per_step = batch_size * grad_accum * world_size
        self._epoch_rows: dict[int, list[list[int]]] = {}

    def rows_for_epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epoch_rows:
            order = epoch_order(len(self.examples), self.seed, epoch)
            if self.kind == "sft":
                rows = sft_rows(self.examples, order, self.max_length, self.pack)
            else:
                rows = [[index] for index in order]
            self._epoch_rows = {epoch: rows}          # keep one epoch in memory
        return self._epoch_rows[epoch]

    def steps_per_epoch(self) -> int:
        return len(self.rows_for_epoch(0)) // self.rows_per_step

    def step_rows(self, epoch: int, step_in_epoch: int) -> list[list[int]]:
        rows = self.rows_for_epoch(epoch)
        start = step_in_epoch * self.rows_per_step
        return rows[start : start + self.rows_per_step]

    def micro_batches(self, epoch: int, step_in_epoch: int, rank: int) -> list[Batch]:
        """This process's micro-batches of one step (grad_accum of them)."""
        rows = self.step_rows(epoch, step_in_epoch)
        batches = []
        for micro in range(self.grad_accum):
            chunk_index = micro * self.world_size + rank
            chunk = rows[chunk_index * self.batch_size : (chunk_index + 1) * self.batch_size]
            batches.append(self.collate(chunk))
        return batches

    def step_totals(self, epoch: int, step_in_epoch: int) -> dict[str, int]:
        """Targets / pairs / tokens in the whole step, across every process (the loss normaliser)."""
        rows = self.step_rows(epoch, step_in_epoch)
        if self.kind == "sft":
            targets = tokens = 0
            for row in rows:
                for index in row:
                    example = self.examples[index]
                    mask = example.assistant_mask[: self.max_length]
                    targets += sum(mask[1:])
                    tokens += len(mask)
            return {"targets": targets, "tokens": tokens, "pairs": 0}
        pairs = len(rows)
        targets = tokens = 0
        prompt_copies = 1 if self.share_prompt else 2           # tokens the forward actually runs
        for row in rows:
            example = self.examples[row[0]]
            targets += len(example.chosen_ids)
            tokens += prompt_copies * len(example.prompt_ids) + len(example.chosen_ids) + len(example.rejected_ids)
        return {"targets": targets, "tokens": tokens, "pairs": pairs}

    def collate(self, rows: list[list[int]]) -> Batch:
        if self.kind == "sft":
            return collate_sft(self.examples, rows, self.pad_id, self.max_length, self.pack)
        return collate_preferences(self.examples, [row[0] for row in rows], self.pad_id, self.share_prompt)

    def eval_batches(self, limit: int) -> list[Batch]:
        """Fixed, in-order batches for validation (no shuffle), at most `limit`."""
        order = list(range(len(self.examples)))
        if self.kind == "sft":
            rows = sft_rows(self.examples, order, self.max_length, self.pack)
        else:
            rows = [[index] for index in order]
        batches = []
        for start in range(0, len(rows), self.batch_size):
            if len(batches) >= limit:
                break
            batches.append(self.collate(rows[start : start + self.batch_size]))
        return batches
