"""The prompt cache: which cache row a new request takes and how many of its prompt tokens it reuses there.

Every cache row remembers the token ids whose keys / values it holds (`RowTokens`): a running request's
prompt and fed tokens, and, once it ends, the same tokens kept as a cache entry until another request
needs the row. A new request goes to the row that shares the longest prefix with its prompt:

- a free row with that prefix is taken in place (llama.cpp's slots: the next turn of a conversation lands
  where the previous turn left its history, nothing copied);
- a prefix held by a busy row (many requests with one system prompt) is copied into a free row, the one
  that holds nothing, else the least recently used one (its entry is evicted).

The request then prefills only the tokens after the reused prefix. At least one prompt token is always
prefilled (its logits give the first reply token), and a request that asks for prompt log-probabilities
reuses nothing (every prompt position's logits are needed). Positions past a row's remembered tokens are
never read, so a reused row is exactly a cold one up to those tokens.

This module knows nothing about models, tensors or threads: it picks rows; the scheduler copies and
prefills.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PromptCache", "PromptCacheStats", "Placement", "common_prefix"]


@dataclass
class PromptCacheStats:
    """Counters since the engine started: `queries` requests admitted, `hits` of them with a reused prefix,
    `cached_tokens` prompt tokens reused out of `prompt_tokens` admitted, `evictions` cache entries dropped
    for an unrelated request."""

    queries: int = 0
    hits: int = 0
    cached_tokens: int = 0
    prompt_tokens: int = 0
    evictions: int = 0

    def snapshot(self) -> PromptCacheStats:
        return PromptCacheStats(self.queries, self.hits, self.cached_tokens, self.prompt_tokens, self.evictions)


@dataclass(frozen=True)
class Placement:
    """Where a request goes: cache row `row`, its first `reuse` prompt tokens taken from row `source`
    (`source == row`: already there; otherwise copied from `source` first)."""

    row: int
    reuse: int
    source: int


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists (slice compares in C, binary search)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        mid = (low + high) // 2
        if a[low:mid] == b[low:mid]:
            low = mid
        else:
            high = mid
    return low


class PromptCache:
    """Token ids held by each of `rows` cache rows and the choice of a row for each new request.

    `tokens[row]` is the list of token ids whose keys / values row `row` holds, in order; the scheduler
    extends it as it fills the row (the same list object the running request's row appends to).
    `enabled` False: every request prefills its whole prompt (the rows are still chosen lowest first).
    """

    def __init__(self, rows: int, enabled: bool = True):
        self.enabled = enabled
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self._last_used = [0] * rows
        self._clock = 0
        self.stats = PromptCacheStats()

    def place(self, prompt: list[int], free_rows: Sequence[int], reuse_allowed: bool = True) -> Placement:
        """The row for a new request with `prompt` among `free_rows` (not empty), and what it reuses."""
        best_row, best = free_rows[0], 0
        if self.enabled and reuse_allowed:
            limit = len(prompt) - 1  # the last prompt token is always computed: its logits give token 1
            free = set(free_rows)
            for row, held in enumerate(self.tokens):
                if not held or len(held) < best:
                    continue
                shared = min(common_prefix(prompt, held), limit)
                # ties: a free row (nothing to copy) over a busy one, then the lowest row
                if shared > best or (shared == best and row in free and best_row not in free):
                    best_row, best = row, shared
        if best and best_row in free_rows:
            target = best_row
        else:
            target = self._victim(free_rows)
        return Placement(target, best, best_row if best else target)

    def _victim(self, free_rows: Sequence[int]) -> int:
        """A free row to give to an unrelated request: one holding nothing (lowest first), else the least
        recently used."""
        empty = [row for row in free_rows if not self.tokens[row]]
        if empty:
            return empty[0]
        return min(free_rows, key=lambda row: self._last_used[row])

    def admit(self, placement: Placement, prompt_tokens: int) -> list[int]:
        """Book `placement` for a prompt of `prompt_tokens`: the row's token list, cut to the reused prefix
        (the caller copies keys / values first when `source != row`)."""
        stats = self.stats
        stats.queries += 1
        stats.prompt_tokens += prompt_tokens
        row, reuse = placement.row, placement.reuse
        held = self.tokens[row]
        if held and (placement.source != row or reuse == 0):
            stats.evictions += 1
        if reuse:
            stats.hits += 1
            stats.cached_tokens += reuse
        tokens = list(self.tokens[placement.source][:reuse])
        self.tokens[row] = tokens
        return tokens

    def release(self, row: int, keep: bool = True) -> None:
        """Row `row`'s request ended: its tokens stay as a cache entry (`keep`), or are dropped (its keys /
        values may be incomplete, as after a failed forward)."""
        self._clock += 1
        self._last_used[row] = self._clock
        if not keep:
            self.tokens[row] = []

    def limit_row(self, row: int, length: int) -> None:
        """Row `row` holds at most `length` valid positions from now on (a position past them is written)."""
        del self.tokens[row][length:]
