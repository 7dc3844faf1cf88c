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
def engine(tiny_model):
    return Engine(tiny_model)


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


def test_sampling_repeats_under_manual_seed_and_with_a_seed(engine):
    # seed=None draws from torch's global generator: torch.manual_seed repeats it. (It no longer equals
    # transformers' sampled tokens: its torch.multinomial draws one exponential per vocabulary entry, ~1 ms a
    # row; ours inverts the candidates' CDF with one uniform. The distribution is transformers': see
    # test_sampling.test_processed_scores_equal_transformers and the frequency tests there.)
    params = SamplingParams(temperature=0.9, top_k=30, top_p=0.95, max_new_tokens=20)
    prompt = PROMPTS[0]
    torch.manual_seed(7)
    first = engine.generate([prompt], params)[0].token_ids
    torch.manual_seed(7)
    assert engine.generate([prompt], params)[0].token_ids == first

    seeded = params.replace(seed=123)
    first = engine.generate([prompt], seeded)[0].token_ids
    assert engine.generate([prompt], seeded)[0].token_ids == first
    assert list(engine.submit(prompt, seeded)) == first


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
    stream = engine.submit(PROMPTS[2], GREEDY)
    assert stream.finish_reason is None
    tokens = list(stream)
    assert tokens == engine.generate([PROMPTS[2]], GREEDY)[0].token_ids
    assert stream.finish_reason == "length"
    assert stream.completion_tokens == GREEDY.max_new_tokens


def test_interleaved_streams_do_not_share_cache(engine):
    a, b = iter(engine.submit(PROMPTS[0], GREEDY)), iter(engine.submit(PROMPTS[1], GREEDY))
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


def test_batched_greedy_equals_single(tiny_model, engine):
    requests_spec = [
        (p, GREEDY.replace(max_new_tokens=n))
        for p, n in zip(PROMPTS * 2, [24, 9, 17, 30, 5, 24, 12, 20], strict=True)
    ]
    expected = [engine.generate([p], params)[0].token_ids for p, params in requests_spec]
    with BatchedEngine(tiny_model, max_batch_size=3) as batched:
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


def test_batched_stop_token_and_seeded_sampling(tiny_model, engine):
    full = engine.generate([PROMPTS[0]], GREEDY)[0].token_ids
    stop_params = GREEDY.replace(stop_token_ids=(full[3],))
    sampled = SamplingParams(temperature=1.0, top_k=20, seed=5, max_new_tokens=15)
    with BatchedEngine(tiny_model, max_batch_size=4) as batched:
        stopping = batched.submit(PROMPTS[0], stop_params)
        sampling = [batched.submit(PROMPTS[1], sampled) for _ in range(2)]
        assert list(stopping) == full[: full.index(full[3])]
        assert stopping.finish_reason == "stop"
        draws = [list(r) for r in sampling]
    assert draws[0] == draws[1] == engine.generate([PROMPTS[1]], sampled)[0].token_ids


def test_cancel_frees_the_slot(tiny_model):
    long = SamplingParams(temperature=0, max_new_tokens=200)
    with BatchedEngine(tiny_model, max_batch_size=1) as batched:
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


def test_a_free_row_takes_a_request_even_with_no_queue(tiny_model):
    with BatchedEngine(tiny_model, max_batch_size=1, max_queue=0) as batched:
        first = batched.submit([11], SamplingParams(temperature=0, max_new_tokens=200))
        next(iter(first))
        with pytest.raises(QueueFullError):
            batched.submit([12], GREEDY)
        first.cancel()
        first.wait(5)
        assert len(list(batched.submit([12], GREEDY))) == GREEDY.max_new_tokens


def test_queue_full_raises(tiny_model):
    long = SamplingParams(temperature=0, max_new_tokens=240)
    with BatchedEngine(tiny_model, max_batch_size=1, max_queue=1) as batched:
        running = batched.submit([11], long)
        next(iter(running))  # admitted: it holds the only row
        queued = batched.submit([12], GREEDY)
        with pytest.raises(QueueFullError, match="queue is full"):
            batched.submit([13], GREEDY)
        assert isinstance(QueueFullError("x"), Gpt2ChatError)
        running.cancel()
        assert len(list(queued)) == GREEDY.max_new_tokens


def test_submit_refuses_bad_prompt(tiny_model):
    with BatchedEngine(tiny_model, max_batch_size=1) as batched:
        with pytest.raises(Gpt2ChatError, match="context"):
            batched.submit([11] * 400, GREEDY)


