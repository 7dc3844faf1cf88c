"""Compute accounting: parameters, analytic FLOPs and bytes per token, measured machine peaks, MFU / MBU.

Analytic counts take a model config (anything with GPT-2 config attributes: `n_embd`, `n_layer`,
`n_inner`, `vocab_size`, `n_positions`, `model_type`, and GPT-Neo's `attention_layers` / `window_size`).
They count matrix multiplies only (2 FLOPs per multiply-add); layer norms, biases, GELU and softmax are
elementwise and below 1% at these shapes. Per token, in the forward pass:

    weights    2 * (L * (4 d^2 + 2 d f) + V d)      QKV + output projections, MLP, LM head
    attention  L * 4 * c * d                        q.k^T over c keys (2cd) and the weighted sum (2cd)

where c is the number of keys the token attends to (the context; min(context, window) on GPT-Neo's local
layers). Training costs 3x the forward (backward = 2x forward), which is PaLM's `6N + 12 L H Q T`.

The peaks are measured, not looked up, each as the best of several timings (a busy machine only ever
makes a run slower, so the fastest is the closest to what the hardware can do): a square matmul in the
evaluation's dtype for FLOP/s, and a read-only pass (`tensor.sum()`) over a large float32 tensor for read
bandwidth. Decode at batch 1 only reads (every weight once per token), so a copy, which also writes, is
the wrong yardstick. MFU = achieved FLOP/s / matmul peak; MBU = achieved bytes read/s / read bandwidth.
This is the project's one peak helper: `benchmarks/` import it from here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "count_parameters",
    "analytic_parameters",
    "matmul_parameters",
    "forward_flops_per_token",
    "training_flops_per_token",
    "prefill_flops",
    "decode_bytes_per_token",
    "synchronize",
    "best_seconds",
    "measure_peaks",
    "best_peaks",
    "utilisation",
]


def count_parameters(model) -> int:
    """Trainable-or-not parameters of a torch module, a tied tensor counted once."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    return total


def _mlp_width(config: Any) -> int:
    n_inner = getattr(config, "n_inner", None)
    return int(n_inner) if n_inner else 4 * int(config.n_embd)


def analytic_parameters(config: Any) -> int:
    """Parameter count of the GPT-2 / GPT-Neo shape (tied LM head counted once)."""
    d, layers, f = int(config.n_embd), int(config.n_layer), _mlp_width(config)
    embeddings = int(config.vocab_size) * d + int(config.n_positions) * d
    if getattr(config, "model_type", "gpt2") == "gpt_neo":
        attention = 3 * d * d + (d * d + d)  # q, k, v without bias; out_proj with bias
    else:
        attention = (3 * d * d + 3 * d) + (d * d + d)  # c_attn, c_proj
    mlp = (d * f + f) + (f * d + d)
    norms = 2 * 2 * d
    return embeddings + layers * (attention + mlp + norms) + 2 * d


def matmul_parameters(config: Any) -> int:
    """Weights that take part in a matmul for every token: the blocks' projections and the LM head."""
    d, layers, f = int(config.n_embd), int(config.n_layer), _mlp_width(config)
    return layers * (4 * d * d + 2 * d * f) + int(config.vocab_size) * d


def _keys_per_layer(config: Any, context: int) -> list[int]:
    layers = int(config.n_layer)
    kinds = getattr(config, "attention_layers", None) if getattr(config, "model_type", "") == "gpt_neo" else None
    if not kinds:
        return [context] * layers
    window = int(getattr(config, "window_size", 256))
    return [min(context, window) if kind == "local" else context for kind in kinds[:layers]]


def forward_flops_per_token(config: Any, context: int | None = None) -> dict:
    """Forward FLOPs for one token attending to `context` keys (default: the full `n_positions`)."""
    context = int(config.n_positions if context is None else context)
    if context < 1:
        raise ValueError("context must be >= 1")
    d = int(config.n_embd)
    weights = 2 * matmul_parameters(config)
    attention = sum(4 * keys * d for keys in _keys_per_layer(config, context))
    return {"weights": weights, "attention": attention, "total": weights + attention, "context": context}


