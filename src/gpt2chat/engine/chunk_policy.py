"""How many prompt tokens one scheduler step prefills: the chunk size, chosen so a step's time stays bounded.

A step runs one decode forward for every running stream and then at most one prefill chunk (the rows
still prefilling share it). While no stream is decoding nobody waits on a prefill, so the chunk is the
whole budget (`max_tokens`, the engine's `prefill_tokens`): the fastest way to a first token. While
streams decode, every prompt token of the chunk delays their next token, so the chunk is cut to what fits
`stall_s` seconds of prefill: a stream's longest gap between two tokens is one decode step plus one
bounded chunk, however long the prompt that arrived.

What a chunk of n tokens costs is learnt from the forwards the scheduler times: `t(n) = a + b * n`, with
`a` the fixed cost of a forward (weights read once; measured as a decode step) and `b` the cost of one
more token; both are running means, so the chunk follows the machine's load. `chunk_tokens` fixes the
chunk while streams decode instead (tests count steps and tokens with it, never wall time).

This module knows nothing about requests, rows or the model.
"""

from __future__ import annotations

from gpt2chat.errors import Gpt2ChatError

__all__ = ["ChunkPolicy", "STALL_S"]

STALL_S = 0.25  # the prefill a running stream may wait for in one step (s): a hiccup, not a freeze
_FIRST_CHUNK = 64  # while streams decode and nothing is measured yet
_MIN_CHUNK = 16  # below this a chunk costs mostly its fixed weight read: prefill would crawl
_WEIGHT = 0.25  # of a new measure in the running means


class ChunkPolicy:
    """The prefill chunk of each step (see the module docstring).

    `max_tokens`: the most prompt tokens of one step. `chunk_tokens`: the chunk while streams decode (None:
    what fits `stall_s` seconds, from the timings `record_decode` / `record_prefill` report).
    """

    def __init__(self, max_tokens: int, chunk_tokens: int | None = None, stall_s: float = STALL_S):
        if max_tokens < 1 or (chunk_tokens is not None and chunk_tokens < 1) or stall_s <= 0:
            raise Gpt2ChatError("prefill_tokens and prefill_chunk must be >= 1, and the stall bound > 0 s")
        self.max_tokens = max_tokens
        self.chunk_tokens = chunk_tokens
        self.stall_s = stall_s
        self.fixed_s: float | None = None  # a: one forward's cost whatever its tokens (a decode step's)
        self.per_token_s: float | None = None  # b: one more prompt token

    def budget(self, decoding: int) -> int:
        """Prompt tokens this step may prefill while `decoding` streams wait on it."""
        if not decoding:
            return self.max_tokens
        if self.chunk_tokens is not None:
            return min(self.chunk_tokens, self.max_tokens)
        if self.per_token_s is None:
            return min(_FIRST_CHUNK, self.max_tokens)
        fits = (self.stall_s - (self.fixed_s or 0.0)) / max(self.per_token_s, 1e-9)
        return max(min(_MIN_CHUNK, self.max_tokens), min(self.max_tokens, int(fits)))

    def record_decode(self, seconds: float) -> None:
        """A decode forward took `seconds`: the fixed cost of a forward."""
        self.fixed_s = _mean(self.fixed_s, seconds)

    def record_prefill(self, tokens: int, seconds: float) -> None:
        """A prefill forward of `tokens` prompt tokens took `seconds`."""
        if tokens < _MIN_CHUNK:  # mostly fixed cost: it says little about one more token
            return
        self.per_token_s = _mean(self.per_token_s, max(0.0, seconds - (self.fixed_s or 0.0)) / tokens)


def _mean(old: float | None, new: float) -> float:
    return new if old is None else (1 - _WEIGHT) * old + _WEIGHT * new