def test_async_iteration_gives_the_same_tokens(tiny_model, engine):
    expected = [engine.generate([p], GREEDY)[0].token_ids for p in PROMPTS]

    async def main(batched):
        async def collect(prompt):
            return [token async for token in batched.submit(prompt, GREEDY)]

        return await asyncio.gather(*(collect(p) for p in PROMPTS))

    with BatchedEngine(tiny_model, max_batch_size=2) as batched:
        assert asyncio.run(main(batched)) == expected


def test_async_iteration_does_not_block_the_loop(tiny_model):
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

    with BatchedEngine(tiny_model, max_batch_size=1) as batched:
        seen, got, reason = asyncio.run(main(batched))
    assert 3 <= seen < long.max_new_tokens
    assert reason == "cancelled" and len(got) < long.max_new_tokens


def test_close_cancels_unfinished(tiny_model):
    batched = BatchedEngine(tiny_model, max_batch_size=1)
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


def test_building_and_using_an_engine_leaves_the_model_as_it_was(tiny_checkpoint):
    from gpt2chat.checkpoint import load_model

    tiny_model, _ = load_model(tiny_checkpoint, device="cpu")
    before = {name: (p.detach().clone(), p.data_ptr(), p.stride()) for name, p in tiny_model.named_parameters()}
    Engine(tiny_model).generate(PROMPTS, GREEDY)
    with BatchedEngine(tiny_model, max_batch_size=2) as batched:
        list(batched.submit(PROMPTS[0], GREEDY))
    for name, p in tiny_model.named_parameters():
        value, pointer, stride = before[name]
        assert torch.equal(p, value) and p.data_ptr() == pointer and p.stride() == stride, name
    assert not tiny_model.training and tiny_model.lm_head.weight is tiny_model.transformer.wte.weight


# ---------------------------------------------------------------------- logprobs and timing


def reference_logprobs(tiny_model, prompt, tokens):
    """log_softmax of the tiny_model's logits over prompt + reply in one plain forward (no cache)."""
    with torch.no_grad():
        logits = tiny_model(torch.tensor([prompt + tokens]))[0]
    return torch.log_softmax(logits.float(), dim=-1)


def assert_same_entries(ours, theirs):
    assert [(e.token_id, [t for t, _ in e.top]) for e in ours] == [
        (e.token_id, [t for t, _ in e.top]) for e in theirs
    ]
    values = [[e.logprob, *(v for _, v in e.top)] for e in ours]
    assert values == [pytest.approx([e.logprob, *(v for _, v in e.top)], abs=1e-4) for e in theirs]


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
def test_logprobs_equal_log_softmax_of_the_models_logits(tiny_model, engine, params):
    prompt = PROMPTS[2]
    (result,) = engine.generate([prompt], params)
    logp = reference_logprobs(tiny_model, prompt, result.token_ids)
    assert len(result.logprobs) == len(result.token_ids) == params.max_new_tokens
    for i, (entry, token) in enumerate(zip(result.logprobs, result.token_ids, strict=True)):
        assert_entry(entry, logp[len(prompt) - 1 + i], token, params.logprobs)
    assert len(result.prompt_logprobs) == len(prompt) and result.prompt_logprobs[0] is None
    for i in range(1, len(prompt)):
        assert_entry(result.prompt_logprobs[i], logp[i - 1], prompt[i], params.prompt_logprobs)
    stream = engine.submit(prompt, params)
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


def test_batched_logprobs_arrive_before_their_token(tiny_model, engine):
    params = GREEDY.replace(logprobs=2, prompt_logprobs=1, max_new_tokens=10)
    expected = engine.generate([PROMPTS[0]], params)[0]
    with BatchedEngine(tiny_model, max_batch_size=2) as batched:
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
    assert_same_entries(request.prompt_logprobs[1:], expected.prompt_logprobs[1:])
    assert other.logprobs == [] and other.prompt_logprobs == []


def test_timing_counts_from_submit_including_the_wait_for_a_row(tiny_model):
    with BatchedEngine(tiny_model, max_batch_size=1) as batched:
        first = batched.submit(PROMPTS[0], GREEDY.replace(max_new_tokens=40))
        second = batched.submit(PROMPTS[1], GREEDY)
        list(first), list(second)
    for request in (first, second):
        assert request.ttft_s > 0 and request.decode_s > 0
    # the second request got its row only after the first one's last token
    first_last = first.submitted_at + first.ttft_s + first.decode_s
    assert second.submitted_at + second.ttft_s >= first_last
    start = time.perf_counter()
    (result,) = Engine(tiny_model).generate([PROMPTS[0]], GREEDY)
    wall = time.perf_counter() - start
    assert 0 < result.ttft_s < wall and 0 < result.decode_s < wall


