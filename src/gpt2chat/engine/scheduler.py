"""The one generation loop: admit requests into free cache rows, prefill them in chunks, decode every row.

`Scheduler.step()` does one round of work for every request it holds:

1. requests cancelled since the last step give their rows back (no more work is done for them);
2. waiting requests are admitted into free cache rows: the row that already holds the longest prefix of
   the prompt (`prompt_cache`: taken in place, or copied from a busy row), else an empty row (lowest
   first, so busy rows stay packed at the top), else the least recently used one;
3. one decode step feeds every running row its last token;
4. one chunk of prompt tokens of the rows still prefilling runs in one batched prefill: the whole
   `prefill_tokens` budget while no stream decodes, else what `ChunkPolicy` says fits a bounded stall (a
   long prompt is cut into chunks over several steps, so a running stream waits for one chunk at most);
5. every row with fresh logits (a prompt that completed, a decoded row) is sampled in one call, and its
   token is delivered; a row that stops or reaches its limit is freed at once (its tokens stay cached).

A batched forward or draw that raises is retried row by row: a row that fails alone ends with "error"
(its reader gets the exception), the others go on in the same step.

The synchronous `Engine` calls `step()` in the caller's thread; `BatchedEngine` calls it in its own thread.
Both see the same behaviour, because there is no other loop. The model is reached only through the
`ModelRunner`.

This module knows nothing about threads, text or how the model computes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

import torch

from gpt2chat.engine.chunk_policy import ChunkPolicy
from gpt2chat.engine.model_runner import ModelRunner, PrefillChunk
from gpt2chat.engine.prompt_cache import WAIT_FOR_PREFIX, PromptCache, common_prefix
from gpt2chat.engine.request import Request, TokenLogprob
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.sampling import SamplingParams, sample_next

__all__ = ["Scheduler", "check_prompt", "token_logprobs"]


def check_prompt(prompt_ids: Sequence[int], context: int, vocab_size: int) -> list[int]:
    """The prompt as a list of ints; Gpt2ChatError when it is empty, too long or out of vocabulary."""
    try:
        prompt = [int(t) for t in prompt_ids]
    except (TypeError, ValueError):
        raise Gpt2ChatError("a prompt must be a sequence of token ids") from None
    if not prompt:
        raise Gpt2ChatError("the prompt is empty: give at least one token")
    if len(prompt) >= context:
        raise Gpt2ChatError(
            f"the prompt is {len(prompt)} tokens but the model's context is {context} tokens "
            f"(prompt + reply must fit): shorten the prompt to at most {context - 1} tokens"
        )
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise Gpt2ChatError(f"token id {bad} in the prompt is outside the model's vocabulary (0 .. {vocab_size - 1})")
    return prompt


def token_logprobs(logits: torch.Tensor, token_ids, tops: Sequence[int | None]) -> list[TokenLogprob | None]:
    """Per row of `logits` [N, V]: the log-probability of `token_ids[row]` plus the `tops[row]` most likely
    tokens, or None where `tops[row]` is None. One log_softmax and one host transfer for all rows."""
    wanted = [row for row, k in enumerate(tops) if k is not None]
    entries: list[TokenLogprob | None] = [None] * len(tops)
    if not wanted:
        return entries
    index = torch.tensor(wanted, device=logits.device)
    logp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    chosen_ids = torch.as_tensor(token_ids, device=logits.device).reshape(-1).index_select(0, index)
    chosen = logp.gather(1, chosen_ids[:, None])[:, 0].tolist()
    k_max = max(tops[row] for row in wanted)
    top_values, top_ids = logp.topk(k_max, dim=-1) if k_max else (logp[:, :0], logp[:, :0].long())
    top_values, top_ids, chosen_ids = top_values.tolist(), top_ids.tolist(), chosen_ids.tolist()
    for i, row in enumerate(wanted):
        k = tops[row]
        entries[row] = TokenLogprob(chosen_ids[i], chosen[i], tuple(zip(top_ids[i][:k], top_values[i][:k], strict=True)))
    return entries


def _reply_limit(request: Request, context: int) -> int:
    """The most tokens `request` may generate: its max_new_tokens, and prompt + reply never exceed the context."""
    return min(request.params.max_new_tokens, context - len(request.prompt_ids))


def _each_alone(keys: Sequence[int], run) -> tuple[dict, dict[int, BaseException]]:
    """`run(key)` for each key on its own, after a batched step that raised -> (results by key, errors by
    key): the keys whose work fails alone are the ones that failure concerns."""
    results, errors = {}, {}
    for key in keys:
        try:
            results[key] = run(key)
        except Exception as error:  # noqa: BLE001 - it fails that request only
            errors[key] = error
    return results, errors


class _Row:
    """One request in a cache row: the tokens cached there, what it feeds next, how far it may go."""

    __slots__ = ("request", "prompt", "params", "ids", "next_token", "limit", "draws", "constraint")

    def __init__(self, request: Request, context: int, ids: list[int]):
        self.request = request
        self.prompt = request.prompt_ids
        self.params: SamplingParams = request.params
        # token ids whose keys / values the row holds, in order (the prompt cache's list for this row:
        # a reused prefix, then prompt chunks and fed tokens as they are cached)
        self.ids = ids
        self.next_token: int | None = None  # sampled, not yet fed back (set once the prompt is cached)
        self.limit = _reply_limit(request, context)
        self.draws = 0  # tokens sampled so far: the counter of the row's seeded draws
        self.constraint = self.params.constraint.start() if self.params.constraint is not None else None

    @property
    def cached(self) -> int:
        """Positions of this row's cache filled."""
        return len(self.ids)

    @property
    def prefilling(self) -> bool:
        return len(self.ids) < len(self.prompt)


