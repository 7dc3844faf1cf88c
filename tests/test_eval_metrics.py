"""Metrics of the report card pinned on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from gpt2chat.evaluate.reply_metrics import (
    corpus_bleu,
    distinct_n,
    perplexity,
    preference_scores,
    repetition_penalty,
    reply_metrics,
    reward_words,
    words,
)
from gpt2chat.evaluate.scoring import score_sequences

# Every position predicts the same next-token distribution: p = (1/2, 1/4, 1/8, 1/8).
PROBS = torch.tensor([0.5, 0.25, 0.125, 0.125])


class FixedDistributionModel(torch.nn.Module):
    """A fake causal LM whose logits are log PROBS at every position, whatever the input."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, plan=None, select=None):
        batch, time = input_ids.shape
        logits = (PROBS.log() + self.dummy).expand(batch, time, len(PROBS)).clone()
        return logits if select is None else logits.flatten(0, 1)[select]


def test_perplexity_of_known_logprobs():
    # log p of tokens 1, 2, 0 = log(1/4 * 1/8 * 1/2) = log(1/64); ppl = 64 ** (1/3) = 4
    assert perplexity(math.log(1 / 64), 3) == pytest.approx(4.0)
    assert perplexity(0.0, 5) == 1.0
    with pytest.raises(ValueError):
        perplexity(-1.0, 0)


def test_score_sequences_shift_and_mask():
    model = FixedDistributionModel()
    # Second sequence is shorter (padding must not count) and scores only its last token.
    sequences = [[3, 1, 2, 0], [0, 3]]
    masks = [[1, 1, 1, 1], [0, 1]]  # mask[0] is ignored: nothing predicts the first token
    results = score_sequences(model, sequences, masks, batch_tokens=64, progress=False)
    assert results[0][1] == 3 and results[1][1] == 1
    assert results[0][0] == pytest.approx(math.log(1 / 64))
    assert results[1][0] == pytest.approx(math.log(0.125))
    assert perplexity(*results[0]) == pytest.approx(4.0)
    # batching (one sequence per batch) gives the same numbers
    one_by_one = score_sequences(model, sequences, masks, batch_tokens=1, progress=False)
    assert [c for _, c in one_by_one] == [c for _, c in results]
    assert [s for s, _ in one_by_one] == pytest.approx([s for s, _ in results])


def test_preference_accuracy_reference_free():
    # average log-prob: chosen -10/5=-2, -6/2=-3, -4/4=-1 ; rejected -9/3=-3, -4/2=-2, -2/2=-1
    scores = preference_scores([-10, -6, -4], [-9, -4, -2], chosen_counts=[5, 2, 4], rejected_counts=[3, 2, 2])
    assert scores.mode == "reference-free"
    assert scores.margins == pytest.approx((1.0, -1.0, 0.0))
    assert scores.accuracy == pytest.approx(1 / 3)  # the tie counts as wrong
    assert scores.ties == 1
    assert scores.mean_margin == pytest.approx(0.0)
    assert scores.mean_chosen_reward == pytest.approx(-2.0)


def test_preference_accuracy_dpo_against_reference():
    # reward = 0.5 * (policy - ref): chosen (-8 - -10) * .5 = 1, (-20 - -19) * .5 = -0.5
    #                               rejected (-12 - -11) * .5 = -0.5, (-15 - -16) * .5 = 0.5
    scores = preference_scores([-8, -20], [-12, -15], ref_chosen_logps=[-10, -19],
                               ref_rejected_logps=[-11, -16], beta=0.5)
    assert scores.mode == "dpo"
    assert scores.margins == pytest.approx((1.5, -1.0))
    assert scores.accuracy == 0.5
    assert scores.mean_margin == pytest.approx(0.25)
    with pytest.raises(ValueError):
        preference_scores([], [])
    with pytest.raises(ValueError):
        preference_scores([-1.0], [-2.0])  # reference-free needs counts


def test_bleu_identical_disjoint_and_hand_computed():
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert corpus_bleu(["alpha beta gamma delta"], ["one two three four"]) == pytest.approx(0.0)
    # precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty): BLEU = (1/12) ** (1/4)
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected, abs=1e-6)


def test_reward_and_penalty_on_a_crafted_reply():
    reply = "The the cat cat cat sat."
    reference = "The cat sat on the mat."
    assert words(reply) == ["the", "the", "cat", "cat", "cat", "sat"]
    assert reward_words(reply, reference) == 4  # the x2 (reference has 2), cat x1 (clipped from 3), sat
    assert repetition_penalty(reply) == 3  # the-the, cat-cat, cat-cat
    assert repetition_penalty("no repeats at all") == 0
    assert reward_words("", reference) == 0


def test_distinct_n_and_reply_metrics():
    assert distinct_n(["a b a", "a c"], 1) == pytest.approx(3 / 5)
    assert distinct_n(["a b a", "a c"], 2) == pytest.approx(1.0)
    assert distinct_n(["a a a"], 2) == pytest.approx(1 / 2)
    assert distinct_n([""], 1) == 0.0
    figures = reply_metrics(["the the cat", "hello"], ["the cat", "hello world"])
    assert figures["reward_total"] == 3 and figures["penalty_total"] == 1
    assert figures["mean_reply_words"] == pytest.approx(2.0)
    assert figures["replies"] == 2


def test_a_long_conversation_loses_its_oldest_turns_never_the_front_of_its_tokens(chat_tokenizer):
    """Perplexity's truncation is training's: the system message and the last exchange stay whole, the
    oldest turn goes; a reply that cannot fit at all is skipped, not scored from a cut-off middle."""
    from gpt2chat.data.types import Conversation
    from gpt2chat.evaluate.scoring import conversation_sets
    from gpt2chat.templates import render_chat

    system = {"role": "system", "content": "You are terse."}
    old = [{"role": "user", "content": "tell me a long story " * 20}, {"role": "assistant", "content": "no " * 40}]
    last = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    fits = render_chat(chat_tokenizer, [system, *last], template="llama3-context")[0]
    context = len(fits) + 10
    too_long = {"role": "assistant", "content": "word " * (2 * context)}
    conversations = [Conversation([system, *old, *last], "long"), Conversation([system, *last], "short"),
                     Conversation([system, last[0], too_long], "reply too long")]
    sets = conversation_sets(conversations, chat_tokenizer, "llama3-context", context)
    assistant = sets["assistant"]
    assert assistant.sources == ["long", "short"] and assistant.truncated == 1 and assistant.skipped == 1
    assert assistant.sequences[0] == list(fits) == assistant.sequences[1]
    assert sets["rendered"].sequences == assistant.sequences
    # one row set: the plain column skips the row the others cannot score, and every skip has its reason
    assert sets["plain"].sources == sets["rendered"].sources == ["long", "short"]
    for view in sets.values():
        assert view.skip_reasons == {"reply over max_length": 1}
    assert assistant.skipped_text() == "1 skipped: 1 reply over max_length"
