"""Generation on token ids: one scheduler loop (admission with a prompt cache, chunked batched prefill,
batched decode) that the synchronous `Engine` steps in the caller's thread and `BatchedEngine` runs in a
background thread.

Both are used one way: `engine.submit(prompt_ids, params)` -> `Request`; iterate it (`for`, `async for`)
for its token ids as they come, or `request.result()` -> `GenerationResult`; `engine.generate(prompts)`
for several at once. A finished, cancelled or abandoned request frees its row at once; a request that
failed raises its error to its reader, and a failing forward or draw fails only the requests it concerns.
`QueueFullError` (BatchedEngine.submit) is importable from here. Modules: `request` (what a client
holds), `scheduler` (the loop), `prompt_cache` (which row a request takes, what it reuses), `model_runner` (the
only caller of the model), `base`, `stepped` and `batched` (the two drivers).

The engine knows nothing about text, tokenizers or templates: token ids in, token ids out. Stop tokens are
never part of the output; `finish_reason` says why a sequence ended ("stop", "length" for max_new_tokens or
a full context, "cancelled", "error").
"""

from __future__ import annotations

from gpt2chat.engine.batched import BatchedEngine
from gpt2chat.engine.prompt_cache import PromptCacheStats
from gpt2chat.engine.request import GenerationResult, QueueFullError, Request, TokenLogprob
from gpt2chat.engine.stepped import Engine

__all__ = [
    "Engine", "BatchedEngine", "GenerationResult", "Request", "QueueFullError", "TokenLogprob", "PromptCacheStats",
]  # fmt: skip

