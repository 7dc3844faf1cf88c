"""Generation on token ids: prefill, KV-cache decode, streaming, several sequences, continuous batching.

`Engine` runs one call at a time: `generate` takes several prompts of different lengths at once (each row
fills the shared cache at its own length), `stream` yields one prompt's tokens as they come.
`BatchedEngine` owns a background thread that serves many requests through one cache: a new request is
prefilled into a free cache row between decode steps and then joins the batched decode step; a finished or
cancelled request frees its row at once.

The engine knows nothing about text, tokenizers or templates: token ids in, token ids out. Stop tokens are
never part of the output; `finish_reason` says why a sequence ended ("stop", "length" for max_new_tokens or
a full context, "cancelled").
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from gpt2chat.device import device_and_dtype
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.model import GPT, AttentionPlan, KVCache
from gpt2chat.sampling import SamplingParams, make_generator, sample_next

__all__ = [
    "Engine", "BatchedEngine", "GenerationResult", "Request", "QueueFullError", "TokenStream", "TokenLogprob",
]  # fmt: skip


class QueueFullError(Gpt2ChatError):
    """The batched engine already holds `max_queue` requests waiting for a free row."""


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model's raw distribution (log_softmax of the logits, fp32,
    before repetition penalty, temperature and top-k / top-p), and the `top` most likely tokens there as
    (token_id, logprob) pairs, most likely first (empty unless asked for)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


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
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    for i, row in enumerate(wanted):
        k = tops[row]
        top = tuple(zip(top_ids[i][:k], top_values[i][:k], strict=True))
        entries[row] = TokenLogprob(int(chosen_ids[i]), chosen[i], top)
    return entries


def prompt_token_logprobs(logits: torch.Tensor, prompt: list[int], top: int) -> list[TokenLogprob | None]:
    """`logits` [T, V] of every prompt position -> entry per prompt token (None for the first one)."""
    if len(prompt) < 2:
        return [None] * len(prompt)
    return [None, *token_logprobs(logits[:-1], prompt[1:], [top] * (len(prompt) - 1))]


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token of token_ids (if asked)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # one per prompt token
    ttft_s: float | None = None  # call -> first token sampled
    decode_s: float | None = None  # first -> last token sampled

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def use_decode_layout(model: GPT, device: torch.device, dtype: torch.dtype) -> bool:
    """On CPU in fp32, store every Linear weight column-major (values and shapes unchanged).

    A decode step multiplies one row by each weight. With the weight `[out, in]` stored column-major,
    `F.linear` reads it as a contiguous `[in, out]` matrix: the "NN" GEMV, which MKL streams from memory
    about 1.4x faster than the "NT" one on the 2-core AMD EPYC we measure on (benchmarks/decode.py).
    bf16 on CPU is the other way round (its fast kernel wants the row-major weight), and CUDA does not
    care, so only CPU fp32 is changed. The tied `lm_head` / `wte` weight is one tensor and moves once;
    the embedding lookup reads strided rows, which costs microseconds. Saving a checkpoint afterwards is
    unaffected (`hf_state_dict` makes tensors contiguous).
    """
    if device.type != "cpu" or dtype != torch.float32:
        return False
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.is_contiguous():
                module.weight.data = module.weight.data.t().contiguous().t()
    return True


class _Sequence:
    """Book-keeping of one row: its prompt, its tokens so far, its sampler state, its timing."""

    __slots__ = ("prompt", "params", "generator", "tokens", "finish_reason", "limit", "logprobs",
                 "prompt_logprobs", "submitted_at", "first_at", "last_at")  # fmt: skip

    def __init__(self, prompt: list[int], params: SamplingParams, generator, context: int,
                 submitted_at: float | None = None, logprobs: list | None = None,
                 prompt_logprobs: list | None = None):  # fmt: skip
        self.prompt = prompt
        self.params = params
        self.generator = generator
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        # total length (prompt + reply) never exceeds the context
        self.limit = min(params.max_new_tokens, context - len(prompt))
        self.logprobs: list[TokenLogprob] = [] if logprobs is None else logprobs
        self.prompt_logprobs: list[TokenLogprob | None] = [] if prompt_logprobs is None else prompt_logprobs
        self.submitted_at = time.perf_counter() if submitted_at is None else submitted_at
        self.first_at: float | None = None
        self.last_at: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.submitted_at

    @property
    def decode_s(self) -> float | None:
        return None if self.first_at is None else self.last_at - self.first_at

    def add(self, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Record a sampled token; return True if it is output (not a stop token)."""
        self.last_at = time.perf_counter()
        if self.first_at is None:
            self.first_at = self.last_at
        if token in self.params.stop_token_ids:
            self.finish_reason = "stop"
            return False
        if logprob is not None:
            self.logprobs.append(logprob)
        self.tokens.append(token)
        if len(self.tokens) >= self.limit:
            self.finish_reason = "length"
        return True

    def result(self) -> GenerationResult:
        return GenerationResult(self.tokens, self.finish_reason, len(self.prompt), self.logprobs,
                                self.prompt_logprobs, self.ttft_s, self.decode_s)  # fmt: skip