class Scheduler:
    """Continuous batching of requests over the rows of one KV cache (see the module docstring).

    `max_rows`: cache rows, the most requests decoded together. `prefill_tokens`: the most prompt tokens
    one step prefills. `prefill_chunk`: the chunk while streams decode (None: timed, `ChunkPolicy`).
    `context`: the longest prompt + reply a row holds. `prompt_cache`: reuse the longest cached prefix of
    each prompt (`gpt2chat.engine.prompt_cache`).
    """

    def __init__(self, runner: ModelRunner, max_rows: int, context: int, prefill_tokens: int = 512,
                 prompt_cache: bool = True, prefill_chunk: int | None = None):  # fmt: skip
        if max_rows < 1:
            raise Gpt2ChatError("max_rows must be >= 1")
        self.runner = runner
        self.max_rows = max_rows
        self.context = context
        self.chunks = ChunkPolicy(prefill_tokens, prefill_chunk)
        self.rows: list[_Row | None] = [None] * max_rows
        self.pending: deque[Request] = deque()
        self.prompt_cache = PromptCache(max_rows, enabled=prompt_cache)
        self._seen: torch.Tensor | None = None  # [max_rows, V] tokens each row's repetition penalty sees

    # ------------------------------------------------------------------ state
    @property
    def active_count(self) -> int:
        return sum(row is not None for row in self.rows)

    @property
    def pending_count(self) -> int:
        return len(self.pending)

    def has_work(self) -> bool:
        return bool(self.pending) or any(row is not None for row in self.rows)

    def add(self, request: Request) -> None:
        """Queue a request whose prompt was checked (`check_prompt`)."""
        self.pending.append(request)

    def release(self, request: Request, reason: str = "cancelled") -> None:
        """Finish `request` now and free its row (or drop it from the queue)."""
        for index, row in enumerate(self.rows):
            if row is not None and row.request is request:
                self._free(index, reason)
                return
        if request in self.pending:
            self.pending.remove(request)
        request._finish(reason)

    def fail_all(self, reason: str, error: BaseException | None = None, waiting: bool = True) -> None:
        """Finish every request in a row, and (`waiting`) those queued (engine closed, a bug in a step)."""
        for index, row in enumerate(self.rows):
            if row is not None:
                self._free(index, reason, error)
        while waiting and self.pending:
            self.pending.popleft()._finish(reason, error)

    # ------------------------------------------------------------------ the loop
    def step(self) -> None:
        """One round of work for every request held (see the module docstring)."""
        self._drop_cancelled()
        self._admit()
        sampled_rows: list[int] = []
        logits_parts: list[torch.Tensor] = []
        decoding = [index for index, row in enumerate(self.rows) if row is not None and row.next_token is not None]
        if decoding:
            decoded, logits = self._decode(decoding)
            if decoded:
                logits_parts.append(logits)
                sampled_rows += decoded
        finished_prompts, prompt_logits = self._prefill(self.chunks.budget(len(decoding)))
        if finished_prompts:
            logits_parts.append(prompt_logits)
            sampled_rows += finished_prompts
        if sampled_rows:
            logits = logits_parts[0] if len(logits_parts) == 1 else torch.cat(logits_parts)
            self._sample_and_deliver(sampled_rows, logits)

    def _drop_cancelled(self) -> None:
        if any(request.cancelled for request in self.pending):
            for request in [r for r in self.pending if r.cancelled]:
                self.pending.remove(request)
                request._finish("cancelled")
        for index, row in enumerate(self.rows):
            if row is not None and row.request.cancelled:
                self._free(index, "cancelled")

    def _admit(self) -> None:
        waiting: list[Request] = []  # for a prompt being prefilled that holds more of theirs (prompt_cache)
        while self.pending:
            free_rows = [index for index, row in enumerate(self.rows) if row is None]
            if not free_rows:
                break
            request = self.pending.popleft()
            if self._worth_waiting(request):
                waiting.append(request)
                continue
            prompt = request.prompt_ids
            placement = self.prompt_cache.place(prompt, free_rows, reuse_allowed=request.params.prompt_logprobs is None)
            index = placement.row
            self.runner.reserve(index + 1, len(prompt) + _reply_limit(request, self.context))
            if placement.source != index:
                self.runner.copy_prefix(placement.source, index, placement.reuse)
            row = self.rows[index] = _Row(request, self.context, self.prompt_cache.admit(placement, len(prompt)))
            request.cached_tokens = placement.reuse
            if row.params.repetition_penalty != 1.0:
                seen = self._seen_rows()
                seen[index] = False
                seen[index, torch.tensor(row.prompt, device=seen.device)] = True
        self.pending.extendleft(reversed(waiting))

    def _worth_waiting(self, request: Request) -> bool:
        """Whether `request` gains `WAIT_FOR_PREFIX` or more cached tokens by waiting for a prompt that a
        row is still prefilling (then it is admitted once that prefill is done)."""
        cache = self.prompt_cache
        if not cache.enabled or request.params.prompt_logprobs is not None:
            return False
        prompt = request.prompt_ids
        coming = max((common_prefix(prompt, row.prompt) for row in self.rows if row is not None and row.prefilling),
                     default=0)  # fmt: skip
        return min(coming, len(prompt) - 1) - cache.longest(prompt) >= WAIT_FOR_PREFIX

    def _seen_rows(self) -> torch.Tensor:
        if self._seen is None:
            vocab = self.runner.vocab_size
            self._seen = torch.zeros(self.max_rows, vocab, dtype=torch.bool, device=self.runner.device)
        return self._seen

    def _free(self, index: int, reason: str, error: BaseException | None = None) -> None:
        row = self.rows[index]
        self.rows[index] = None
        # a failed request's row may hold keys / values a failed forward half wrote: keep nothing of it
        self.prompt_cache.release(index, keep=reason != "error")
        if row is not None:
            row.request._finish(reason, error)

    def _fail(self, indices: list[int], errors: dict[int, BaseException]) -> list[int]:
        """Free the rows in `errors` with finish_reason "error" -> the rows of `indices` that did not fail."""
        for index, error in errors.items():
            self._free(index, "error", error)
        return [index for index in indices if index not in errors]

    def _decode(self, decoding: list[int]) -> tuple[list[int], torch.Tensor | None]:
        """One decode step over the rows from the first decoding row to the last (`decode_window`) ->
        the rows decoded and their logits [rows, V]. Rows in that range that are not decoding get a dummy
        token at a position nothing reads: a prefilling row's next position (its next chunk overwrites it),
        a free row's first position past its cached tokens.

        If the step fails, every row is decoded alone: a row that fails alone fails ("error"), the others go on."""
        first, width = self.runner.decode_window(decoding[0], decoding[-1])
        cache_len = self.runner.cache.max_len
        tokens, positions = [0] * width, [0] * width
        for offset in range(width):
            index = first + offset
            row = self.rows[index]
            if row is None:
                position = min(len(self.prompt_cache.tokens[index]), cache_len - 1)
                self.prompt_cache.limit_row(index, position)
                positions[offset] = position
                continue
            positions[offset] = row.cached  # a row still prefilling writes a slot its next chunk overwrites
            if row.next_token is not None:
                tokens[offset] = row.next_token
        try:
            started = time.perf_counter()
            logits = self.runner.decode(tokens, positions, first_row=first)
            self.chunks.record_decode(time.perf_counter() - started)
            if decoding != list(range(first, first + width)):
                logits = logits.index_select(0, torch.tensor([i - first for i in decoding], device=logits.device))
        except Exception:  # noqa: BLE001 - find the rows it concerns
            parts, errors = _each_alone(
                decoding, lambda index: self.runner.decode([tokens[index - first]], [positions[index - first]],
                                                           rows=[index]))
            decoding = self._fail(decoding, errors)
            logits = torch.cat([parts[index] for index in decoding]) if decoding else None
        for index in decoding:
            row = self.rows[index]
            row.ids.append(row.next_token)
        return decoding, logits

    def _prefill(self, budget: int) -> tuple[list[int], torch.Tensor | None]:
        """Up to `budget` prompt tokens of the rows still prefilling, in one batched forward (if it fails,
        each chunk alone: a chunk that fails alone fails its request, the others go on).

        Returns the rows whose prompt is now fully cached and the logits of their last prompt position."""
        chunks: list[PrefillChunk] = []
        for index, row in enumerate(self.rows):
            if budget == 0:
                break
            if row is None or not row.prefilling:
                continue
            take = min(budget, len(row.prompt) - row.cached)
            budget -= take
            chunks.append(PrefillChunk(
                row=index, start=row.cached, token_ids=row.prompt[row.cached : row.cached + take],
                all_logits=row.params.prompt_logprobs is not None,
            ))  # fmt: skip
        if not chunks:
            return [], None
        try:
            started = time.perf_counter()
            outputs = self.runner.prefill(chunks)
            self.chunks.record_prefill(sum(len(c.token_ids) for c in chunks), time.perf_counter() - started)
        except Exception:  # noqa: BLE001 - find the chunks it concerns
            by_row = {chunk.row: chunk for chunk in chunks}
            parts, errors = _each_alone(list(by_row), lambda row: self.runner.prefill([by_row[row]])[0])
            chunks = [by_row[row] for row in self._fail(list(by_row), errors)]
            outputs = [parts[chunk.row] for chunk in chunks]
        finished, last_logits = [], []
        for chunk, logits in zip(chunks, outputs, strict=True):
            row = self.rows[chunk.row]
            row.ids.extend(chunk.token_ids)
            if chunk.all_logits:
                self._score_prompt(row, chunk, logits)
            if not row.prefilling:
                finished.append(chunk.row)
                last_logits.append(logits[-1:])
        return finished, (torch.cat(last_logits) if finished else None)

    @staticmethod
    def _score_prompt(row: _Row, chunk: PrefillChunk, logits: torch.Tensor) -> None:
        """Prompt log-probabilities of the tokens this chunk's positions predict (entry 0 is None)."""
        if chunk.start == 0:
            row.request.prompt_logprobs.append(None)
        end = min(chunk.start + len(chunk.token_ids), len(row.prompt) - 1)  # the last position predicts the reply
        if end > chunk.start:
            targets = row.prompt[chunk.start + 1 : end + 1]
            tops = [row.params.prompt_logprobs] * len(targets)
            row.request.prompt_logprobs.extend(token_logprobs(logits[: len(targets)], targets, tops))

    def _choose(self, indices: list[int], logits: torch.Tensor) -> tuple[list[int], list[TokenLogprob | None]]:
        """The next token of each row of `indices` from its logits, and its logprob entry (if asked)."""
        params = [self.rows[index].params for index in indices]
        seen = None
        if self._seen is not None and any(p.repetition_penalty != 1.0 for p in params):
            seen = self._seen.index_select(0, torch.tensor(indices, device=self._seen.device))
        next_ids = sample_next(logits, seen, params, [self.rows[index].draws for index in indices],
                               [self.rows[index].constraint for index in indices])
        entries = token_logprobs(logits, next_ids, [p.logprobs for p in params])
        if seen is not None:
            self._seen[torch.tensor(indices, device=self._seen.device), next_ids.to(self._seen.device)] = True
        return next_ids.tolist(), entries

    def _sample_and_deliver(self, indices: list[int], logits: torch.Tensor) -> None:
        try:
            tokens, entries = self._choose(indices, logits)
        except Exception:  # noqa: BLE001 - sample each row alone: a row that fails alone fails its request
            position = {index: k for k, index in enumerate(indices)}
            chosen, errors = _each_alone(
                indices, lambda index: self._choose([index], logits[position[index] : position[index] + 1]))
            indices = self._fail(indices, errors)
            tokens = [chosen[index][0][0] for index in indices]
            entries = [chosen[index][1][0] for index in indices]
        now = time.perf_counter()
        for index, token, entry in zip(indices, tokens, entries, strict=True):
            row = self.rows[index]
            request = row.request
            request._sampled(now)
            row.draws += 1
            if token in row.params.stop_token_ids:
                self._free(index, "stop")
                continue
            request._deliver(token, entry)
            if len(request.token_ids) >= row.limit:
                self._free(index, "length")
            else:
                row.next_token = token
