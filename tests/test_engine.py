"""engine.py: greedy equals transformers' generate, several rows, streaming, stops, limits, batching."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from gpt2chat.engine import BatchedEngine, Engine, QueueFullError
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=24)
PROMPTS = [
    [464, 2068, 7586, 21831],
    [40, 1101],
    [15496, 11, 995, 0, 314, 716, 257, 1332, 13, 50256, 198],
    [7],
]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from gpt2chat.checkpoint import load_model

    model, _ = load_model(tiny_checkpoint, device="cpu")
    return model


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model)


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()


def hf_generate(hf_model, prompt, max_new_tokens, eos=None, **kwargs):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            eos_token_id=eos, pad_token_id=0, **kwargs,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def test_greedy_equals_transformers(engine, hf_model):
    for prompt in PROMPTS:
        theirs = hf_generate(hf_model, prompt, GREEDY.max_new_tokens, do_sample=False)
        ours = engine.generate([prompt], GREEDY)[0]
        assert ours.token_ids == theirs
        assert ours.finish_reason == "length"


def test_repetition_penalty_greedy_equals_transformers(engine, hf_model):
    params = GREEDY.replace(repetition_penalty=1.5, max_new_tokens=30)
    for prompt in PROMPTS[:2]:
        theirs = hf_generate(hf_model, prompt, 30, do_sample=False, repetition_penalty=1.5)
        assert engine.generate([prompt], params)[0].token_ids == theirs


def test_seeded_sampling_equals_transformers_and_repeats(engine, hf_model):
    params = SamplingParams(temperature=0.9, top_k=30, top_p=0.95, max_new_tokens=20)
    prompt = PROMPTS[0]
    torch.manual_seed(7)
    theirs = hf_generate(hf_model, prompt, 20, do_sample=True, temperature=0.9, top_k=30, top_p=0.95)
    torch.manual_seed(7)  # seed=None draws from the global generator, as transformers does
    assert engine.generate([prompt], params)[0].token_ids == theirs

    seeded = params.replace(seed=123)
    first = engine.generate([prompt], seeded)[0].token_ids
    assert engine.generate([prompt], seeded)[0].token_ids == first
    assert list(engine.stream(prompt, seeded)) == first


def test_rows_of_different_lengths_equal_single_rows(engine):
    together = engine.generate(PROMPTS, GREEDY)
    for prompt, result in zip(PROMPTS, together, strict=True):
        assert result.token_ids == engine.generate([prompt], GREEDY)[0].token_ids
        assert result.prompt_tokens == len(prompt)


def test_stop_token_ends_row_and_is_not_output(engine):
    full = engine.generate([PROMPTS[0]], GREEDY)[0].token_ids
    stop = full[5]
    cut = full.index(stop)
    results = engine.generate([PROMPTS[0], PROMPTS[1]], GREEDY.replace(stop_token_ids=(stop,)))
    assert results[0].token_ids == full[:cut]
    assert results[0].finish_reason == "stop"
    # the other row is unaffected by the first one finishing early (unless it meets the stop token too)
    other = engine.generate([PROMPTS[1]], GREEDY)[0].token_ids
    expected = other[: other.index(stop)] if stop in other else other
    assert results[1].token_ids == expected


def test_stream_matches_generate_and_reports_finish(engine):
    stream = engine.stream(PROMPTS[2], GREEDY)
    assert stream.finish_reason is None
    tokens = list(stream)
    assert tokens == engine.generate([PROMPTS[2]], GREEDY)[0].token_ids
    assert stream.finish_reason == "length"
    assert stream.completion_tokens == GREEDY.max_new_tokens


def test_interleaved_streams_do_not_share_cache(engine):
    a, b = engine.stream(PROMPTS[0], GREEDY), engine.stream(PROMPTS[1], GREEDY)
    got_a, got_b = [], []
    for token_a, token_b in zip(a, b, strict=True):
        got_a.append(token_a)
        got_b.append(token_b)
    assert got_a == engine.generate([PROMPTS[0]], GREEDY)[0].token_ids
    assert got_b == engine.generate([PROMPTS[1]], GREEDY)[0].token_ids


def test_context_limit_gives_length(engine):
    context = engine.config.n_positions
    prompt = [11] * (context - 5)
    result = engine.generate([prompt, [11]], GREEDY)
    assert len(result[0].token_ids) == 5 and result[0].finish_reason == "length"
    assert len(result[1].token_ids) == GREEDY.max_new_tokens


@pytest.mark.parametrize("length", [256, 300])
def test_prompt_longer_than_context_is_refused(engine, length):
    with pytest.raises(Gpt2ChatError, match=rf"{length} tokens.*context is 256"):
        engine.generate([[11] * length], GREEDY)


def test_bad_prompts(engine):
    with pytest.raises(Gpt2ChatError, match="empty"):
        engine.generate([[]], GREEDY)
    with pytest.raises(Gpt2ChatError, match="vocabulary"):
        engine.generate([[10**7]], GREEDY)


# ---------------------------------------------------------------------- continuous batching


def test_batched_greedy_equals_single(model, engine):
    requests_spec = [
        (p, GREEDY.replace(max_new_tokens=n))
        for p, n in zip(PROMPTS * 2, [24, 9, 17, 30, 5, 24, 12, 20], strict=True)
    ]
    expected = [engine.generate([p], params)[0].token_ids for p, params in requests_spec]
    with BatchedEngine(model, max_batch_size=3) as batched:
        requests = [batched.submit(p, params) for p, params in requests_spec]
        outputs = [list(request) for request in requests]
        assert outputs == expected
        assert all(r.finish_reason == "length" for r in requests)
        assert [r.completion_tokens for r in requests] == [len(e) for e in expected]
        assert [r.prompt_tokens for r in requests] == [len(p) for p, _ in requests_spec]
        deadline = time.time() + 5
        while batched.active_count and time.time() < deadline:
            time.sleep(0.01)
        assert batched.active_count == 0


def test_batched_stop_token_and_seeded_sampling(model, engine):
    full = engine.generate([PROMPTS[0]], GREEDY)[0].token_ids
    stop_params = GREEDY.replace(stop_token_ids=(full[3],))
    sampled = SamplingParams(temperature=1.0, top_k=20, seed=5, max_new_tokens=15)
    with BatchedEngine(model, max_batch_size=4) as batched:
        stopping = batched.submit(PROMPTS[0], stop_params)
        sampling = [batched.submit(PROMPTS[1], sampled) for _ in range(2)]
        assert list(stopping) == full[: full.index(full[3])]
        assert stopping.finish_reason == "stop"
        draws = [list(r) for r in sampling]
    assert draws[0] == draws[1] == engine.generate([PROMPTS[1]], sampled)[0].token_ids


def test_cancel_frees_the_slot(model):
    long = SamplingParams(temperature=0, max_new_tokens=200)
    with BatchedEngine(model, max_batch_size=1) as batched:
        first = batched.submit(PROMPTS[0], long)
        iterator = iter(first)
        next(iterator)
        waiting = batched.submit(PROMPTS[1], GREEDY)
        first.cancel()
        rest = list(iterator)
        assert first.finish_reason == "cancelled"
        assert len(rest) < 199
        # the waiting request gets the freed row and completes
        assert len(list(waiting)) == GREEDY.max_new_tokens
        assert waiting.finish_reason == "length"


def test_queue_full_raises(model):
    long = SamplingParams(temperature=0, max_new_tokens=240)
    with BatchedEngine(model, max_batch_size=1, max_queue=1) as batched:
        running = batched.submit([11], long)
        next(iter(running))  # admitted: it holds the only row
        queued = batched.submit([12], GREEDY)
        with pytest.raises(QueueFullError, match="queue is full"):
            batched.submit([13], GREEDY)
        assert isinstance(QueueFullError("x"), Gpt2ChatError)
        running.cancel()
        assert len(list(queued)) == GREEDY.max_new_tokens


def test_submit_refuses_bad_prompt(model):
    with BatchedEngine(model, max_batch_size=1) as batched:
        with pytest.raises(Gpt2ChatError, match="context"):
            batched.submit([11] * 400, GREEDY)


def test_async_iteration_gives_the_same_tokens(model, engine):
    expected = [engine.generate([p], GREEDY)[0].token_ids for p in PROMPTS]

    async def main(batched):
        async def collect(prompt):
            return [token async for token in batched.submit(prompt, GREEDY)]

        return await asyncio.gather(*(collect(p) for p in PROMPTS))

    with BatchedEngine(model, max_batch_size=2) as batched:
        assert asyncio.run(main(batched)) == expected


def test_async_iteration_does_not_block_the_loop(model):
    """While one coroutine waits for tokens, others run: here one cancels the stream mid-way. If waiting
    blocked the event loop, the consumer would run to the end (240 tokens) before the canceller ran."""
    long = SamplingParams(temperature=0, max_new_tokens=240)

    async def main(batched):
        request = batched.submit([11], long)
        got: list[int] = []

        async def consume():
            async for token in request:
                got.append(token)

        task = asyncio.create_task(consume())
        while len(got) < 3 and not task.done():
            await asyncio.sleep(0.001)
        seen_while_running = len(got)
        request.cancel()
        await task
        return seen_while_running, got, request.finish_reason

    with BatchedEngine(model, max_batch_size=1) as batched:
        seen, got, reason = asyncio.run(main(batched))
    assert 3 <= seen < long.max_new_tokens
    assert reason == "cancelled" and len(got) < long.max_new_tokens


def test_close_cancels_unfinished(model):
    batched = BatchedEngine(model, max_batch_size=1)
    requests = [
        batched.submit(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=200)) for _ in range(3)
    ]
    batched.close()
    for request in requests:
        list(request)  # ends instead of blocking
        assert request.finish_reason in ("cancelled", "length")
    assert requests[-1].finish_reason == "cancelled"
    with pytest.raises(Gpt2ChatError, match="closed"):
        batched.submit(PROMPTS[0], GREEDY)


def test_decode_layout_keeps_values_and_saving_works(tmp_path, tiny_checkpoint):
    from gpt2chat.checkpoint import load_model, save_pretrained

    model, tokenizer = load_model(tiny_checkpoint, device="cpu")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    plain = Engine(load_model(tiny_checkpoint, device="cpu")[0], decode_layout=False)
    engine = Engine(model)  # CPU fp32: Linear weights re-strided
    assert not model.transformer.h[0].mlp.c_fc.weight.is_contiguous()
    assert model.lm_head.weight is model.transformer.wte.weight
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert engine.generate(PROMPTS, GREEDY)[0].token_ids == plain.generate(PROMPTS, GREEDY)[0].token_ids
    save_pretrained(model, tokenizer, tmp_path / "again")
    reloaded, _ = load_model(tmp_path / "again", device="cpu")
    for name, p in reloaded.named_parameters():
        assert torch.equal(p, before[name]), name


# ---------------------------------------------------------------------- logprobs and timing


def reference_logprobs(model, prompt, tokens):
    """log_softmax of the model's logits over prompt + reply in one plain forward (no cache)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0]
    return torch.log_softmax(logits.float(), dim=-1)