class Engine:
    """Prefill + KV-cache decode of a `GPT` on token ids (see the module docstring).

    The model is moved to `device` / `dtype` (default: CUDA + bf16 when present, else CPU + fp32) and put
    in eval mode; on CPU in fp32 its Linear weights are re-strided for fast decode (`use_decode_layout`;
    `decode_layout=False` leaves them alone).
    """

    def __init__(self, model: GPT, device=None, dtype=None, decode_layout: bool = True):
        self.device, self.dtype = device_and_dtype(device, dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        if decode_layout:
            use_decode_layout(self.model, self.device, self.dtype)
        self.config = model.config
        self.context = self.config.n_positions
        self._cache: KVCache | None = None  # reused by the next call unless a stream still holds it
        self._cache_busy = False

    # ------------------------------------------------------------------ checks
    def check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        """The prompt as a list of ints; Gpt2ChatError when it is empty, too long or out of vocabulary."""
        try:
            prompt = [int(t) for t in prompt_ids]
        except (TypeError, ValueError):
            raise Gpt2ChatError("a prompt must be a sequence of token ids") from None
        if not prompt:
            raise Gpt2ChatError("the prompt is empty: give at least one token")
        if len(prompt) >= self.context:
            raise Gpt2ChatError(
                f"the prompt is {len(prompt)} tokens but the model's context is {self.context} tokens "
                f"(prompt + reply must fit): shorten the prompt to at most {self.context - 1} tokens"
            )
        vocab = self.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise Gpt2ChatError(
                f"token id {bad[0]} in the prompt is outside the model's vocabulary (0 .. {vocab - 1})"
            )
        return prompt

    # ------------------------------------------------------------------ public API
    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None):
        """Generate for several prompts at once -> one `GenerationResult` per prompt.

        `prompts`: a list of token-id lists (a flat list of ints counts as one prompt). `params`: one
        `SamplingParams` for all rows or one per row.
        """
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        sequences = self._start(prompts, params)
        for _ in self._run(sequences):
            pass
        return [s.result() for s in sequences]

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> TokenStream:
        """Yield the reply's token ids one by one; `.finish_reason` is set once the iterator is exhausted."""
        sequences = self._start([prompt_ids], params)
        return TokenStream(sequences[0], self._run(sequences))

    # ------------------------------------------------------------------ internals
    def _start(self, prompts, params) -> list[_Sequence]:
        if not prompts:
            raise Gpt2ChatError("no prompts given")
        params = params or SamplingParams()
        per_row = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_row) != len(prompts):
            raise Gpt2ChatError(f"got {len(per_row)} SamplingParams for {len(prompts)} prompts")
        checked = [self.check_prompt(p) for p in prompts]
        if isinstance(params, SamplingParams):  # one generator shared by the batch, like HF
            shared = make_generator(params.seed, self.device)
            generators = [shared] * len(checked)
        else:
            generators = [make_generator(p.seed, self.device) for p in per_row]
        return [
            _Sequence(p, sp, g, self.context) for p, sp, g in zip(checked, per_row, generators, strict=True)
        ]

    def _new_cache(self, batch: int, max_len: int) -> KVCache:
        if self._cache_busy:  # another stream of this engine is still open: never share its rows
            return KVCache(self.config, batch, max_len, self.device, self.dtype)
        cache = self._cache
        if cache is None or cache.batch_size != batch or cache.max_len < max_len:
            cache = self._cache = KVCache(self.config, batch, max_len, self.device, self.dtype)
        self._cache_busy = True
        return cache

    def _sampler_args(self, sequences: list[_Sequence]):
        params = [s.params for s in sequences]
        first = params[0]
        shared = all(p is first for p in params) and all(
            s.generator is sequences[0].generator for s in sequences
        )
        if shared:
            return first, sequences[0].generator
        return params, [s.generator for s in sequences]

    def _run(self, sequences: list[_Sequence]) -> Iterator[list[tuple[int, int]]]:
        """Generator: after each step yields [(row, token)] of the tokens output at that step."""
        batch = len(sequences)
        # the last token of a row is never fed back, so a row needs at most limit - 1 cache slots past its prompt
        max_len = max(len(s.prompt) + s.limit - 1 for s in sequences)
        cache = self._new_cache(batch, max(max_len, max(len(s.prompt) for s in sequences)))
        try:
            yield from self._decode(sequences, cache)
        finally:
            if cache is self._cache:
                self._cache_busy = False

    def _decode(self, sequences: list[_Sequence], cache: KVCache) -> Iterator[list[tuple[int, int]]]:
        batch = len(sequences)
        params, generator = self._sampler_args(sequences)
        penalise = any(s.params.repetition_penalty != 1.0 for s in sequences)
        seen = self._seen_mask(sequences) if penalise else None
        logits = self._prefill(sequences, cache)
        lengths = [len(s.prompt) for s in sequences]  # filled cache positions of each row
        step_input = torch.empty(batch, 1, dtype=torch.long, device=self.device)
        live = list(range(batch))
        while True:
            with torch.inference_mode():
                next_ids = sample_next(logits, seen, params, generator)
                step_input[:, 0] = next_ids
                if seen is not None:
                    seen.scatter_(1, step_input, True)
            tokens = next_ids.tolist()
            tops = [sequences[row].params.logprobs if row in live else None for row in range(batch)]
            entries = token_logprobs(logits, next_ids, tops)
            emitted = []
            for row in live:
                if sequences[row].add(tokens[row], entries[row]):
                    emitted.append((row, tokens[row]))
            newly_done = [row for row in live if sequences[row].finish_reason is not None]
            if newly_done:
                live = [row for row in live if sequences[row].finish_reason is None]
                if live:  # finished rows keep riding along, rewriting their last cache slot
                    for row in newly_done:
                        lengths[row] -= 1
            yield emitted
            if not live:
                return
            with torch.inference_mode():
                logits = self.model(step_input, AttentionPlan.for_cache(self.config, cache, lengths, 1))[:, -1]
            for row in live:
                lengths[row] += 1

    def _prefill(self, sequences: list[_Sequence], cache: KVCache) -> torch.Tensor:
        """Run every prompt through the model into its cache row; logits [B, V] of each last position."""
        batch = len(sequences)
        by_length: dict[int, list[int]] = {}
        for row, s in enumerate(sequences):
            by_length.setdefault(len(s.prompt), []).append(row)
        with torch.inference_mode():
            logits = torch.empty(batch, self.config.vocab_size, device=self.device, dtype=self.dtype)
            for rows in by_length.values():
                ids = torch.tensor([sequences[r].prompt for r in rows], device=self.device)
                every_row = len(rows) == batch
                plan = AttentionPlan.for_cache(self.config, cache, [0] * len(rows), ids.shape[1],
                                               rows=None if every_row else rows)
                scored = any(sequences[r].params.prompt_logprobs is not None for r in rows)
                out = self.model(ids, plan, logits_to_keep=0 if scored else 1)
                for i, r in enumerate(rows):
                    if sequences[r].params.prompt_logprobs is not None:
                        s = sequences[r]
                        s.prompt_logprobs[:] = prompt_token_logprobs(
                            out[i], s.prompt, s.params.prompt_logprobs
                        )
                if every_row:
                    return out[:, -1]
                logits[torch.tensor(rows, device=self.device)] = out[:, -1]
            return logits

    def _seen_mask(self, sequences: list[_Sequence]) -> torch.Tensor:
        seen = torch.zeros(len(sequences), self.config.vocab_size, dtype=torch.bool, device=self.device)
        for row, s in enumerate(sequences):
            seen[row, torch.tensor(s.prompt, device=self.device)] = True
        return seen


