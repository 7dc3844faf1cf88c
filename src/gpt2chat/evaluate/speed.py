"""Prefill and decode tokens/s of a model on this machine, batch 1, medians of several repeats.

Prefill: one forward over a P-token prompt into a fresh KV cache (only the last position's logits).
Decode: N greedy steps of one token each with the KV cache, after that prefill: the loop the engine runs,
without sampling options or stop tokens, so every run decodes exactly N tokens and the figure is the
model's, not the chat's. The prompt is random token ids from a seeded generator (speed does not depend
on the text). Knows nothing about data or templates.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

__all__ = ["median_seconds", "synchronize", "measure_speed"]


def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device, *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` runs after `warmup` untimed runs (device synchronised)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_speed(model, *, prompt_tokens: int = 128, new_tokens: int = 64, repeats: int = 3,
                  seed: int = 0) -> dict:
    """Batch-1 prefill and decode tokens/s of `model` (a `gpt2chat.model.GPT`) on its own device/dtype."""
    import torch

    from gpt2chat.model import AttentionPlan, KVCache

    config = model.config
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    limit = int(config.n_positions)
    prompt_tokens = max(1, min(prompt_tokens, limit - 1))
    new_tokens = max(1, min(new_tokens, limit - prompt_tokens))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    prompt = torch.randint(0, int(config.vocab_size), (1, prompt_tokens), generator=generator).to(device)

    def new_cache():
        return KVCache(config, 1, prompt_tokens + new_tokens, device, dtype)

    def prefill(cache=None):
        plan = AttentionPlan.for_cache(config, cache if cache is not None else new_cache(), [0], prompt_tokens)
        return model(prompt, plan, logits_to_keep=1)

    def decode_only():
        cache = new_cache()
        token = prefill(cache)[:, -1].argmax(-1, keepdim=True)
        synchronize(device)
        start = time.perf_counter()
        for step in range(new_tokens):
            plan = AttentionPlan.for_cache(config, cache, [prompt_tokens + step], 1)
            token = model(token, plan, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
        synchronize(device)
        return time.perf_counter() - start

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            prefill_s = median_seconds(prefill, device, repeats=repeats)
            decode_only()  # warm-up
            decode_s = statistics.median(decode_only() for _ in range(max(1, repeats)))
    finally:
        model.train(was_training)
    return {
        "prefill_tokens_per_s": prompt_tokens / prefill_s,
        "decode_tokens_per_s": new_tokens / decode_s,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "batch_size": 1,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
    }
