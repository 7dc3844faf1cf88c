"""The step policy (engine/chunk_policy.py, scheduler.step): a long prompt arriving while streams decode is
prefilled one bounded chunk per step, every running stream still gets one token every step, the tokens
and logprobs equal a cold single-request run, and the prompt cache still hits. Counted in steps and
tokens, never wall time."""

from __future__ import annotations

import pytest

from gpt2chat.engine import Engine
from gpt2chat.engine.chunk_policy import ChunkPolicy
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=30, logprobs=2)
SEEDED = SamplingParams(temperature=1.0, top_k=20, seed=5, max_new_tokens=30, logprobs=1)
LONG = [(11 * i + 3) % 700 for i in range(200)]
CHUNK = 16


def assert_like_cold(result, reference):
    assert result.token_ids == reference.token_ids and result.finish_reason == reference.finish_reason
    assert [e.token_id for e in result.logprobs] == [e.token_id for e in reference.logprobs]
    assert [e.logprob for e in result.logprobs] == pytest.approx([e.logprob for e in reference.logprobs], abs=1e-5)
    assert [[t for t, _ in e.top] for e in result.logprobs] == [[t for t, _ in e.top] for e in reference.logprobs]


def cold(model, prompt, params):
    return Engine(model, max_batch_size=1, prompt_cache=False).generate([prompt], params)[0]


def count_prefills(engine: Engine) -> list[int]:
    """The prompt tokens of each prefill forward the engine runs from now on."""
    sizes: list[int] = []
    prefill = engine.runner.prefill

    def counted(chunks):
        sizes.append(sum(len(chunk.token_ids) for chunk in chunks))
        return prefill(chunks)

    engine.runner.prefill = counted
    return sizes


def test_policy_budget_follows_the_measured_costs():
    policy = ChunkPolicy(max_tokens=512, stall_s=0.25)
    assert policy.budget(decoding=0) == 512  # nobody waits: the whole budget
    assert policy.budget(decoding=3) == 64  # nothing measured yet
    policy.record_decode(0.01)
    policy.record_prefill(100, 0.21)  # 0.01 fixed + 100 * 0.002
    assert policy.per_token_s == pytest.approx(0.002)
    assert policy.budget(decoding=3) == 120  # (0.25 - 0.01) / 0.002
    policy.record_prefill(8, 5.0)  # a tiny chunk is mostly fixed cost: not learnt from
    assert policy.budget(decoding=3) == 120
    for _ in range(40):  # the machine got 10x slower: the chunk shrinks, never below 16 tokens
        policy.record_decode(0.1)
        policy.record_prefill(100, 0.1 + 100 * 0.02)
    assert policy.budget(decoding=1) == 16 and policy.budget(decoding=0) == 512
    fast = ChunkPolicy(max_tokens=256)
    fast.record_decode(0.001)
    fast.record_prefill(256, 0.01)
    assert fast.budget(decoding=1) == 256  # never above prefill_tokens
    assert ChunkPolicy(max_tokens=512, chunk_tokens=24).budget(decoding=2) == 24
    with pytest.raises(Gpt2ChatError, match="prefill_chunk"):
        ChunkPolicy(max_tokens=512, chunk_tokens=0)


def test_a_long_prefill_stalls_running_streams_for_one_chunk_at_most(tiny_model):
    engine = Engine(tiny_model, max_batch_size=4, prefill_tokens=512, prefill_chunk=CHUNK)
    running = {"greedy": ([464, 2068, 7586], GREEDY), "seeded": ([40, 1101, 318], SEEDED)}
    requests = {name: engine.submit(prompt, params) for name, (prompt, params) in running.items()}
    engine.step()  # both prompts prefilled together, first tokens drawn
    assert all(len(r.token_ids) == 1 for r in requests.values())
    sizes = count_prefills(engine)
    long = engine.submit(LONG, GREEDY)
    steps = 0
    while long.first_token_at is None:
        before = {name: len(r.token_ids) for name, r in requests.items()}
        engine.step()
        steps += 1
        # every running stream got its token this step: the prefill delayed it by one chunk at most
        assert all(len(r.token_ids) == before[name] + 1 for name, r in requests.items())
    assert sizes == [CHUNK] * (len(LONG) // CHUNK) + [len(LONG) % CHUNK]  # one bounded chunk per step
    assert steps == -(-len(LONG) // CHUNK)
    while not all(r.done for r in [*requests.values(), long]):
        engine.step()
    for name, (prompt, params) in running.items():
        assert_like_cold(requests[name].result(), cold(tiny_model, prompt, params))
    assert_like_cold(long.result(), cold(tiny_model, LONG, GREEDY))


def test_with_no_stream_decoding_the_prompt_takes_the_whole_budget(tiny_model):
    engine = Engine(tiny_model, max_batch_size=2, prefill_tokens=512, prefill_chunk=CHUNK)
    sizes = count_prefills(engine)
    result = engine.generate([LONG], SEEDED)[0]
    assert sizes == [len(LONG)]
    assert_like_cold(result, cold(tiny_model, LONG, SEEDED))


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_chunked_prompts_still_hit_the_prompt_cache(tiny_model, params):
    engine = Engine(tiny_model, max_batch_size=3, prefill_tokens=512, prefill_chunk=CHUNK)
    stream = engine.submit([7, 8, 9], params.replace(max_new_tokens=200))
    engine.step()
    first = engine.submit(LONG, params)  # chunked: the stream keeps decoding
    while not first.done:
        engine.step()
    follow_up = LONG + first.token_ids + [300, 301, 302]
    sizes = count_prefills(engine)
    second = engine.submit(follow_up, params)
    while not second.done:
        engine.step()
    stream.cancel()
    assert second.cached_tokens == len(LONG) + len(first.token_ids) - 1  # the last sampled token was never fed
    assert sum(sizes) == len(follow_up) - second.cached_tokens
    assert_like_cold(first.result(), cold(tiny_model, LONG, params))
    assert_like_cold(second.result(), cold(tiny_model, follow_up, params))