class TokenStream:
    """Iterator over one prompt's reply tokens; `finish_reason` once exhausted."""

    def __init__(self, sequence: _Sequence, steps: Iterator[list[tuple[int, int]]]):
        self._sequence = sequence
        self._steps = steps
        self._pending: deque[int] = deque()

    @property
    def finish_reason(self) -> str | None:
        return self._sequence.finish_reason

    @property
    def prompt_tokens(self) -> int:
        return len(self._sequence.prompt)

    @property
    def completion_tokens(self) -> int:
        return len(self._sequence.tokens)

    @property
    def token_ids(self) -> list[int]:
        return list(self._sequence.tokens)

    @property
    def logprobs(self) -> list[TokenLogprob]:
        return self._sequence.logprobs

    @property
    def prompt_logprobs(self) -> list[TokenLogprob | None]:
        return self._sequence.prompt_logprobs

    @property
    def ttft_s(self) -> float | None:
        return self._sequence.ttft_s

    @property
    def decode_s(self) -> float | None:
        return self._sequence.decode_s

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> int:
        while not self._pending:
            emitted = next(self._steps)  # StopIteration ends the stream
            self._pending.extend(token for _, token in emitted)
        return self._pending.popleft()

    def close(self) -> None:
        """Stop generating (the rest of the reply is never computed)."""
        self._steps.close()
        if self._sequence.finish_reason is None:
            self._sequence.finish_reason = "cancelled"


