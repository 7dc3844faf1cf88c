"""The engine alone, no HTTP: one stream, 16 concurrent streams, and a multi-turn chat's time to first token.

On a model of real shape with random weights (default the 124M `gpt2` shape, fp32, the inference layout the
server uses), in one process: (1) one stream decoding `--tokens` tokens (tokens/s); (2) `--streams`
clients, each submitting `--requests` requests of `--tokens` tokens one after another to one
`BatchedEngine` with `--streams` rows (aggregate tokens/s, time to first token p50 / p99, and the longest
gap between two tokens of one stream: how long a prefill stalled the running streams); (3) a 7-turn chat
whose history is resent every turn, 1 token asked per turn (time to first token per turn), with the prompt
cache on and off, interleaved; (4) `--only step`: where one decode step of 1 and of `--streams` rows goes
(the scheduler's whole step, the runner's decode, the model's forward split into blocks and LM head, the
draw; medians of 30) and torch.profiler's busiest ops over 10 steps; (6) `--only draw`: `sample_next`
alone on random logits of the vocabulary's width, 1 and `--streams` rows, greedy / temperature / top-k /
top-p / both, seeded and not, and with `--baseline-sampling FILE` (another version's sampling.py, e.g.
`git show main:src/gpt2chat/sampling.py > /tmp/old.py`) that one too, interleaved call by call; (5) `--only served1`: one stream as the
server runs it (`BatchedEngine`, temperature 1, timed from submit; the engine-alone side of
`benchmarks.serve --single`). One JSON line per measure (the profile tables as text). Medians over `--repeats` where repeated.

    python -m benchmarks.engine                      # 124M, 1 and 16 streams, 128 tokens
    python -m benchmarks.engine --shape tiny --tokens 32 --requests 1
    python -m benchmarks.engine --only step --quantize int8      # the per-step profile
    python -m benchmarks.engine --only draw --baseline-sampling /tmp/old.py   # the draw, before / after
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

PROMPT_TOKENS = 40  # about the serve benchmark's system + user message in the llama3-context template
TURN_TOKENS = 120  # what one turn (a user message and its reply) adds to a conversation


def build_model(shape: str, quantize: str | None = None):
    from gpt2chat.config import get_preset
    from gpt2chat.model import GPT
    from gpt2chat.quantize import convert_for_inference

    torch.manual_seed(0)
    return convert_for_inference(GPT(get_preset(shape)).eval(), quantize=quantize)


def prompt(seed: int, length: int, vocab: int = 50000) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=generator).tolist()


def engine_kwargs(cache: bool) -> dict:
    import inspect

    from gpt2chat.engine import BatchedEngine

    return {"prompt_cache": cache} if "prompt_cache" in inspect.signature(BatchedEngine).parameters else {}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def one_stream(model, tokens: int, repeats: int) -> dict:
    from gpt2chat.engine import Engine
    from gpt2chat.sampling import SamplingParams

    engine = Engine(model, max_batch_size=1, **engine_kwargs(False))
    params = SamplingParams(temperature=0, max_new_tokens=tokens + 1)
    rates = []
    for index in range(repeats + 1):
        result = engine.generate([prompt(index, PROMPT_TOKENS)], params)[0]
        if index:  # the first is a warm-up
            rates.append(tokens / result.decode_s)
    return {"measure": "1 stream", "tokens_per_s": statistics.median(rates), "runs": len(rates)}


def one_stream_as_served(model, tokens: int, repeats: int, engine=None) -> dict:
    """One stream the way `gpt2chat serve` runs it: `BatchedEngine` (its thread, a wake-up per token),
    temperature 1 with a seed, timed from submit to the last token (what benchmarks.serve times over HTTP)."""
    from gpt2chat.engine import BatchedEngine
    from gpt2chat.sampling import SamplingParams

    own = engine is None
    engine = engine or BatchedEngine(model, max_batch_size=16, **engine_kwargs(True))
    rates = []
    try:
        for index in range(repeats + 1):
            params = SamplingParams(temperature=1.0, seed=index, max_new_tokens=tokens)
            start = time.perf_counter()
            request = engine.submit(prompt(index, PROMPT_TOKENS), params)
            count = sum(1 for _ in request)
            if index or not own:  # a fresh engine's first request is a warm-up
                rates.append(count / (time.perf_counter() - start))
    finally:
        if own:
            engine.close()
    return {"measure": "1 stream as served", "tokens_per_s": statistics.median(rates), "runs": len(rates)}


def many_streams(model, streams: int, requests: int, tokens: int) -> dict:
    from gpt2chat.engine import BatchedEngine
    from gpt2chat.sampling import SamplingParams

    params = SamplingParams(temperature=0.8, top_k=40, max_new_tokens=tokens)
    ttfts, gaps, counts = [], [], []
    with BatchedEngine(model, max_batch_size=streams, **engine_kwargs(True)) as engine:
        list(engine.submit(prompt(999, PROMPT_TOKENS), params.replace(max_new_tokens=4)))  # warm-up

        def client(index: int) -> None:
            for turn in range(requests):
                request = engine.submit(prompt(1000 * index + turn, PROMPT_TOKENS), params.replace(seed=index))
                last = None
                for _ in request:
                    now = time.perf_counter()
                    if last is not None:
                        gaps.append(now - last)
                    last = now
                ttfts.append(request.ttft_s)
                counts.append(request.completion_tokens)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
    return {"measure": f"{streams} streams", "tokens_per_s": sum(counts) / wall, "ttft_p50_ms": 1000 * percentile(ttfts, 50),
            "ttft_p99_ms": 1000 * percentile(ttfts, 99), "gap_p99_ms": 1000 * percentile(gaps, 99),
            "gap_max_ms": 1000 * max(gaps), "requests": len(ttfts)}  # fmt: skip


def multi_turn(model, turns: int) -> list[dict]:
    from gpt2chat.engine import BatchedEngine
    from gpt2chat.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=1)
    engines = {cache: BatchedEngine(model, max_batch_size=4, **engine_kwargs(cache)) for cache in (True, False)}
    rows = []
    try:
        history = prompt(7, PROMPT_TOKENS)
        for turn in range(1, turns + 1):
            row = {"measure": "multi-turn", "turn": turn, "prompt_tokens": len(history)}
            for cache, engine in engines.items():  # interleaved: the same prompt on each engine in turn
                request = engine.submit(history, params)
                list(request)  # to its end (works on the engine before the prompt cache too)
                row[f"ttft_ms_cache_{'on' if cache else 'off'}"] = 1000 * request.ttft_s
                row[f"cached_tokens_cache_{'on' if cache else 'off'}"] = getattr(request, "cached_tokens", 0)
            rows.append(row)
            history = history + prompt(100 + turn, TURN_TOKENS)
    finally:
        for engine in engines.values():
            engine.close()
    return rows


def median_ms(run, times: int = 30) -> float:
    spent = []
    for _ in range(times):
        start = time.perf_counter()
        run()
        spent.append(time.perf_counter() - start)
    return round(1000 * statistics.median(spent), 3)


def step_profile(model, rows: int) -> dict:
    """Where one decode step of `rows` running rows (prompts of PROMPT_TOKENS, seeded top-k draws) goes."""
    from torch.profiler import ProfilerActivity, profile

    from gpt2chat.attention_plan import AttentionPlan
    from gpt2chat.engine import Engine
    from gpt2chat.sampling import SamplingParams

    engine = Engine(model, max_batch_size=rows, prompt_cache=False)
    params = SamplingParams(temperature=0.8, top_k=40, seed=1, max_new_tokens=100_000)
    requests = [engine.submit(prompt(i, PROMPT_TOKENS), params) for i in range(rows)]
    for _ in range(5):  # prompts prefilled, a few decode steps run
        engine.step()
    scheduler, runner = engine.scheduler, engine.runner
    positions = [scheduler.rows[i].cached for i in range(rows)]
    plan = AttentionPlan.for_cache(model.config, runner.cache, positions, 1)
    ids = torch.zeros(rows, 1, dtype=torch.long)
    logits = torch.randn(rows, model.config.vocab_size)
    row = {"measure": "step", "rows": rows, "step_ms": median_ms(scheduler.step),
           "runner_decode_ms": median_ms(lambda: runner.decode([0] * rows, positions))}  # fmt: skip
    with torch.inference_mode():
        hidden = model.hidden_states(ids, plan)
        row |= {"forward_ms": median_ms(lambda: model(ids, plan)),
                "blocks_ms": median_ms(lambda: model.hidden_states(ids, plan)),
                "lm_head_ms": median_ms(lambda: model._project(hidden))}  # fmt: skip
    row["plan_ms"] = median_ms(lambda: AttentionPlan.for_cache(model.config, runner.cache, positions, 1))
    row["draw_ms"] = median_ms(lambda: scheduler._choose(list(range(rows)), logits))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            scheduler.step()
    row["ops"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    for request in requests:
        request.cancel()
    engine.step()
    return row


DRAWS = {"greedy": {"temperature": 0.0}, "T=1 seeded": {"seed": 1}, "T=1": {},
         "T=0.8 top-k 40 seeded": {"temperature": 0.8, "top_k": 40, "seed": 1},
         "top-p 0.9 seeded": {"top_p": 0.9, "seed": 1}, "top-p 0.9": {"top_p": 0.9},
         "chat (T .9, k 30, p .95) seeded": {"temperature": 0.9, "top_k": 30, "top_p": 0.95, "seed": 1}}


def draw_times(vocab: int, streams: int, baseline: str | None, times: int = 40) -> list[dict]:
    """`sample_next` alone (ms, medians of `times`), ours and `baseline`'s (a sampling.py file) interleaved."""
    import importlib.util
    import sys

    from gpt2chat import sampling

    sides = {"ours": sampling}
    if baseline:
        spec = importlib.util.spec_from_file_location("baseline_sampling", baseline)
        sides["baseline"] = sys.modules["baseline_sampling"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sides["baseline"])
    generator = torch.Generator().manual_seed(0)
    out = []
    for rows in sorted({1, streams}):
        # logits like a trained model's: a few likely tokens over a long flat tail
        logits = torch.randn(rows, vocab, generator=generator) * 2
        for name, fields in DRAWS.items():
            spent = {side: [] for side in sides}
            for _ in range(times + 2):
                for side, module in sides.items():
                    params = module.SamplingParams(**fields)
                    start = time.perf_counter()
                    module.sample_next(logits, None, params, [0] * rows)
                    spent[side].append(time.perf_counter() - start)
            row = {"measure": "draw", "rows": rows, "params": name}
            row |= {f"{side}_ms": round(1000 * statistics.median(values[2:]), 3) for side, values in spent.items()}
            out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="gpt2")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2, help="requests per client of the concurrent level")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--turns", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantize", default=None, help="the inference layout (default fp32; int8, ...)")
    parser.add_argument("--only", default="1,many,turns", help="which measures: 1, served1, many, turns, step, draw")
    parser.add_argument("--baseline-sampling", default=None, help="--only draw: another sampling.py to time too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args.shape, args.quantize)
    only = set(args.only.split(","))
    rows = []
    if "1" in only:
        rows.append(one_stream(model, args.tokens, args.repeats))
    if "served1" in only:
        rows.append(one_stream_as_served(model, args.tokens, args.repeats))
    if "many" in only:
        rows.append(many_streams(model, args.streams, args.requests, args.tokens))
    if "turns" in only:
        rows += multi_turn(model, args.turns)
    if "step" in only:
        rows += [step_profile(model, n) for n in sorted({1, args.streams})]
    if "draw" in only:
        rows += draw_times(model.config.vocab_size, args.streams, args.baseline_sampling)
    for row in rows:
        ops = row.pop("ops", None)
        print(json.dumps({"shape": args.shape, "quantize": args.quantize, "threads": args.threads, **row}), flush=True)
        if ops:
            print(ops, flush=True)


if __name__ == "__main__":
    main()