def prefill_flops(config: Any, prompt_tokens: int, logits_positions: int = 1) -> int:
    """Forward FLOPs of a prefill of `prompt_tokens` tokens as the engine runs it: every token through the
    blocks, token t attending to t keys (the window on GPT-Neo's local layers), and the LM head only for the
    last `logits_positions` positions (a prefill samples from the last position's logits alone)."""
    if prompt_tokens < 1 or not 1 <= logits_positions <= prompt_tokens:
        raise ValueError("prompt_tokens must be >= 1 and logits_positions in 1..prompt_tokens")
    d, vocab = int(config.n_embd), int(config.vocab_size)
    blocks = 2 * (matmul_parameters(config) - vocab * d)  # per token, without the LM head
    attention = sum(4 * d * keys for t in range(1, prompt_tokens + 1) for keys in _keys_per_layer(config, t))
    return prompt_tokens * blocks + attention + logits_positions * 2 * vocab * d


def training_flops_per_token(config: Any, context: int | None = None) -> int:
    """Forward + backward: 3x the forward FLOPs."""
    return 3 * forward_flops_per_token(config, context)["total"]


def decode_bytes_per_token(config: Any, parameters: int, bytes_per_element: int, context: int) -> int:
    """Bytes read to decode one token at batch 1: every weight once, plus the KV cache of `context` keys."""
    d = int(config.n_embd)
    kv_cache = sum(2 * keys * d for keys in _keys_per_layer(config, context)) * bytes_per_element
    return parameters * bytes_per_element + kv_cache


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously); a no-op on CPU."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], device, *, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall times of `repeats` runs of `fn()` after `warmup` untimed ones, fastest first (device synchronised)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)


def measure_peaks(device, dtype, *, matmul_size: int | None = None, read_bytes: int | None = None,
                  repeats: int = 5) -> dict:
    """Best-of-`repeats` matmul FLOP/s (in `dtype`) and read bandwidth (a float32 `sum()`) on `device`.

    Defaults: an 8192-square matmul on CUDA, 1024 on CPU; 1 GiB read on both (GUIDE.md). The median of
    the same timings is kept too, so a reader sees how steady the machine was.
    """
    import torch

    device = torch.device(device)
    size = matmul_size or (8192 if device.type == "cuda" else 1024)
    n_bytes = read_bytes or (1 << 30)
    generator = torch.Generator(device="cpu").manual_seed(0)
    left, right = (torch.randn(size, size, generator=generator).to(device=device, dtype=dtype) for _ in range(2))
    matmul_s = best_seconds(lambda: torch.mm(left, right), device, repeats=repeats)
    source = torch.ones(max(1, n_bytes // 4), dtype=torch.float32, device=device)
    read = source.numel() * source.element_size()
    read_s = best_seconds(source.sum, device, repeats=repeats)
    flop = 2 * size**3
    return {
        "matmul_flops_per_s": flop / matmul_s[0],
        "matmul_flops_per_s_median": flop / statistics.median(matmul_s),
        "read_bytes_per_s": read / read_s[0],
        "read_bytes_per_s_median": read / statistics.median(read_s),
        "matmul_size": size,
        "read_bytes": read,
        "repeats": repeats,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
    }


def best_peaks(*measurements: dict) -> dict:
    """Peaks measured several times in one run (its start and its end) -> the best of each, with both kept.

    MFU and MBU divide by the best figure the machine showed during the run.
    """
    if not measurements:
        raise ValueError("no peak measurement given")
    best = dict(measurements[0])
    for key in ("matmul_flops_per_s", "read_bytes_per_s"):
        best[key] = max(m[key] for m in measurements)
    best["measurements"] = [dict(m) for m in measurements]
    return best


def utilisation(*, flops_per_token: float, bytes_per_token: float, prefill_tokens_per_s: float | None,
                decode_tokens_per_s: float | None, peaks: dict) -> dict:
    """MFU of prefill (compute bound) and decode, and MBU of decode (memory bound at batch 1)."""
    result: dict[str, float | None] = {"prefill_mfu": None, "decode_mfu": None, "decode_mbu": None}
    if prefill_tokens_per_s:
        result["prefill_mfu"] = prefill_tokens_per_s * flops_per_token / peaks["matmul_flops_per_s"]
    if decode_tokens_per_s:
        result["decode_mfu"] = decode_tokens_per_s * flops_per_token / peaks["matmul_flops_per_s"]
        result["decode_mbu"] = decode_tokens_per_s * bytes_per_token / peaks["read_bytes_per_s"]
    return result