def assert_entry(entry, logp_row, token, k):
    assert entry.token_id == token
    assert entry.logprob == pytest.approx(float(logp_row[token]), abs=1e-4)
    assert len(entry.top) == k
    values, ids = logp_row.topk(k)
    assert [t for t, _ in entry.top] == ids.tolist()
    assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)


@pytest.mark.parametrize("params", [
    GREEDY.replace(logprobs=3, prompt_logprobs=2),
    # sampled with a penalty: the logprobs are still those of the raw distribution
    SamplingParams(temperature=1.3, top_k=5, repetition_penalty=1.5, seed=3, max_new_tokens=12,
                   logprobs=0, prompt_logprobs=0),
], ids=["greedy", "sampled"])  # fmt: skip
def test_logprobs_equal_log_softmax_of_the_models_logits(model, engine, params):
    prompt = PROMPTS[2]
    (result,) = engine.generate([prompt], params)
    logp = reference_logprobs(model, prompt, result.token_ids)
    assert len(result.logprobs) == len(result.token_ids) == params.max_new_tokens
    for i, (entry, token) in enumerate(zip(result.logprobs, result.token_ids, strict=True)):
        assert_entry(entry, logp[len(prompt) - 1 + i], token, params.logprobs)
    assert len(result.prompt_logprobs) == len(prompt) and result.prompt_logprobs[0] is None
    for i in range(1, len(prompt)):
        assert_entry(result.prompt_logprobs[i], logp[i - 1], prompt[i], params.prompt_logprobs)
    stream = engine.stream(prompt, params)
    assert list(stream) == result.token_ids
    assert [e.logprob for e in stream.logprobs] == pytest.approx(
        [e.logprob for e in result.logprobs], abs=1e-5
    )
    assert len(stream.prompt_logprobs) == len(prompt)


