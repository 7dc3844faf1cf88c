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

from gpt2chat.engine.batched import BatchedEngine
from gpt2chat.engine.request import GenerationResult, QueueFullError, Request, TokenLogprob
from gpt2chat.engine.sync import Engine, TokenStream

__all__ = [
    "Engine", "BatchedEngine", "GenerationResult", "Request", "QueueFullError", "TokenStream", "TokenLogprob",
]  # fmt: skip