def test_counters(tiny_model):
    long = SamplingParams(temperature=0, max_new_tokens=200)
    with BatchedEngine(tiny_model, max_batch_size=1, max_queue=4) as batched:
        assert (batched.active_count, batched.pending_count, batched.max_batch_size) == (0, 0, 1)
        running = batched.submit([11], long)
        next(iter(running))
        waiting = batched.submit([12], GREEDY)
        assert batched.active_count == 1 and batched.pending_count == 1
        running.cancel()
        list(waiting)


# ---------------------------------------------------------------------- the scheduler


def test_chunked_prefill_equals_whole_prefill(tiny_model, engine):
    params = GREEDY.replace(logprobs=2, prompt_logprobs=2)
    whole = engine.generate(PROMPTS, params)
    chunked = Engine(tiny_model, prefill_tokens=3).generate(PROMPTS, params)  # every prompt over several steps
    for a, b in zip(whole, chunked, strict=True):
        assert a.token_ids == b.token_ids
        assert [e.logprob for e in a.logprobs] == pytest.approx([e.logprob for e in b.logprobs], abs=1e-4)
        assert a.prompt_logprobs[0] is None and b.prompt_logprobs[0] is None
        assert_same_entries(a.prompt_logprobs[1:], b.prompt_logprobs[1:])


def test_a_long_prompt_is_prefilled_in_chunks_while_a_stream_keeps_decoding(tiny_model, engine):
    long_prompt = [(7 * i) % 500 for i in range(200)]
    expected = engine.generate([long_prompt], GREEDY)[0].token_ids
    chunked = Engine(tiny_model, prefill_tokens=8)
    running = iter(chunked.submit(PROMPTS[0], GREEDY))
    first = [next(running)]
    waiting = chunked.submit(long_prompt, GREEDY)
    for _ in range(10):  # each next() is one step: one token for the stream, 8 prompt tokens for the other
        first.append(next(running))
    assert waiting.token_ids == [] and waiting.first_token_at is None
    first += list(running)
    assert first == engine.generate([PROMPTS[0]], GREEDY)[0].token_ids
    while not waiting.done:
        chunked.step()
    assert waiting.token_ids == expected


def test_new_prompts_of_different_lengths_are_prefilled_in_one_forward(tiny_model, engine):
    prefills = []
    hook = tiny_model.register_forward_hook(
        lambda module, args, out: prefills.append(args[0].shape) if args[0].shape[-1] > 1 else None
    )
    try:
        together = Engine(tiny_model, max_batch_size=4).generate(PROMPTS, GREEDY.replace(max_new_tokens=3))
    finally:
        hook.remove()
    assert prefills == [(1, sum(len(p) for p in PROMPTS))]  # one packed row, no padding
    assert [r.token_ids for r in together] == [
        r.token_ids for r in engine.generate(PROMPTS, GREEDY.replace(max_new_tokens=3))
    ]


def test_more_prompts_than_rows_queue_and_equal_single_rows(tiny_model, engine):
    mixed = [GREEDY, GREEDY.replace(repetition_penalty=1.4), SamplingParams(top_k=8, seed=4, max_new_tokens=24),
             GREEDY.replace(max_new_tokens=7)] * 2  # fmt: skip
    prompts = PROMPTS * 2
    small = Engine(tiny_model, max_batch_size=3)
    together = small.generate(prompts, mixed)
    for prompt, params, result in zip(prompts, mixed, together, strict=True):
        assert result.token_ids == engine.generate([prompt], params)[0].token_ids
    assert small.scheduler.active_count == 0 and small.scheduler.pending_count == 0


def test_closed_stream_frees_its_row_at_once(tiny_model):
    engine = Engine(tiny_model, max_batch_size=1)
    stream = engine.submit(PROMPTS[0], GREEDY)
    tokens = iter(stream)
    next(tokens)
    assert engine.scheduler.active_count == 1
    stream.cancel()
    assert engine.scheduler.active_count == 0 and stream.finish_reason == "cancelled"
    assert list(tokens) == []
    abandoned = iter(engine.submit(PROMPTS[1], GREEDY))
    next(abandoned)
    del abandoned  # dropped unread: the reader is closed, which cancels the request and frees its row
    assert engine.scheduler.active_count == 0
    assert engine.generate([PROMPTS[2]], GREEDY)[0].token_ids
    assert engine.scheduler.active_count == 0


def test_finished_or_cancelled_batched_row_is_free_when_the_request_ends(tiny_model):
    long = SamplingParams(temperature=0, max_new_tokens=200)
    with BatchedEngine(tiny_model, max_batch_size=2) as batched:
        done = batched.submit(PROMPTS[0], GREEDY)
        list(done)
        assert batched.active_count == 0  # the row is freed before the end of the stream is delivered
        running = batched.submit(PROMPTS[1], long)
        next(iter(running))
        running.cancel()
        assert running.wait(5) and running.finish_reason == "cancelled"
        assert batched.active_count == 0
        assert running.completion_tokens < long.max_new_tokens


