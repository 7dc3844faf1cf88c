"""Generation on token ids: one scheduler loop (admission, chunked batched prefill, batched decode) that
the synchronous `Engine` drives in the caller's thread and `BatchedEngine` runs in a background thread.

`Engine.generate` takes several prompts at once and `Engine.stream` yields one prompt's tokens as they come;
`BatchedEngine.submit` serves many requests from many threads through one KV cache, a finished or cancelled
request freeing its row at once. Modules: `request` (what a client holds), `scheduler` (the loop),
`runner` (the only caller of the model), `sync` and `batched` (the two drivers).

The engine knows nothing about text, tokenizers or templates: token ids in, token ids out. Stop tokens are
never part of the output; `finish_reason` says why a sequence ended ("stop", "length" for max_new_tokens or
a full context, "cancelled", "error").
"""

from __future__ import annotations

import torch

from gpt2chat.engine.batched import BatchedEngine
from gpt2chat.engine.request import GenerationResult, QueueFullError, Request, TokenLogprob
from gpt2chat.engine.sync import Engine, TokenStream
from gpt2chat.errors import Gpt2ChatError

__all__ = [
    "Engine", "BatchedEngine", "GenerationResult", "Request", "QueueFullError", "TokenStream", "TokenLogprob",
    "default_device_dtype",
]  # fmt: skip


def default_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """CUDA + bf16 when CUDA is present, CPU + fp32 otherwise; explicit arguments win."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
        if dtype not in names:
            raise Gpt2ChatError(f"unknown dtype {dtype!r}; choose one of {', '.join(names)}")
        dtype = names[dtype]
    return device, dtype
