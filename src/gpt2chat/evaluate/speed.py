"""Prefill and decode tokens/s at batch 1, timed by the engine's own loop.

There is no decode loop here: each repeat is one `Engine.generate` call, and the figures are the
engine's own timings (`GenerationResult.ttft_s`: call -> first token sampled, which is the prompt's
forward and one sample; `decode_s`: first -> last token, the remaining decode steps). The request is
greedy with no stop token, so every repeat generates exactly `decode_steps + 1` tokens and the figure is
the model's, not the chat's. The prompt is random token ids from a seeded generator (speed does not
depend on the text).

Several engines are measured round-robin: repeat r of every engine runs before repeat r + 1 of any, so
a burst of load on a shared machine slows all of them alike, and two identical checkpoints report the
same speed within their spread. Each row keeps its median and its range (fastest, slowest repeat).

`busy_machine_reasons` says which figures of a row cannot be results: one above its physical bound (MFU or
MBU over 100%: tokens/s above what the measured matmul peak or read bandwidth allows), or a range of repeats
wider than its median. Both happen when other work shares the machine; the report shows such a figure as
"busy machine" with its reason, not as a result. Knows nothing about data, templates or reports.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from gpt2chat.errors import Gpt2ChatError

__all__ = ["MIN_DECODE_STEPS", "MIN_REPEATS", "busy_machine_reasons", "measure_speeds"]

MIN_DECODE_STEPS = 64  # fewer steps time the loop's start-up more than the model
MIN_REPEATS = 3  # a median needs at least three


def _prompt(vocab_size: int, length: int, seed: int) -> list[int]:
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


def _summary(values: list[float]) -> tuple[float, list[float]]:
    return statistics.median(values), [min(values), max(values)]


def measure_speeds(engines: Sequence, *, prompt_tokens: int = 128, decode_steps: int = 128, repeats: int = 5,
                   seed: int = 0, warmup: int = 1) -> list[dict]:
    """One speed row per engine (`gpt2chat.engine.Engine`), measured round-robin (module docstring).

    The prompt is cut so that prompt + `decode_steps` + 1 tokens fit the model's context; a context too
    short for `MIN_DECODE_STEPS` steps is an error.
    """
    import torch

    from gpt2chat.sampling import SamplingParams

    if decode_steps < MIN_DECODE_STEPS or repeats < MIN_REPEATS:
        raise Gpt2ChatError(f"speed rows need >= {MIN_DECODE_STEPS} decode steps and >= {MIN_REPEATS} repeats "
                            f"(got {decode_steps} steps, {repeats} repeats)")
    new_tokens = decode_steps + 1
    plans = []
    for engine in engines:
        context = int(engine.config.n_positions)
        length = min(prompt_tokens, context - new_tokens)
        if length < 1:
            raise Gpt2ChatError(f"the model's context ({context} tokens) is too short to time {decode_steps} "
                                "decode steps after a prompt")
        plans.append((engine, _prompt(int(engine.config.vocab_size), length, seed)))
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_token_ids=())

    def run(engine, prompt) -> tuple[float, float]:
        result = engine.generate([prompt], params)[0]
        if len(result.token_ids) != new_tokens or not result.ttft_s or not result.decode_s:
            raise Gpt2ChatError(f"speed run: the engine returned {len(result.token_ids)} of {new_tokens} tokens "
                                f"(ttft_s={result.ttft_s}, decode_s={result.decode_s})")
        return result.ttft_s, result.decode_s

    for engine, prompt in plans:
        for _ in range(warmup):
            run(engine, prompt)
    timings: list[list[tuple[float, float]]] = [[] for _ in plans]
    for _ in range(repeats):
        for index, (engine, prompt) in enumerate(plans):
            timings[index].append(run(engine, prompt))

    rows = []
    for (engine, prompt), runs in zip(plans, timings, strict=True):
        prefill, prefill_range = _summary([len(prompt) / ttft for ttft, _ in runs])
        decode, decode_range = _summary([decode_steps / decode_s for _, decode_s in runs])
        rows.append({
            "prefill_tokens_per_s": prefill, "prefill_tokens_per_s_range": prefill_range,
            "decode_tokens_per_s": decode, "decode_tokens_per_s_range": decode_range,
            "ttft_s": statistics.median(ttft for ttft, _ in runs),
            "prompt_tokens": len(prompt), "decode_steps": decode_steps, "repeats": repeats,
            "round_robin_with": len(plans), "batch_size": 1, "device": str(engine.device),
            "dtype": str(engine.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        })
    return rows


def busy_machine_reasons(speed: dict) -> dict[str, str]:
    """{figure key: why it is not a result} for a speed row with its utilisation (module docstring)."""
    reasons: dict[str, str] = {}
    for phase in ("prefill", "decode"):
        rate_key = f"{phase}_tokens_per_s"
        rate, spread = speed.get(rate_key), speed.get(f"{rate_key}_range")
        why = []
        if rate and spread and spread[1] - spread[0] > rate:
            why.append(f"its repeats ranged {spread[0]:.1f}-{spread[1]:.1f} tok/s, wider than the median {rate:.1f}")
        for name, key in (("MFU", f"{phase}_mfu"), ("MBU", f"{phase}_mbu")):
            value = speed.get(key)
            if value is not None and value > 1:
                bound = f"{rate / value:.1f} tok/s" if rate else "its bound"
                why.append(f"{phase} {name} {100 * value:.0f}% is over 100% ({rate:.1f} tok/s above the {bound} "
                           f"the measured {'matmul peak' if name == 'MFU' else 'read bandwidth'} allows)")
        if why:
            text = "; ".join(why)
            for key in (rate_key, f"{phase}_mfu", f"{phase}_mbu"):
                if key in speed:
                    reasons[key] = text
    return reasons