def test_logprobs_off_by_default_and_stop_token_has_no_entry(engine):
    assert engine.generate([PROMPTS[0]], GREEDY)[0].logprobs == []
    full = engine.generate([PROMPTS[0]], GREEDY)[0].token_ids
    params = GREEDY.replace(stop_token_ids=(full[4],), logprobs=1)
    (result,) = engine.generate([PROMPTS[0]], params)
    assert result.finish_reason == "stop"
    assert [e.token_id for e in result.logprobs] == result.token_ids == full[: full.index(full[4])]
    assert result.prompt_logprobs == []


def test_batched_logprobs_arrive_before_their_token(model, engine):
    params = GREEDY.replace(logprobs=2, prompt_logprobs=1, max_new_tokens=10)
    expected = engine.generate([PROMPTS[0]], params)[0]
    with BatchedEngine(model, max_batch_size=2) as batched:
        other = batched.submit(PROMPTS[1], GREEDY)  # shares the decode steps, asks for nothing
        request = batched.submit(PROMPTS[0], params)
        tokens = []
        for token in request:
            assert len(request.prompt_logprobs) == len(PROMPTS[0])
            assert len(request.logprobs) > len(tokens) and request.logprobs[len(tokens)].token_id == token
            tokens.append(token)
        list(other)
    assert tokens == expected.token_ids
    assert [e.logprob for e in request.logprobs] == pytest.approx(
        [e.logprob for e in expected.logprobs], abs=1e-4
    )
    assert [e.top for e in request.prompt_logprobs[1:]] == [e.top for e in expected.prompt_logprobs[1:]]
    assert other.logprobs == [] and other.prompt_logprobs == []


