"""engine/prompt_cache.py and the scheduler's fault isolation: a reused prefix gives the tokens and logprobs
of a cold run (greedy, seeded, penalised, prompt logprobs), across turns, shared system prompts, eviction
and cancellation; its counters on the engine and on `/metrics`; a failing forward or draw fails only the
requests it concerns."""

from __future__ import annotations

import pytest

from gpt2chat.engine import BatchedEngine, Engine
from gpt2chat.engine.prompt_cache import common_prefix
from gpt2chat.sampling import SamplingParams

SYSTEM = [(13 * i + 5) % 900 for i in range(40)]  # a shared system prompt
GREEDY = SamplingParams(temperature=0, max_new_tokens=12, logprobs=2)
SEEDED = SamplingParams(temperature=1.0, top_k=40, seed=11, max_new_tokens=12, logprobs=1)
PENALISED = SamplingParams(temperature=0.8, repetition_penalty=1.3, seed=2, max_new_tokens=12, logprobs=0)


@pytest.fixture(scope="module")
def cold(tiny_model):
    """The reference: the same engine with the prompt cache off."""
    return Engine(tiny_model, prompt_cache=False)


def assert_like_cold(result, reference):
    assert result.token_ids == reference.token_ids and result.finish_reason == reference.finish_reason
    assert [e.token_id for e in result.logprobs] == [e.token_id for e in reference.logprobs]
    assert [e.logprob for e in result.logprobs] == pytest.approx([e.logprob for e in reference.logprobs], abs=1e-5)
    assert [[t for t, _ in e.top] for e in result.logprobs] == [[t for t, _ in e.top] for e in reference.logprobs]