def fail_once(owner, name: str) -> None:
    """Make `owner.name(...)` raise RuntimeError("boom") once, then work again."""
    method = getattr(owner, name)

    def failing(*args, **kwargs):
        setattr(owner, name, method)
        raise RuntimeError("boom")

    setattr(owner, name, failing)


def test_a_batched_decode_that_fails_once_is_retried_row_by_row(tiny_model, engine):
    expected = [r.token_ids for r in engine.generate(PROMPTS[:2], GREEDY)]
    flaky = Engine(tiny_model)
    fail_once(flaky.runner, "decode")
    results = flaky.generate(PROMPTS[:2], GREEDY)  # each row decoded alone once: nobody fails
    assert [r.token_ids for r in results] == expected


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(tiny_model, engine):
    expected = engine.generate([PROMPTS[0]], GREEDY)[0].token_ids
    broken = Engine(tiny_model)
    fail_once(broken.scheduler, "_prefill")  # a failure of the step itself, not of one forward
    with pytest.raises(RuntimeError, match="boom"):
        broken.generate([PROMPTS[0], PROMPTS[1]], GREEDY)
    assert broken.scheduler.active_count == 0 and broken.scheduler.pending_count == 0
    assert broken.generate([PROMPTS[0]], GREEDY)[0].token_ids == expected

    with BatchedEngine(tiny_model, max_batch_size=2) as batched:
        fail_once(batched.scheduler, "_prefill")
        failing = batched.submit(PROMPTS[0], GREEDY)
        with pytest.raises(RuntimeError, match="boom"):
            list(failing)
        assert failing.finish_reason == "error"
        assert list(batched.submit(PROMPTS[0], GREEDY)) == expected


def test_the_engine_never_moves_the_model(tiny_model):
    with pytest.raises(Gpt2ChatError, match="bfloat16"):
        Engine(tiny_model, dtype=torch.bfloat16)
    tiny_model.train()
    try:
        with pytest.raises(Gpt2ChatError, match="eval"):
            BatchedEngine(tiny_model)
    finally:
        tiny_model.eval()


# ---------------------------------------------------------------------- the static-shape decode step


def static_engine(tiny_model, **kwargs) -> Engine:
    """An engine whose decode step is the static-shape one (the graph torch.compile gets), run eagerly."""
    engine = Engine(tiny_model, **kwargs)
    engine.runner._compiled = engine.runner._static_step
    return engine


@pytest.mark.parametrize("arch", ["tiny", "tiny-neo"])
def test_static_decode_step_equals_the_eager_one(tmp_path, arch):
    from gpt2chat.checkpoint import init_checkpoint, load_model

    tiny_model, _ = load_model(init_checkpoint(arch, tmp_path / arch, seed=1), device="cpu")
    long_prompt = [(11 * i) % 300 for i in range(40)]  # longer than tiny-neo's local window (16)
    prompts = [*PROMPTS, long_prompt]
    params = GREEDY.replace(max_new_tokens=30, logprobs=1)
    eager = Engine(tiny_model).generate(prompts, params)
    static = static_engine(tiny_model, max_batch_size=3).generate(prompts, params)  # 5 prompts over 3 rows
    for a, b in zip(eager, static, strict=True):
        assert a.token_ids == b.token_ids
        assert [e.logprob for e in a.logprobs] == pytest.approx([e.logprob for e in b.logprobs], abs=1e-4)


def test_a_failing_compiled_step_falls_back_to_eager(tiny_model, engine, caplog):
    expected = engine.generate(PROMPTS, GREEDY)
    fallback = Engine(tiny_model)

    def broken(*args):
        raise RuntimeError("no compiler here")

    fallback.runner._compiled = broken
    with caplog.at_level("WARNING"):
        results = fallback.generate(PROMPTS, GREEDY)
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]
    assert "decoding eagerly" in caplog.text and fallback.runner._compiled is None


@pytest.mark.slow
def test_compiled_decode_step_gives_the_eager_tokens(tiny_model, engine):
    pytest.importorskip("torch._inductor")
    expected = engine.generate(PROMPTS, GREEDY)
    compiled = Engine(tiny_model, compile=True)
    assert [r.token_ids for r in compiled.generate(PROMPTS, GREEDY)] == [r.token_ids for r in expected]
    assert compiled.runner._compiled is not None  # it did not fall back
