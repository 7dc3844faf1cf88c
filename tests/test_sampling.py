"""sampling.py and token_draw.py: validation, presets, the draw, and agreement with transformers' logits processors."""

from __future__ import annotations

import pytest
import torch

from gpt2chat.errors import Gpt2ChatError
from gpt2chat.sampling import (
    SAMPLING_PRESETS,
    SamplingParams,
    get_preset,
    process_logits,
    sample_next,
)
from gpt2chat.token_draw import seeded_uniforms

VOCAB = 1000


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", 2.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("max_new_tokens", 0),
        ("max_new_tokens", True),
        ("seed", "abc"),
        ("stop_token_ids", [-3]),
        ("logprobs", 21),
        ("logprobs", -1),
        ("prompt_logprobs", True),
        ("prompt_logprobs", 1.5),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(Gpt2ChatError, match=field):
        SamplingParams(**{field: value})


def test_params_normalise_and_replace():
    params = SamplingParams(stop_token_ids=[5, 7], temperature=1)
    assert params.stop_token_ids == (5, 7)
    assert isinstance(params.temperature, float)
    assert params.replace(temperature=0).greedy
    with pytest.raises(Gpt2ChatError, match="top_p"):
        params.replace(top_p=2)


def test_presets():
    assert SAMPLING_PRESETS["greedy"].greedy
    chat = get_preset("chat")  # seed 004's chatbot settings
    assert (chat.temperature, chat.top_k, chat.top_p) == (0.9, 30, 0.95)
    focused = get_preset("focused")  # seed 001's
    assert (focused.temperature, focused.top_k, focused.top_p) == (1.0, 35, 0.80)
    with pytest.raises(Gpt2ChatError, match="unknown sampling preset"):
        get_preset("nope")


def hf_scores(logits, input_ids, params: SamplingParams):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if not params.greedy:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
    return processors(input_ids, logits.clone())


CASES = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, repetition_penalty=1.3),
    SamplingParams(temperature=0.7),
    SamplingParams(top_k=30),
    SamplingParams(top_p=0.8),
    SamplingParams(temperature=0.9, top_k=30, top_p=0.95),
    SamplingParams(temperature=1.3, top_k=5, top_p=0.5, repetition_penalty=1.2),
    SamplingParams(top_p=0.3, repetition_penalty=0.8),
    SamplingParams(top_k=VOCAB + 10),
]


@pytest.mark.parametrize("params", CASES, ids=repr)
def test_processed_scores_equal_transformers(params):
    transformers = pytest.importorskip("transformers")
    del transformers
    torch.manual_seed(0)
    for trial in range(5):
        logits = torch.randn(4, VOCAB) * (1 + trial)
        input_ids = torch.randint(0, VOCAB, (4, 17))
        theirs = hf_scores(logits, input_ids, params)
        for seen in (input_ids, [row.tolist() for row in input_ids]):
            ours = process_logits(logits, seen, params)
            assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
            finite = torch.isfinite(theirs)
            torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)


def test_per_row_params_equal_row_by_row():
    torch.manual_seed(1)
    logits = torch.randn(len(CASES), VOCAB)
    input_ids = torch.randint(0, VOCAB, (len(CASES), 9))
    together = process_logits(logits, input_ids, CASES)
    for row, params in enumerate(CASES):
        alone = process_logits(logits[row : row + 1], input_ids[row : row + 1], params)
        assert torch.equal(together[row : row + 1], alone)


def test_greedy_is_argmax_and_penalty_changes_it():
    logits = torch.tensor([[1.0, 3.0, 2.0], [-1.0, -3.0, -2.0]])
    greedy = SamplingParams(temperature=0)
    assert sample_next(logits, None, greedy).tolist() == [1, 0]
    penalised = SamplingParams(temperature=0, repetition_penalty=2.0)
    # row 0: 3/2 = 1.5 < 2 -> token 2; row 1: -1*2 = -2 ties with token 2, argmax takes the first
    assert sample_next(logits, torch.tensor([[1], [0]]), penalised).tolist() == [2, 0]


