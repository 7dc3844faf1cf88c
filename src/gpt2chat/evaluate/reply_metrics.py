"""Pure metric functions: numbers in, numbers out.

Perplexity from summed log-probabilities, preference accuracy and reward margin from per-pair sequence
log-probabilities, corpus BLEU (sacrebleu), seed 001's reward / repetition penalty, distinct-n and reply
length. Nothing here knows about models, tokenizers, files or devices; the scoring and generation modules
produce the inputs, the report only formats the outputs.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "perplexity",
    "PreferenceScores",
    "preference_scores",
    "corpus_bleu",
    "words",
    "reward_words",
    "repetition_penalty",
    "distinct_n",
    "reply_metrics",
]

_WORD = re.compile(r"\w+(?:'\w+)?", re.UNICODE)


def perplexity(sum_logprob: float, token_count: int) -> float:
    """exp(-sum log p / N): the perplexity of N tokens whose natural-log probabilities sum to `sum_logprob`.

    Returns `inf` when the mean negative log-likelihood overflows `exp`; raises on N <= 0 (a perplexity of
    nothing is not a number we should print).
    """
    if token_count <= 0:
        raise ValueError("perplexity needs at least one scored token")
    mean_nll = -sum_logprob / token_count
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class PreferenceScores:
    """Preference accuracy over pairs and the mean / per-pair reward margins (chosen minus rejected)."""

    accuracy: float  # fraction of pairs with margin > 0 (a tie counts as wrong)
    mean_margin: float
    mean_chosen_reward: float
    mean_rejected_reward: float
    pairs: int
    ties: int
    mode: str  # "dpo" (implicit reward against a reference) or "reference-free" (average log-prob)
    margins: tuple[float, ...]


def preference_scores(
    chosen_logps: Sequence[float],
    rejected_logps: Sequence[float],
    *,
    chosen_counts: Sequence[int] | None = None,
    rejected_counts: Sequence[int] | None = None,
    ref_chosen_logps: Sequence[float] | None = None,
    ref_rejected_logps: Sequence[float] | None = None,
    beta: float = 0.1,
) -> PreferenceScores:
    """Preference accuracy and reward margin of a policy on (chosen, rejected) pairs.

    With reference log-probs (DPO, Rafailov et al. 2023, eq. 5): the implicit reward of a reply is
    `beta * (log pi(y|x) - log pi_ref(y|x))` with log-probs summed over the reply tokens, and a pair is
    right when the chosen reply's reward is higher (seed 002's accuracy). Without a reference: the reward
    is the average per-token log-prob of the reply, `sum_logp / token_count` (the quantity ORPO's odds use),
    so `chosen_counts` / `rejected_counts` are required.
    """
    n = len(chosen_logps)
    if n == 0:
        raise ValueError("preference scores need at least one pair")
    if len(rejected_logps) != n:
        raise ValueError("chosen and rejected log-probs differ in length")
    with_ref = ref_chosen_logps is not None or ref_rejected_logps is not None
    if with_ref:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError("both reference chosen and rejected log-probs are needed")
        if len(ref_chosen_logps) != n or len(ref_rejected_logps) != n:
            raise ValueError("reference log-probs differ in length from the policy's")
        chosen = [beta * (p - r) for p, r in zip(chosen_logps, ref_chosen_logps, strict=True)]
        rejected = [beta * (p - r) for p, r in zip(rejected_logps, ref_rejected_logps, strict=True)]
        mode = "dpo"
    else:
        if chosen_counts is None or rejected_counts is None:
            raise ValueError("reference-free scores need the token counts of each reply")
        if any(c <= 0 for c in chosen_counts) or any(c <= 0 for c in rejected_counts):
            raise ValueError("every reply needs at least one scored token")
        chosen = [lp / c for lp, c in zip(chosen_logps, chosen_counts, strict=True)]
        rejected = [lp / c for lp, c in zip(rejected_logps, rejected_counts, strict=True)]
        mode = "reference-free"
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return PreferenceScores(
        accuracy=sum(m > 0 for m in margins) / n,
        mean_margin=sum(margins) / n,
        mean_chosen_reward=sum(chosen) / n,
        mean_rejected_reward=sum(rejected) / n,
        pairs=n,
        ties=sum(m == 0 for m in margins),
        mode=mode,
        margins=tuple(margins),
    )


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (0-100, default 13a tokenisation, one reference per hypothesis)."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError("BLEU needs one reference per hypothesis")
    if not hypotheses:
        raise ValueError("BLEU needs at least one hypothesis")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, underscore; inner apostrophes kept), punctuation dropped."""
    return _WORD.findall(text.lower())


def reward_words(reply: str, reference: str) -> int:
    """Seed 001's reward: how many of the reference's words the reply produced.

    Clipped counts, as in BLEU's unigram precision: a word that occurs k times in the reference earns at
    most k, so a reply cannot collect reward by repeating one right word (the penalty counts that).
    """
    reference_counts = Counter(words(reference))
    reply_counts = Counter(words(reply))
    return sum(min(count, reference_counts[word]) for word, count in reply_counts.items())


def repetition_penalty(reply: str) -> int:
    """Seed 001's penalty: the number of words equal to the word just before them ("the the" = 1)."""
    tokens = words(reply)
    return sum(1 for previous, current in zip(tokens, tokens[1:], strict=False) if previous == current)


def distinct_n(replies: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams over every reply (0 if none)."""
    if n < 1:
        raise ValueError("n must be >= 1")
    total = 0
    unique: set[tuple[str, ...]] = set()
    for reply in replies:
        tokens = words(reply)
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def reply_metrics(replies: Sequence[str], references: Sequence[str]) -> dict:
    """All reply-level figures of the report for generated replies against their references."""
    if len(replies) != len(references):
        raise ValueError("one reference per reply is needed")
    if not replies:
        raise ValueError("reply metrics need at least one reply")
    rewards = [reward_words(r, ref) for r, ref in zip(replies, references, strict=True)]
    penalties = [repetition_penalty(r) for r in replies]
    lengths = [len(words(r)) for r in replies]
    return {
        "bleu": corpus_bleu(replies, references),
        "reward_mean": sum(rewards) / len(rewards),
        "reward_total": sum(rewards),
        "penalty_mean": sum(penalties) / len(penalties),
        "penalty_total": sum(penalties),
        "distinct_1": distinct_n(replies, 1),
        "distinct_2": distinct_n(replies, 2),
        "mean_reply_words": sum(lengths) / len(lengths),
        "replies": len(replies),
    }
