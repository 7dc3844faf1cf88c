"""The engine's only caller of the model: it owns the KV cache and runs prefill chunks and decode steps.

The scheduler says which rows, positions and tokens; the runner turns that into forwards. The cache grows
on demand (more rows, longer rows; contents kept), so a one-prompt call never holds the memory of a
sixteen-row server.

This module knows nothing about requests, sampling or stop tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2chat.model import GPT, KVCache

__all__ = ["ModelRunner", "PrefillChunk", "use_decode_layout"]

_MIN_CACHE_LEN = 64


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens `token_ids` of cache row `row`, to be cached at positions `start ..`."""

    row: int
    start: int
    token_ids: list[int]
    all_logits: bool = False  # logits of every position (prompt log-probabilities), not only the last


def use_decode_layout(model: GPT, device: torch.device, dtype: torch.dtype) -> bool:
    """On CPU in fp32, store every Linear weight column-major (values and shapes unchanged).

    A decode step multiplies one row by each weight. With the weight `[out, in]` stored column-major,
    `F.linear` reads it as a contiguous `[in, out]` matrix: the "NN" GEMV, which MKL streams from memory
    about 1.4x faster than the "NT" one on the 2-core AMD EPYC we measure on (benchmarks/decode.py).
    Only CPU fp32 is changed. Saving a checkpoint afterwards is unaffected (`hf_state_dict` makes tensors
    contiguous). Kept until `gpt2chat.quantize.load_for_inference` chooses the layout at load time.
    """
    if device.type != "cpu" or dtype != torch.float32:
        return False
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.is_contiguous():
                module.weight.data = module.weight.data.t().contiguous().t()
    return True


class ModelRunner:
    """Forwards of `model` (in eval mode, on its own device and dtype) over a growing KV cache."""

    def __init__(self, model: GPT, max_rows: int, max_len: int, decode_layout: bool = True):
        self.model = model
        self.config = model.config
        weight = model.transformer.wte.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.vocab_size = self.config.vocab_size
        self.max_rows = max_rows
        self.max_len = max_len
        self.cache: KVCache | None = None
        if decode_layout:
            use_decode_layout(model, self.device, self.dtype)

    def reserve(self, rows: int, length: int) -> None:
        """Make the cache hold at least `rows` rows of `length` positions (grown by doubling, copied)."""
        have_rows = self.cache.batch_size if self.cache is not None else 0
        have_len = self.cache.max_len if self.cache is not None else 0
        if rows <= have_rows and length <= have_len:
            return
        new_rows = min(self.max_rows, max(rows, 2 * have_rows))
        new_len = min(self.max_len, max(length, 2 * have_len, _MIN_CACHE_LEN))
        grown = KVCache(self.config, new_rows, new_len, self.device, self.dtype)
        if self.cache is not None:
            for old, new in zip(self.cache.k + self.cache.v, grown.k + grown.v, strict=True):
                new[:have_rows, :, :have_len] = old
        self.cache = grown

    @torch.inference_mode()
    def prefill(self, chunks: list[PrefillChunk]) -> list[torch.Tensor]:
        """Cache every chunk's tokens; per chunk the logits [1, V] of its last position ([T, V] of every
        position with `all_logits`). Chunks of one length run as one forward."""
        cache = self.cache
        outputs: list[torch.Tensor | None] = [None] * len(chunks)
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, chunk in enumerate(chunks):
            groups.setdefault((len(chunk.token_ids), chunk.all_logits), []).append(i)
        for (_, all_logits), members in groups.items():
            ids = torch.tensor([chunks[i].token_ids for i in members], device=self.device)
            rows = torch.tensor([chunks[i].row for i in members], device=self.device)
            cache.lengths[rows] = torch.tensor([chunks[i].start for i in members], device=self.device)
            logits = self.model(ids, kv_cache=cache, rows=rows, logits_to_keep=0 if all_logits else 1)
            for j, i in enumerate(members):
                outputs[i] = logits[j]
        return outputs

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Feed `tokens[r]` at `positions[r]` of cache rows 0 .. len(tokens) - 1 -> logits [rows, V]."""
        width = len(tokens)
        cache = _first_rows(self.cache, width)
        cache.lengths.copy_(torch.tensor(positions, device=self.device))
        step = torch.tensor(tokens, device=self.device).unsqueeze(1)
        return self.model(step, kv_cache=cache)[:, -1]


def _first_rows(cache: KVCache, rows: int) -> KVCache:
    """A KVCache over the first `rows` rows of `cache`: views, no copies."""
    if rows == cache.batch_size:
        return cache
    view = object.__new__(KVCache)
    view.k = [k[:rows] for k in cache.k]
    view.v = [v[:rows] for v in cache.v]
    view.lengths = cache.lengths[:rows]
    view.batch_size = rows
    view.max_len = cache.max_len
    return view