def test_seeded_sampling_is_reproducible_and_respects_top_k():
    logits = torch.randn(3, VOCAB)
    params = SamplingParams(temperature=1.0, top_k=3, seed=123)
    allowed = torch.topk(logits, 3).indices
    draws = [[sample_next(logits, None, params, [step] * 3).tolist() for step in range(20)] for _ in range(2)]
    assert draws[0] == draws[1]
    assert len({tuple(step) for step in draws[0]}) > 1  # the draw number moves the uniform
    for step in draws[0]:
        for row, token in enumerate(step):
            assert token in allowed[row].tolist()


def test_sample_distribution_follows_softmax():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    counts = torch.zeros(3)
    params = SamplingParams(temperature=1.0, seed=0)
    for step in range(3000):
        counts[sample_next(logits, None, params, [step])[0]] += 1
    assert torch.allclose(counts / 3000, torch.tensor([0.5, 0.3, 0.2]), atol=0.04)


def test_seeded_uniforms_are_uniform_and_independent_per_seed():
    draws = torch.arange(20000)
    for seed in (0, 1, 2**40 + 7, -5):
        u = seeded_uniforms(torch.full_like(draws, seed), draws)
        assert 0 < u.min() and u.max() < 1
        assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.003
        histogram = torch.histc(u.float(), bins=10, min=0, max=1) / len(u)
        assert torch.allclose(histogram, torch.full((10,), 0.1), atol=0.01)
    a = seeded_uniforms(torch.zeros_like(draws), draws)
    b = seeded_uniforms(torch.ones_like(draws), draws)
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.03
    lag = torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1]  # consecutive draws of one seed
    assert abs(lag) < 0.03


def test_mixed_rows_and_per_row_seeds():
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB)
    rows = [SamplingParams(temperature=0), SamplingParams(top_k=5, seed=1), SamplingParams(top_k=5, seed=2)]
    first = sample_next(logits, None, rows, [4, 4, 4])
    assert torch.equal(first, sample_next(logits, None, rows, [4, 4, 4]))
    assert first[0] == logits[0].argmax()
    # each row's draw depends only on its own seed and draw number, not on the rows beside it
    alone = sample_next(logits[1:2], None, rows[1], [4])
    assert alone[0] == first[1]
    reordered = sample_next(logits[[2, 1]], None, [rows[2], rows[1]], [4, 4])
    assert reordered.tolist() == [first[2], first[1]]


def test_unseeded_rows_use_the_global_generator():
    """Unseeded rows take one uniform each from torch's global generator: `torch.manual_seed` repeats them.
    (They no longer equal `torch.multinomial`'s tokens, the draw transformers makes: that one draws an
    exponential per vocabulary entry, ~1 ms a row on a CPU; the distribution is still transformers', as
    test_processed_scores_equal_transformers and the frequency tests below check.)"""
    torch.manual_seed(0)
    logits = torch.randn(2, VOCAB)
    for params in (SamplingParams(top_k=50), SamplingParams(top_p=0.9), SamplingParams()):
        torch.manual_seed(9)
        first = [sample_next(logits, None, params).tolist() for _ in range(5)]
        torch.manual_seed(9)
        assert [sample_next(logits, None, params).tolist() for _ in range(5)] == first
        assert len({tuple(t) for t in first}) > 1  # the generator moves on between draws


def draw_frequencies(logits_row, params, draws=20000):
    """Frequencies of `draws` seeded draws from one row of logits (one call: the row repeated, a seed each)."""
    logits = logits_row.expand(draws, -1).contiguous()
    rows = [params.replace(seed=seed) for seed in range(draws)]
    tokens = sample_next(logits, None, rows, [0] * draws)
    return torch.bincount(tokens, minlength=logits.size(-1)).double() / draws


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7),  # the whole vocabulary: the two-level draw
    SamplingParams(top_k=7),
    SamplingParams(top_p=0.6),  # candidates 64, then 1024 (the 637 tokens: a sort) until they hold the nucleus
    SamplingParams(temperature=1.3, top_k=40, top_p=0.9),
], ids=repr)
def test_draw_frequencies_follow_the_processed_distribution(params):
    torch.manual_seed(3)
    vocab = 300 * 2 + 37  # not a whole number of the draw's 256-token blocks
    logits = torch.randn(1, vocab) * 2
    logits[0, 100:356] = float("-inf")  # a whole masked block and a part of the next: never drawn
    expected = torch.softmax(process_logits(logits, None, params)[0].double(), dim=-1)
    freq = draw_frequencies(logits[0], params)
    assert freq[expected == 0].sum() == 0
    assert 0.5 * (freq - expected).abs().sum() < 0.03  # total variation, sampling noise ~0.01-0.02


