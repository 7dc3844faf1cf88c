"""Log-probabilities of token sequences under a model: the numbers perplexity and preference need.

`score_sequences` runs a model over many sequences in length-sorted, token-budgeted batches and returns,
per sequence, the summed log-prob and count of the target tokens its mask selects; the log-probabilities
come from `gpt2chat.losses` (the same shift and primitive as training), and the model projects only the
scored positions through its vocabulary. The builders turn conversations and preference
pairs into (ids, mask) through a template: the trained tokens (`assistant_mask`) are the scored ones.
Knows nothing about files, metrics' formulas or reports.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "score_sequences",
    "score_sequences_multi",
    "ScoringSet",
    "conversation_sets",
    "preference_sets",
]


def score_sequences(model, sequences: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], *,
                    batch_tokens: int = 2048, desc: str = "scoring", progress: bool = True
                    ) -> list[tuple[float, int]]:
    """(sum of log p over the tokens where mask == 1, their count) for each sequence.

    `mask[t] == 1` scores token t given tokens < t, so `mask[0]` is ignored (nothing predicts the first
    token). Sequences are right-padded (a causal model's real tokens never see the padding).
    """
    return score_sequences_multi(model, sequences, [masks], batch_tokens=batch_tokens, desc=desc,
                                 progress=progress)[0]


def score_sequences_multi(model, sequences: Sequence[Sequence[int]], mask_sets: Sequence[Sequence[Sequence[int]]],
                          *, batch_tokens: int = 2048, desc: str = "scoring", progress: bool = True
                          ) -> list[list[tuple[float, int]]]:
    """`score_sequences` for several masks over the same sequences with one forward per batch."""
    import torch
    from tqdm.auto import tqdm

    from gpt2chat.losses import scored_tokens, sum_per_sequence, token_logps

    if any(len(masks) != len(sequences) for masks in mask_sets):
        raise ValueError("one mask per sequence is needed")
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * len(sequences[batches[-1][0]]) <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    results = [[(0.0, 0)] * len(sequences) for _ in mask_sets]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
                width = len(sequences[batch[0]])
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                selected = torch.zeros(len(mask_sets), len(batch), width, dtype=torch.bool)
                for row, index in enumerate(batch):
                    ids[row, : len(sequences[index])] = torch.tensor(list(sequences[index]), dtype=torch.long)
                    for which, masks in enumerate(mask_sets):
                        selected[which, row, : len(masks[index])] = torch.tensor(list(masks[index]), dtype=torch.bool)
                scored = scored_tokens(ids, selected.any(0))  # every position any mask scores, once
                logits = model(ids.to(device), select=scored.index.to(device))
                logps = token_logps(logits, scored.targets.to(device)).cpu()
                for which, out in enumerate(results):
                    member = selected[which].flatten()[scored.index + 1]  # the scored token is the next one
                    sums, counts = sum_per_sequence(logps[member], scored.sequence[member], len(batch))
                    for row, index in enumerate(batch):
                        out[index] = (float(sums[row]), int(counts[row]))
    finally:
        model.train(was_training)
    return results


@dataclass
class ScoringSet:
    """Sequences to score plus what the report says about them."""

    sequences: list[list[int]]
    masks: list[list[int]]
    sources: list[str]
    truncated: int = 0
    skipped: int = 0
    skip_reasons: Counter = field(default_factory=Counter)  # why rows were skipped: reason -> rows

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.skip_reasons[reason] += 1

    def skipped_text(self) -> str:
        """'3 skipped: 2 reply over max_length, 1 no assistant reply' (or '0 skipped')."""
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.skip_reasons.most_common())
        return f"{self.skipped} skipped" + (f": {reasons}" if reasons else "")


def conversation_sets(conversations, tokenizer, template: str, context: int) -> dict[str, ScoringSet]:
    """Three views of held-out conversations for perplexity, over one set of rows.

    - `assistant`: the last reply with its history, built by training's own SFT example builder
      (`gpt2chat.data.examples.sft_example`, whose context rule is `gpt2chat.context_fit`'s), scored on the
      assistant mask (last reply + end-of-turn);
    - `rendered`: the same ids, every token scored (template tokens included);
    - `plain`: the last assistant reply alone as plain text after `<|endoftext|>`, no template.
    Longer than `context`: the rendering loses its oldest turns as in training (`truncated` counts them;
    tokens are never cut off its front); the plain reply keeps its first `context` tokens. A conversation
    that one view cannot score (no assistant reply, a reply that alone does not fit, ...) is skipped in all
    three, with its reason in `skip_reasons`, so the columns compare the same rows.
    """
    from gpt2chat.data.examples import sft_example
    from gpt2chat.data.types import Budgets
    from gpt2chat.templates import render_chat

    budgets = Budgets(max_length=context)
    sets = {view: ScoringSet([], [], []) for view in ("assistant", "rendered", "plain")}
    for conversation in conversations:
        messages = conversation.messages
        replies = [m["content"] for m in messages if m.get("role") == "assistant"]
        reply_ids = tokenizer.encode(replies[-1]) if replies and replies[-1] else []
        reason = None
        if not reply_ids:
            reason = "no assistant reply to score"
        else:
            ids, mask = render_chat(tokenizer, messages, template=template)
            cut = len(ids) > context
            if cut:  # the builder's first candidate is this rendering; the others drop turns
                example, reason = sft_example(tokenizer, messages, template, budgets, conversation.source)
                ids, mask = (example.input_ids, example.assistant_mask) if example is not None else ([], [])
            ids, mask = list(ids), [int(m) for m in mask]
            if reason is None and sum(mask[1:]) == 0:
                reason = "empty loss mask"
        if reason is not None:
            for scoring_set in sets.values():
                scoring_set.skip(reason)
            continue
        sequence = [tokenizer.eos_token_id, *reply_ids]
        views = (("assistant", ids, mask, cut), ("rendered", ids, [0] + [1] * (len(ids) - 1), cut),
                 ("plain", sequence[:context], [0] + [1] * (min(len(sequence), context) - 1),
                  len(sequence) > context))
        for view, view_ids, view_mask, truncated in views:
            target = sets[view]
            target.sequences.append(view_ids)
            target.masks.append(view_mask)
            target.sources.append(conversation.source)
            target.truncated += int(truncated)
    return sets


def preference_sets(pairs, tokenizer, template: str, context: int, max_reply_tokens: int = 256
                    ) -> tuple[ScoringSet, ScoringSet]:
    """(chosen, rejected) sequences of each pair, the reply tokens masked, built by training's own example
    builder (`gpt2chat.data.examples.build_preferences`: one rendering, one prefix check): replies cut to
    `max_reply_tokens` and to what the context leaves, the oldest turns of a prompt too long for the context
    dropped. A pair that cannot be scored is skipped and counted in `chosen.skipped`; `truncated` counts the
    replies cut."""
    from gpt2chat.data.examples import build_preferences
    from gpt2chat.data.types import Budgets

    drops: Counter = Counter()
    cuts: Counter = Counter()
    budgets = Budgets(max_prompt_length=context - 1, max_response_length=max_reply_tokens, max_length=context)
    examples = build_preferences(tokenizer, list(pairs), template, budgets, drops, cuts)
    chosen = ScoringSet([], [], [], truncated=cuts["chosen reply cut"], skipped=sum(drops.values()),
                        skip_reasons=Counter(drops))
    rejected = ScoringSet([], [], [], truncated=cuts["rejected reply cut"])
    for example in examples:
        prompt = list(example.prompt_ids)
        for target, reply in ((chosen, example.chosen_ids), (rejected, example.rejected_ids)):
            target.sequences.append(prompt + list(reply))
            target.masks.append([0] * len(prompt) + [1] * len(reply))
            target.sources.append(example.source)
    return chosen, rejected