# ---------------------------------------------------------------------- continuous batching

_END = object()


@dataclass(eq=False)
class Request:
    """One request to a `BatchedEngine`: iterate it (blocking or `async for`) to get its token ids.

    Leaving the iteration early (break, exception, client gone) cancels the request.
    """

    prompt_ids: list[int]
    params: SamplingParams
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # entry i is there before token i arrives
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # set before the first token
    ttft_s: float | None = None  # submit -> first token sampled
    decode_s: float | None = None  # first -> last token sampled
    submitted_at: float = field(default_factory=time.perf_counter, repr=False)
    _tokens: queue.SimpleQueue = field(default_factory=queue.SimpleQueue, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _async: tuple | None = field(default=None, repr=False)  # (loop, asyncio.Queue) once iterated async
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _engine: BatchedEngine | None = field(default=None, repr=False)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating; the row is freed before the next decode step. Iteration ends."""
        if not self._done.is_set():
            self._cancelled.set()
            if self._engine is not None:
                self._engine._wake()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    # called by the engine thread
    def _push(self, item) -> None:
        with self._lock:
            if self._async is None:
                self._tokens.put(item)
                return
            loop, async_queue = self._async
        try:
            loop.call_soon_threadsafe(async_queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancelled.set()

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        self.finish_reason = reason
        if error is not None:
            self._push(error)
        self._push(_END)
        self._done.set()

    # consumer side
    def __iter__(self) -> Iterator[int]:
        finished = False
        try:
            while True:
                item = self._tokens.get()
                if item is _END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:
                self.cancel()

    async def _aiter(self):
        loop = asyncio.get_running_loop()
        async_queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._async is not None:
                raise RuntimeError("a Request can be iterated only once")
            while True:  # tokens that arrived before the async consumer did
                try:
                    async_queue.put_nowait(self._tokens.get_nowait())
                except queue.Empty:
                    break
            self._async = (loop, async_queue)
        finished = False
        try:
            while True:
                item = await async_queue.get()
                if item is _END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:
                self.cancel()

    def __aiter__(self):
        return self._aiter()


class _Slot:
    __slots__ = ("request", "sequence", "last_token")

    def __init__(self, request: Request, sequence: _Sequence):
        self.request = request
        self.sequence = sequence
        self.last_token = 0


class BatchedEngine:
    """Continuous batching over one KV cache of `max_batch_size` rows, served by a background thread.

    `max_len` bounds each row's cache (default: the model's context); `max_queue` bounds the requests
    waiting for a row (`submit` raises `QueueFullError` beyond it).
    """

    def __init__(
        self,
        model: GPT,
        max_batch_size: int = 16,
        max_queue: int = 64,
        device=None,
        dtype=None,
        max_len: int | None = None,
    ):
        if max_batch_size < 1 or max_queue < 0:
            raise Gpt2ChatError("max_batch_size must be >= 1 and max_queue >= 0")
        self.engine = Engine(model, device=device, dtype=dtype)
        self.model, self.config = self.engine.model, self.engine.config
        self.device, self.dtype = self.engine.device, self.engine.dtype
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.context = min(self.config.n_positions, max_len or self.config.n_positions)
        self.cache = KVCache(self.config, max_batch_size, self.context, self.device, self.dtype)
        self._lengths = [0] * max_batch_size  # filled cache positions of each row
        self._slots: list[_Slot | None] = [None] * max_batch_size
        self._pending: deque[Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="gpt2chat-batched-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> Request:
        params = params or SamplingParams()
        prompt = self.engine.check_prompt(prompt_ids)
        if len(prompt) >= self.context:
            raise Gpt2ChatError(
                f"the prompt is {len(prompt)} tokens but this engine's rows hold {self.context} tokens"
            )
        request = Request(prompt, params, _engine=self)
        with self._cond:
            if self._closed:
                raise Gpt2ChatError("the engine is closed")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(
                    f"the request queue is full ({self.max_queue} requests waiting); try again later"
                )
            self._pending.append(request)
            self._cond.notify()
        return request

    @property
    def active_count(self) -> int:
        return sum(slot is not None for slot in self._slots)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread; unfinished requests end with finish_reason "cancelled"."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> BatchedEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ the serving thread
    def _serve(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closed and not self._pending and not self._has_active():
                        self._cond.wait()
                    if self._closed:
                        break
                try:
                    self._admit()
                    self._drop_cancelled()
                    if self._has_active():
                        self._decode_step()
                except Exception as error:  # a bug: fail the requests in flight, keep serving
                    for row, slot in enumerate(self._slots):
                        if slot is not None:
                            self._free(row, "error", error)
        finally:
            with self._cond:
                self._closed = True
                pending, self._pending = list(self._pending), deque()
            for request in pending:
                request._finish("cancelled")
            for row, slot in enumerate(self._slots):
                if slot is not None:
                    self._free(row, "cancelled")

    def _has_active(self) -> bool:
        return any(slot is not None for slot in self._slots)

    def _free(self, row: int, reason: str, error: BaseException | None = None) -> None:
        slot = self._slots[row]
        self._slots[row] = None
        self._lengths[row] = 0
        if slot is not None:
            slot.request._finish(reason, error)

    def _drop_cancelled(self) -> None:
        with self._cond:
            dropped = [r for r in self._pending if r.cancelled]
            if dropped:
                self._pending = deque(r for r in self._pending if not r.cancelled)
        for request in dropped:
            request._finish("cancelled")
        for row, slot in enumerate(self._slots):
            if slot is not None and slot.request.cancelled:
                self._free(row, "cancelled")

    def _admit(self) -> None:
        """Prefill waiting requests into free rows (one forward each, rows=[slot])."""
        while True:
            free = next((row for row, slot in enumerate(self._slots) if slot is None), None)
            with self._cond:
                if free is None or not self._pending:
                    return
                request = self._pending.popleft()
            if request.cancelled:
                request._finish("cancelled")
                continue
            sequence = _Sequence(
                request.prompt_ids, request.params, make_generator(request.params.seed, self.device),
                self.context, request.submitted_at, request.logprobs, request.prompt_logprobs,
            )  # fmt: skip
            slot = self._slots[free] = _Slot(request, sequence)
            top = request.params.prompt_logprobs
            with torch.inference_mode():
                ids = torch.tensor([request.prompt_ids], device=self.device)
                plan = AttentionPlan.for_cache(self.config, self.cache, [0], ids.shape[1], rows=[free])
                out = self.model(ids, plan, logits_to_keep=0 if top is not None else 1)
                self._lengths[free] = ids.shape[1]
                if top is not None:
                    request.prompt_logprobs[:] = prompt_token_logprobs(out[0], request.prompt_ids, top)
                logits = out[:, -1]
                seen = ids if request.params.repetition_penalty != 1.0 else None
                next_ids = sample_next(logits, seen, request.params, sequence.generator)
                entry = token_logprobs(logits, next_ids, [request.params.logprobs])[0]
            self._emit(free, slot, int(next_ids[0]), entry)

    def _emit(self, row: int, slot: _Slot, token: int, logprob: TokenLogprob | None) -> None:
        sequence, request = slot.sequence, slot.request
        output = sequence.add(token, logprob)
        request.ttft_s, request.decode_s = sequence.ttft_s, sequence.decode_s
        if output:
            request.completion_tokens = len(sequence.tokens)
            request._push(token)
        slot.last_token = token
        if sequence.finish_reason is not None:
            self._free(row, sequence.finish_reason)

    def _decode_step(self) -> None:
        """One forward over rows 0 .. last active row; idle rows in between ride along unchanged."""
        active = [row for row, slot in enumerate(self._slots) if slot is not None]
        width = active[-1] + 1
        ids = [0] * width
        for row in active:
            ids[row] = self._slots[row].last_token
        with torch.inference_mode():
            step_input = torch.tensor(ids, device=self.device).unsqueeze(1)
            plan = AttentionPlan.for_cache(self.config, self.cache, self._lengths[:width], 1)  # rows 0 .. width - 1
            logits = self.model(step_input, plan)[:, -1]
            for row in active:
                self._lengths[row] += 1
            if len(active) < width:
                logits = logits[active]
            slots = [self._slots[row] for row in active]
            params = [slot.sequence.params for slot in slots]
            generators = [slot.sequence.generator for slot in slots]
            seen = None
            if any(p.repetition_penalty != 1.0 for p in params):
                seen = [slot.sequence.prompt + slot.sequence.tokens for slot in slots]
            next_ids = sample_next(logits, seen, params, generators)
            entries = token_logprobs(logits, next_ids, [p.logprobs for p in params])
            tokens = next_ids.tolist()
        for row, slot, token, entry in zip(active, slots, tokens, entries, strict=True):
            if slot.request.cancelled:
                self._free(row, "cancelled")
            else:
                self._emit(row, slot, token, entry)