def user_turn(index: int) -> list[int]:
    return [300 + index, 301 + index, 302]


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix([1, 2, 3], [1, 2]) == 2
    assert common_prefix([1, 2, 3, 4, 5], [1, 2, 9, 4, 5]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([7], [8]) == 0
    long = list(range(1000))
    assert common_prefix(long, [*long[:777], -1]) == 777


@pytest.mark.parametrize("params", [GREEDY, SEEDED, PENALISED], ids=["greedy", "seeded", "penalised"])
def test_each_turn_reuses_the_history_and_equals_a_cold_run(tiny_model, cold, params):
    engine = Engine(tiny_model, max_batch_size=2)
    history = list(SYSTEM)
    for turn in range(4):
        prompt = history + user_turn(turn)
        result = engine.generate([prompt], params)[0]
        assert_like_cold(result, cold.generate([prompt], params)[0])
        # turn 1 is cold; later turns reuse every token of the previous prompt and its fed reply tokens
        assert result.cached_tokens == (0 if turn == 0 else len(history) - 1)
        # the reply as the next prompt carries it (the last sampled token was never fed: not cached)
        history = prompt + result.token_ids
    stats = engine.cache_stats
    assert (stats.queries, stats.hits, stats.evictions) == (4, 3, 0)


def test_the_same_prompt_twice_prefills_only_its_last_token(tiny_model, cold):
    engine = Engine(tiny_model)
    prompt = SYSTEM + user_turn(0)
    first, second = (engine.generate([prompt], GREEDY)[0] for _ in range(2))
    assert second.cached_tokens == len(prompt) - 1
    assert_like_cold(second, cold.generate([prompt], GREEDY)[0])
    assert first.token_ids == second.token_ids


def test_prompt_logprobs_are_computed_not_reused(tiny_model, cold):
    engine = Engine(tiny_model)
    prompt = SYSTEM + user_turn(1)
    engine.generate([prompt], GREEDY)
    params = GREEDY.replace(prompt_logprobs=2)
    result = engine.generate([prompt], params)[0]
    reference = cold.generate([prompt], params)[0]
    assert result.cached_tokens == 0  # every prompt position's logits are needed
    assert_like_cold(result, reference)
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(prompt)
    assert [e.logprob for e in result.prompt_logprobs[1:]] == pytest.approx(
        [e.logprob for e in reference.prompt_logprobs[1:]], abs=1e-5)


def test_a_system_prompt_held_by_a_running_row_is_copied_to_new_rows(tiny_model, cold):
    long = GREEDY.replace(max_new_tokens=60)
    with BatchedEngine(tiny_model, max_batch_size=3) as engine:
        running = engine.submit(SYSTEM + user_turn(0), long)
        tokens = iter(running)
        next(tokens)  # its prompt is cached in its row and it keeps decoding
        others = [engine.submit(SYSTEM + user_turn(i), GREEDY) for i in (1, 2)]
        results = [request.result() for request in others]
        rest = list(tokens)
    for index, result in zip((1, 2), results, strict=True):
        assert result.cached_tokens >= len(SYSTEM)
        assert_like_cold(result, cold.generate([SYSTEM + user_turn(index)], GREEDY)[0])
    assert rest and running.result().token_ids == cold.generate([SYSTEM + user_turn(0)], long)[0].token_ids


def test_requests_arriving_together_with_one_system_prompt_compute_it_once(tiny_model, cold):
    engine = Engine(tiny_model, max_batch_size=4)
    prompts = [SYSTEM + user_turn(i) for i in range(4)]
    fed = []
    hook = tiny_model.register_forward_hook(lambda module, args, out: fed.append(args[0].numel()))
    try:
        results = engine.generate(prompts, GREEDY)
    finally:
        hook.remove()
    assert [r.cached_tokens for r in results] == [0] + [len(SYSTEM)] * 3
    for prompt, result in zip(prompts, results, strict=True):
        assert_like_cold(result, cold.generate([prompt], GREEDY)[0])
    prefilled = sum(n for n in fed if n > 4)  # forwards over more tokens than rows: the prefills
    assert prefilled <= len(prompts[0]) + 3 * 3  # the system prompt once, then each one's own tokens


def test_more_conversations_than_rows_evict_and_stay_exact(tiny_model, cold):
    """Five conversations over two rows, turn by turn: each turn finds its history evicted or in place;
    the replies are those of a cold run either way, and eviction is counted."""
    engine = Engine(tiny_model, max_batch_size=2)
    histories = [[50 + c, *SYSTEM[:10], 60 + c] for c in range(5)]  # distinct from their first token on
    cached = []
    for turn in range(3):
        # two conversations at a time share the two rows; the next pair evicts them
        for pair in ((0, 1), (2, 3), (4, 0), (1, 2), (3, 4)):
            prompts = [histories[c] + user_turn(turn) for c in pair]
            results = engine.generate(prompts, SEEDED)
            for c, prompt, result in zip(pair, prompts, results, strict=True):
                assert_like_cold(result, cold.generate([prompt], SEEDED)[0])
                cached.append(result.cached_tokens)
                histories[c] = prompt + result.token_ids
    stats = engine.cache_stats
    assert stats.evictions > 0 and stats.queries == len(cached) == 30
    assert stats.cached_tokens == sum(cached) and stats.hits == sum(n > 0 for n in cached)
    assert stats.prompt_tokens > stats.cached_tokens


def test_a_free_row_inside_a_decode_step_keeps_its_cached_tokens(tiny_model, cold):
    """Row 0's request ends while row 1 decodes on: the decode steps cover row 0 too (a dummy token) and
    must not overwrite the history it keeps for the next turn."""
    engine = Engine(tiny_model, max_batch_size=2)
    first = SYSTEM + user_turn(0)
    short, long = engine.submit(first, GREEDY.replace(max_new_tokens=3)), engine.submit([7, 8, 9], GREEDY.replace(max_new_tokens=40))
    short.wait()
    next_turn = first + short.token_ids + user_turn(1)
    tokens = iter(long)
    for _ in range(10):
        next(tokens)  # ten decode steps over rows 0 and 1, row 0 free
    follow_up = engine.submit(next_turn, GREEDY)
    result = follow_up.result()
    list(tokens)
    assert result.cached_tokens == len(first) + 2
    assert_like_cold(result, cold.generate([next_turn], GREEDY)[0])


def test_a_cancelled_request_frees_its_row_for_anyone(tiny_model, cold):
    with BatchedEngine(tiny_model, max_batch_size=1) as engine:
        leaving = engine.submit(SYSTEM + user_turn(0), GREEDY.replace(max_new_tokens=200))
        tokens = iter(leaving)
        next(tokens)
        tokens.close()  # the client left
        assert leaving.wait(5) and leaving.finish_reason == "cancelled"
        assert engine.active_count == 0
        before = engine.cache_stats
        other = engine.submit([900, 901, 902], GREEDY).result()  # unrelated: it takes the row
        assert engine.cache_stats.evictions == before.evictions + 1 and other.cached_tokens == 0
        assert_like_cold(other, cold.generate([[900, 901, 902]], GREEDY)[0])
        assert engine.active_count == 0 and engine.pending_count == 0


def test_cache_counters_on_metrics(tiny_checkpoint):
    from prometheus_client.parser import text_string_to_metric_families

    from gpt2chat.serve.prometheus import ServerMetrics
    from serve_support import tiny_service

    service = tiny_service(tiny_checkpoint)
    try:
        metrics = ServerMetrics(service)
        prompt = SYSTEM + user_turn(0)
        first = service.engine.submit(prompt, GREEDY).result()
        second = service.engine.submit(prompt + first.token_ids + user_turn(1), GREEDY).result()
        samples = {s.name: s.value for family in text_string_to_metric_families(metrics.render().decode())
                   for s in family.samples}
    finally:
        service.close()
    assert samples["gpt2chat_prompt_cache_queries_total"] == 2
    assert samples["gpt2chat_prompt_cache_hits_total"] == 1
    assert samples["gpt2chat_prompt_cache_cached_tokens_total"] == second.cached_tokens == len(prompt) + len(first.token_ids) - 1
    assert samples["gpt2chat_prompt_cache_prompt_tokens_total"] == 2 * len(prompt) + len(first.token_ids) + 3
    assert samples["gpt2chat_prompt_cache_evictions_total"] == 0


# ---------------------------------------------------------------------- one failure, its own requests


POISON = 777  # a prompt token the injected fault refuses


def poison_forwards(runner):
    """Make every forward whose input holds POISON raise, batched or alone."""
    prefill, decode = runner.prefill, runner.decode

    def failing_prefill(chunks):
        if any(POISON in chunk.token_ids for chunk in chunks):
            raise RuntimeError("poisoned prefill")
        return prefill(chunks)

    def failing_decode(tokens, positions, rows=None, first_row=0):
        if POISON in tokens:
            raise RuntimeError("poisoned decode")
        return decode(tokens, positions, rows, first_row)

    runner.prefill, runner.decode = failing_prefill, failing_decode


@pytest.mark.parametrize("engine_class", [Engine, BatchedEngine])
def test_a_failing_prefill_fails_only_its_request(tiny_model, cold, engine_class):
    prompts = [SYSTEM + user_turn(0), [POISON, 5, 6], [1, 2, 3, 4]]
    engine = engine_class(tiny_model, max_batch_size=3)
    try:
        poison_forwards(engine.runner)
        requests = [engine.submit(p, GREEDY) for p in prompts]
        with pytest.raises(RuntimeError, match="poisoned prefill"):
            list(requests[1])
        assert requests[1].finish_reason == "error"
        for index in (0, 2):
            assert_like_cold(requests[index].result(), cold.generate([prompts[index]], GREEDY)[0])
        assert engine.scheduler.active_count == 0
    finally:
        getattr(engine, "close", lambda: None)()


@pytest.mark.parametrize("engine_class", [Engine, BatchedEngine])
def test_a_failing_decode_fails_only_its_request(tiny_model, cold, engine_class):
    """The request that feeds POISON back (its first reply token, forced by a stop-free greedy run whose
    first token we make POISON through the logits) fails at its first decode; the others decode on."""
    prompts = [SYSTEM + user_turn(0), [40, 41, 42], [1, 2, 3, 4]]
    engine = engine_class(tiny_model, max_batch_size=3)
    try:
        poison_forwards(engine.runner)
        victim_first = cold.generate([prompts[1]], GREEDY)[0].token_ids[0]
        decode = engine.runner.decode

        def decode_refusing_victim(tokens, positions, rows=None, first_row=0):  # the victim's first token
            return decode([POISON if t == victim_first else t for t in tokens], positions, rows, first_row)

        others = {t for p in (prompts[0], prompts[2]) for t in cold.generate([p], GREEDY)[0].token_ids}
        assert victim_first not in others  # the fault must hit the victim only
        engine.runner.decode = decode_refusing_victim
        requests = [engine.submit(p, GREEDY) for p in prompts]
        with pytest.raises(RuntimeError, match="poisoned decode"):
            list(requests[1])
        assert requests[1].finish_reason == "error" and requests[1].token_ids == [victim_first]
        for index in (0, 2):
            assert_like_cold(requests[index].result(), cold.generate([prompts[index]], GREEDY)[0])
        assert engine.generate([prompts[0]], GREEDY)[0].token_ids == cold.generate([prompts[0]], GREEDY)[0].token_ids
    finally:
        getattr(engine, "close", lambda: None)()


def test_a_failing_draw_fails_only_its_request(tiny_model, cold, monkeypatch):
    import gpt2chat.engine.scheduler as scheduler

    real = scheduler.sample_next

    def refusing_top_k_7(logits, seen, params, draws, *rest):
        if any(p.top_k == 7 for p in params):
            raise ValueError("cannot draw for this request")
        return real(logits, seen, params, draws, *rest)

    monkeypatch.setattr(scheduler, "sample_next", refusing_top_k_7)
    engine = Engine(tiny_model, max_batch_size=3)
    prompts = [SYSTEM, [1, 2, 3], [4, 5]]
    params = [GREEDY, SEEDED.replace(top_k=7), SEEDED]
    requests = [engine.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
    with pytest.raises(ValueError, match="cannot draw"):
        requests[1].result()
    assert requests[1].finish_reason == "error" and requests[1].token_ids == []
    for index in (0, 2):
        assert_like_cold(requests[index].result(), cold.generate([prompts[index]], params[index])[0])
    with pytest.raises(ValueError, match="cannot draw"):  # generate raises the error of a failed request
        engine.generate(prompts, params)


def test_sequential_unrelated_requests_decode_one_row_each(tiny_model, cold):
    """A new unrelated request takes a row that never held tokens (keeping the others' cached prefixes), so
    the k-th request of an 8-row engine lives in row k - 1: its decode step must compute that row alone, not
    rows 0 .. k - 1 (it did: the k-th `generate` ran a k-row step), and give the cold run's tokens."""
    engine = Engine(tiny_model, max_batch_size=8)
    widths, decode = [], engine.runner.decode

    def counting(tokens, positions, rows=None, first_row=0):
        widths.append(len(tokens))
        return decode(tokens, positions, rows, first_row)

    engine.runner.decode = counting
    prompts = [[10 + k, 20 + k, 30 + k, 40 + k] for k in range(5)]
    for prompt in prompts:
        assert engine.generate([prompt], GREEDY)[0].token_ids == cold.generate([prompt], GREEDY)[0].token_ids
    assert widths and set(widths) == {1}
    assert sum(1 for t in engine.scheduler.prompt_cache.tokens if t) == 5  # five rows, each kept for reuse