def test_whole_vocabulary_draw_inverts_the_float64_cdf():
    """The two-level draw picks the token a float64 cumsum over the whole vocabulary picks, for any uniform,
    including the extremes (the first token with mass for ~0, the last with mass for 1)."""
    from gpt2chat.token_draw import vocabulary_draw

    torch.manual_seed(4)
    scores = torch.randn(3, 1000) * 3
    scores[:, :5] = float("-inf")
    scores[:, -300:] = float("-inf")  # the tail block and a whole block before it have no mass
    uniforms = torch.cat([torch.rand(500, dtype=torch.float64), torch.tensor([1e-300, 1.0], dtype=torch.float64)])
    cdf = torch.softmax(scores, dim=-1).double().cumsum(-1)
    for u in uniforms:
        u3 = u.expand(3).contiguous()
        ours = vocabulary_draw(scores, u3)
        theirs = torch.searchsorted(cdf, (u3[:, None] * cdf[:, -1:])).squeeze(1)
        assert torch.equal(ours, theirs), float(u)
        assert torch.isfinite(scores.gather(1, ours[:, None])).all()


def test_top_k_keeps_every_token_tied_with_the_kth_like_transformers():
    pytest.importorskip("transformers")
    logits = (torch.randn(4, VOCAB) * 2).round()  # integers: many ties at any k-th score
    logits[3] = float("-inf")
    logits[3, :3] = torch.tensor([1.0, 2.0, 3.0])  # fewer finite scores than k (a grammar's mask): no tie
    ids = torch.zeros(4, 1, dtype=torch.long)
    params = SamplingParams(top_k=10)
    theirs, ours = hf_scores(logits, ids, params), process_logits(logits, None, params)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert (torch.isfinite(theirs[:3]).sum(-1) > 10).any()  # ties were kept
    finite = torch.isfinite(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite])
    # top-p then cuts through tied tokens, and which of them it keeps is the order a sort left them in (HF's
    # too): the same number of tokens with the same scores
    params = SamplingParams(top_k=10, top_p=0.7, temperature=0.8)
    theirs, ours = hf_scores(logits, ids, params), process_logits(logits, None, params)
    for row in range(4):
        kept_theirs, kept_ours = theirs[row][torch.isfinite(theirs[row])], ours[row][torch.isfinite(ours[row])]
        assert torch.equal(kept_ours.sort().values, kept_theirs.sort().values)


def test_per_row_seeds_sample_each_rows_distribution_and_never_a_masked_token():
    """The batched engine's path (rows with their own seeds) draws from each row's own distribution."""
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0], [0.0, 0.0, 0.1, 0.0, 0.9]])
    logits = torch.log(probs.clamp_min(1e-38)).masked_fill(probs == 0, float("-inf"))
    rows = [SamplingParams(temperature=1.0, seed=11), SamplingParams(temperature=1.0, seed=12)]
    counts = torch.zeros(2, 5)
    for step in range(800):
        draw = sample_next(logits, None, rows, [step, step])
        counts[0, draw[0]] += 1
        counts[1, draw[1]] += 1
    assert counts[:, [3]].sum() == 0 and counts[0, 4] == 0 and counts[1, :2].sum() == 0
    assert torch.allclose(counts / 800, probs, atol=0.06)


@pytest.mark.parametrize("scale", [8.0, 3.0, 0.5])  # nucleus inside 64 tokens, inside 1024, past 1024 (a sort)
def test_top_p_candidates_grow_until_they_hold_the_nucleus_like_transformers(scale):
    pytest.importorskip("transformers")
    torch.manual_seed(5)
    logits = torch.randn(3, 5000) * scale
    params = SamplingParams(top_p=0.9)
    theirs = hf_scores(logits, torch.zeros(3, 1, dtype=torch.long), params)
    ours = process_logits(logits, None, params)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    kept = int(torch.isfinite(theirs).sum(-1).max())
    assert kept <= 64 if scale == 8.0 else (64 < kept <= 1024 if scale == 3.0 else kept > 1024)
