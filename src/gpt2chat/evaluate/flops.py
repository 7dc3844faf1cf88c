"""Compute accounting: parameters, analytic FLOPs and bytes per token, measured machine peaks, MFU / MBU.

Analytic counts take a model config (anything with GPT-2 config attributes: `n_embd`, `n_layer`,
`n_inner`, `vocab_size`, `n_positions`, `model_type`, and GPT-Neo's `attention_layers` / `window_size`).
They count matrix multiplies only (2 FLOPs per multiply-add); layer norms, biases, GELU and softmax are
elementwise and below 1% at these shapes. Per token, in the forward pass:

    weights    2 * (L * (4 d^2 + 2 d f) + V d)      QKV + output projections, MLP, LM head
    attention  L * 4 * c * d                        q.k^T over c keys (2cd) and the weighted sum (2cd)

where c is the number of keys the token attends to (the context; min(context, window) on GPT-Neo's local
layers). Training costs 3x the forward (backward = 2x forward), which is PaLM's `6N + 12 L H Q T`.

The peaks are measured, not looked up: a square matmul for FLOP/s and a large tensor copy for memory
bandwidth, on the device and dtype the evaluation runs in. MFU = achieved FLOP/s / matmul peak; MBU =
achieved bytes/s / copy bandwidth (decode at batch 1 reads every weight once per token).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "count_parameters",
    "analytic_parameters",
    "matmul_parameters",
    "forward_flops_per_token",
    "training_flops_per_token",
    "decode_bytes_per_token",
    "measure_peaks",
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


def training_flops_per_token(config: Any, context: int | None = None) -> int:
    """Forward + backward: 3x the forward FLOPs."""
    return 3 * forward_flops_per_token(config, context)["total"]


def decode_bytes_per_token(config: Any, parameters: int, bytes_per_element: int, context: int) -> int:
    """Bytes read to decode one token at batch 1: every weight once, plus the KV cache of `context` keys."""
    d = int(config.n_embd)
    kv_cache = sum(2 * keys * d for keys in _keys_per_layer(config, context)) * bytes_per_element
    return parameters * bytes_per_element + kv_cache


def measure_peaks(device, dtype, *, matmul_size: int | None = None, copy_bytes: int | None = None,
                  repeats: int = 5) -> dict:
    """Measured matmul FLOP/s and copy bandwidth (bytes read + written per second) on `device`/`dtype`."""
    import torch

    from gpt2chat.evaluate.speed import median_seconds

    device = torch.device(device)
    on_gpu = device.type == "cuda"
    size = matmul_size or (8192 if on_gpu else 1024)
    n_bytes = copy_bytes or ((1 << 30) if on_gpu else (128 << 20))
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    matmul_s = median_seconds(lambda: torch.mm(a, b), device, repeats=repeats)
    element = torch.empty((), dtype=dtype).element_size()
    source = torch.ones(max(1, n_bytes // element), dtype=dtype, device=device)
    target = torch.empty_like(source)
    copy_s = median_seconds(lambda: target.copy_(source), device, repeats=repeats)
    moved = 2 * source.numel() * element
    return {
        "matmul_flops_per_s": 2 * size**3 / matmul_s,
        "copy_bytes_per_s": moved / copy_s,
        "matmul_size": size,
        "copy_bytes": moved,
        "repeats": repeats,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
    }


def utilisation(*, flops_per_token: float, bytes_per_token: float, prefill_tokens_per_s: float | None,
                decode_tokens_per_s: float | None, peaks: dict) -> dict:
    """MFU of prefill (compute bound) and decode, and MBU of decode (memory bound at batch 1)."""
    result: dict[str, float | None] = {"prefill_mfu": None, "decode_mfu": None, "decode_mbu": None}
    if prefill_tokens_per_s:
        result["prefill_mfu"] = prefill_tokens_per_s * flops_per_token / peaks["matmul_flops_per_s"]
    if decode_tokens_per_s:
        result["decode_mfu"] = decode_tokens_per_s * flops_per_token / peaks["matmul_flops_per_s"]
        result["decode_mbu"] = decode_tokens_per_s * bytes_per_token / peaks["copy_bytes_per_s"]
    return result