def test_timing_counts_from_submit_including_the_wait_for_a_row(model):
    with BatchedEngine(model, max_batch_size=1) as batched:
        first = batched.submit(PROMPTS[0], GREEDY.replace(max_new_tokens=40))
        second = batched.submit(PROMPTS[1], GREEDY)
        list(first), list(second)
    for request in (first, second):
        assert request.ttft_s > 0 and request.decode_s > 0
    # the second request got its row only after the first one's last token
    first_last = first.submitted_at + first.ttft_s + first.decode_s
    assert second.submitted_at + second.ttft_s >= first_last
    start = time.perf_counter()
    (result,) = Engine(model).generate([PROMPTS[0]], GREEDY)
    wall = time.perf_counter() - start
    assert 0 < result.ttft_s < wall and 0 < result.decode_s < wall


def test_counters(model):
    long = SamplingParams(temperature=0, max_new_tokens=200)
    with BatchedEngine(model, max_batch_size=1, max_queue=4) as batched:
        assert (batched.active_count, batched.pending_count, batched.max_batch_size) == (0, 0, 1)
        running = batched.submit([11], long)
        next(iter(running))
        waiting = batched.submit([12], GREEDY)
        assert batched.active_count == 1 and batched.pending_count == 1
        running.cancel()
        list(waiting)
