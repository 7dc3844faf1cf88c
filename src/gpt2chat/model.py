"""Our GPT-2 / GPT-Neo in plain PyTorch, with a preallocated per-row KV cache.

Module names mirror Hugging Face's, so `state_dict()` keys equal theirs (`transformer.h.0.attn.c_attn.weight`,
`transformer.h.0.attn.attention.q_proj.weight` for Neo); every projection is an `nn.Linear`, so HF GPT-2's
Conv1D weights ([in, out]) must be transposed when loading / saving (checkpoint.py does that).
Attention is `scaled_dot_product_attention`: causal fast path for training, a block-diagonal mask for packed
rows (`segment_ids`), a shared-prefix mask for rows that hold one prompt and several replies (`branch_ids`),
and cache-aware masks when decoding.

This module knows nothing about files, tokenizers or sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gpt2chat.config import ModelConfig
from gpt2chat.errors import Gpt2ChatError


class ContextLengthError(Gpt2ChatError):
    """Positions past the model's context (n_positions) or past the KV cache's capacity."""


class KVCache:
    """Preallocated keys / values for every layer: `k[layer]`, `v[layer]` are `[B, H, max_len, D]`.

    `lengths[b]` is how many positions of row b are filled. A forward with `kv_cache=` writes its T new
    keys of row b at `lengths[b] .. lengths[b] + T - 1`, attends over `0 .. lengths[b] + t`, then adds T to
    `lengths[b]`. Entries past `lengths[b]` are never read, so callers may roll a row back (or fix up a
    right-padded prefill) by lowering `lengths[b]`.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        max_len = config.n_positions if max_len is None else int(max_len)
        if max_len <= 0 or batch_size <= 0:
            raise ValueError(f"KVCache needs batch_size > 0 and max_len > 0, got {batch_size}, {max_len}")
        dtype = dtype or torch.float32
        shape = (batch_size, config.n_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.batch_size = batch_size
        self.max_len = max_len

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    def reset(self, rows: torch.Tensor | list[int] | None = None) -> None:
        """Empty all rows, or only the given ones (their old entries are simply never read again)."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(rows, dtype=torch.long, device=self.device)] = 0


@dataclass
class _AttnPlan:
    """How every layer of one forward attends: computed once per forward, shared by the layers."""

    cache: KVCache | None = None
    rows: torch.Tensor | None = None  # cache rows of this batch (None = all, in order)
    start: int = 0  # uniform prefix length (when uniform)
    uniform: bool = True  # all rows of the batch have the same cached length
    write_pos: torch.Tensor | None = None  # [B, T] cache positions to write (non-uniform)
    key_len: int = 0  # number of cache positions to attend over
    mask_global: torch.Tensor | None = None  # bool, True = may attend
    mask_local: torch.Tensor | None = None
    causal_global: bool = True  # use is_causal=True (no mask) when the mask is None
    causal_local: bool = True
    local_key_start: int = 0  # uniform single-token decode on a local layer: first key to read


class Attention(nn.Module):
    """Multi-head self-attention; GPT-2 layout (fused c_attn) or GPT-Neo layout (q/k/v/out_proj)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.n_embd = config.n_embd
        self.layer_idx = layer_idx
        self.is_neo = config.is_neo
        self.is_local = config.layer_is_local(layer_idx)
        self.dropout_p = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        if self.is_neo:
            self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
            self.k_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
            self.v_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
            self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=True)
        else:
            self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
            self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, D]

    def forward(self, x: torch.Tensor, plan: _AttnPlan) -> torch.Tensor:
        b, t, c = x.shape
        if self.is_neo:
            q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        else:
            q, k, v = (self._heads(part) for part in self.c_attn(x).split(self.n_embd, dim=2))

        mask = plan.mask_local if self.is_local else plan.mask_global
        is_causal = mask is None and (plan.causal_local if self.is_local else plan.causal_global)
        if plan.cache is not None:
            k, v = self._update_cache(plan, k, v)
            if self.is_local and plan.local_key_start:
                k, v = k[:, :, plan.local_key_start :], v[:, :, plan.local_key_start :]

        dropout_p = self.dropout_p if self.training else 0.0
        if self.is_neo:  # GPT-Neo: unscaled scores, computed in fp32 like HF
            dtype = q.dtype
            y = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p,
                is_causal=is_causal, scale=1.0,
            ).to(dtype)  # fmt: skip
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        y = y.transpose(1, 2).reshape(b, t, c)
        return self.resid_dropout(self.out_proj(y) if self.is_neo else self.c_proj(y))

    def _update_cache(
        self, plan: _AttnPlan, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys / values into the cache; return the used prefix to attend over."""
        cache_k, cache_v = plan.cache.k[self.layer_idx], plan.cache.v[self.layer_idx]
        t = k.shape[2]
        rows = plan.rows
        if plan.uniform:
            span = slice(plan.start, plan.start + t)
            if rows is None:
                cache_k[:, :, span] = k
                cache_v[:, :, span] = v
            else:
                cache_k[rows, :, span] = k
                cache_v[rows, :, span] = v
        else:
            row_idx = (torch.arange(k.shape[0], device=k.device) if rows is None else rows)[:, None]
            cache_k[row_idx, :, plan.write_pos] = k.transpose(1, 2)  # indexed view is [B, T, H, D]
            cache_v[row_idx, :, plan.write_pos] = v.transpose(1, 2)
        keys, values = cache_k[:, :, : plan.key_len], cache_v[:, :, : plan.key_len]
        if rows is not None:
            keys, values = keys.index_select(0, rows), values.index_select(0, rows)
        return keys, values


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.inner_dim)
        self.c_proj = nn.Linear(config.inner_dim, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)
        self.activation = config.activation_function

    def act(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            return F.gelu(x, approximate="tanh")
        if self.activation == "gelu":
            return F.gelu(x)
        if self.activation == "relu":
            return F.relu(x)
        return F.silu(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class _NeoAttentionWrapper(nn.Module):
    """GPT-Neo nests the projections one level deeper: `attn.attention.q_proj`."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = Attention(config, layer_idx)

    def forward(self, x: torch.Tensor, plan: _AttnPlan) -> torch.Tensor:
        return self.attention(x, plan)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = _NeoAttentionWrapper(config, layer_idx) if config.is_neo else Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, plan: _AttnPlan) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), plan)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GPT(nn.Module):
    """GPT-2 / GPT-Neo language model; `forward` returns logits `[B, T or logits_to_keep, vocab]`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        self.gradient_checkpointing = False
        self.reset_parameters()

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 paper / HF init: N(0, 0.02); GPT-2's residual projections scaled by 1/sqrt(2 n_layer)."""
        std = self.config.initializer_range
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            if not self.config.is_neo and name.endswith(".c_proj") and isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std / math.sqrt(2 * self.config.n_layer))

    def tie_weights(self) -> None:
        self.lm_head.weight = self.transformer.wte.weight

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (the tied head counts once); optionally without wte / wpe."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return total

    @torch.no_grad()
    def resize_token_embeddings(self, n: int) -> None:
        """Grow (or shrink) the tied embedding to n rows: old rows kept, new rows = mean of old rows."""
        old = self.transformer.wte.weight
        if n == old.shape[0]:
            return
        if n <= 0:
            raise ValueError(f"vocab size must be positive, got {n}")
        new = nn.Embedding(n, old.shape[1], device=old.device, dtype=old.dtype)
        keep = min(n, old.shape[0])
        new.weight[:keep] = old[:keep]
        if n > keep:
            new.weight[keep:] = old.float().mean(dim=0).to(old.dtype)
        new.weight.requires_grad_(old.requires_grad)
        self.transformer.wte = new
        self.lm_head = nn.Linear(old.shape[1], n, bias=False, device=old.device, dtype=old.dtype)
        self.tie_weights()
        self.config = self.config.replace(vocab_size=n)

    def new_kv_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        """A KVCache on this model's device and dtype (max_len defaults to n_positions)."""
        weight = self.transformer.wte.weight
        return KVCache(self.config, batch_size, max_len, device=weight.device, dtype=weight.dtype)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        rows: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        return_hidden: bool = False,
        branch_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits `[B, T or logits_to_keep, vocab]`; with `return_hidden`, the final (layer-normed) hidden
        states `[B, T or logits_to_keep, n_embd]` instead, for callers that project only some positions
        through `lm_head.weight` themselves (the trainer does, to skip unscored positions).

        `branch_ids` ([B, T], with explicit `position_ids`) lays several sequences that share a prefix in
        one row: branch 0 is the shared prefix, and a token of branch k >= 1 sees the prefix and the earlier
        tokens of branch k only. A preference pair then runs as `prompt, chosen, rejected` in one row, the
        rejected positions restarting where the prompt ends: the prompt is computed once, not twice."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if t == 0:
            raise ValueError("input_ids has no tokens")
        if (segment_ids is not None or branch_ids is not None) and kv_cache is not None:
            raise ValueError("segment_ids / branch_ids (training layouts) and kv_cache cannot be combined")
        if branch_ids is not None:
            if position_ids is None:
                raise ValueError("branch_ids needs explicit position_ids (each branch continues the prefix)")
            if tuple(branch_ids.shape) != (b, t):
                raise ValueError(f"branch_ids must be [{b}, {t}] like input_ids, got {tuple(branch_ids.shape)}")
        if rows is not None and kv_cache is None:
            raise ValueError("rows= needs kv_cache=")
        self._check_token_ids(input_ids)

        if segment_ids is not None and tuple(segment_ids.shape) != (b, t):
            raise ValueError(f"segment_ids must be [{b}, {t}] like input_ids, got {tuple(segment_ids.shape)}")
        check_positions = position_ids is not None
        if kv_cache is not None:
            plan, default_positions = self._cache_plan(kv_cache, rows, b, t, input_ids.device)
            if position_ids is None:
                position_ids = default_positions
        else:
            if position_ids is None:
                if segment_ids is not None:
                    position_ids = _segment_positions(segment_ids)
                    check_positions = True
                elif t > self.config.n_positions:
                    raise self._too_long(t - 1)
                else:
                    position_ids = torch.arange(t, device=input_ids.device).unsqueeze(0)
            plan = self._plain_plan(t, segment_ids, input_ids.device, branch_ids, position_ids)
        if check_positions:
            if tuple(position_ids.shape[-1:]) != (t,):
                raise ValueError(f"position_ids must be [batch, {t}], got {tuple(position_ids.shape)}")
            self._check_positions(position_ids)

        tr = self.transformer
        x = tr.drop(tr.wte(input_ids) + tr.wpe(position_ids))
        use_checkpointing = self.gradient_checkpointing and self.training and kv_cache is None
        for block in tr.h:
            if use_checkpointing:
                x = checkpoint(block, x, plan, use_reentrant=False)
            else:
                x = block(x, plan)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        hidden = tr.ln_f(x)
        logits = hidden if return_hidden else self.lm_head(hidden)

        if kv_cache is not None:
            if rows is None:
                kv_cache.lengths += t
            else:
                kv_cache.lengths[rows] += t
        return logits

    # ------------------------------------------------------------------ input checks
    def _check_token_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        low, high = torch.aminmax(input_ids)
        low, high = int(low), int(high)
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise Gpt2ChatError(
                f"token id {bad} is outside the model's vocabulary (0 .. {self.config.vocab_size - 1}); "
                "the tokenizer and the model do not match"
            )

    def _too_long(self, last_position: int) -> ContextLengthError:
        return ContextLengthError(
            f"sequence needs position {last_position} but the model's context is "
            f"{self.config.n_positions} tokens (positions 0 .. {self.config.n_positions - 1}); "
            "shorten the input"
        )

    def _check_positions(self, position_ids: torch.Tensor) -> None:
        low, high = torch.aminmax(position_ids)
        if int(low) < 0:
            raise ContextLengthError(f"position ids must be >= 0, got {int(low)}")
        if int(high) >= self.config.n_positions:
            raise self._too_long(int(high))

    # ------------------------------------------------------------------ attention plans
    def _local_mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        return causal & ((q_pos.unsqueeze(-1) - k_pos) < self.config.window_size)

    def _plain_plan(
        self,
        t: int,
        segment_ids: torch.Tensor | None,
        device: torch.device,
        branch_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> _AttnPlan:
        """No cache: causal (fast path), plus block-diagonal for packed segments, plus shared-prefix branches,
        plus Neo's local window."""
        has_local = self.config.is_neo and "local" in (self.config.attention_layers or [])
        window_matters = has_local and t > self.config.window_size
        if segment_ids is None and branch_ids is None and not window_matters:
            return _AttnPlan()
        pos = torch.arange(t, device=device)
        causal = pos.unsqueeze(-1) >= pos  # [T, T]
        if segment_ids is None and branch_ids is None:
            return _AttnPlan(mask_local=self._local_mask(pos, pos, causal))
        allowed = causal.unsqueeze(0)  # [1 or B, T, T]
        if segment_ids is not None:
            allowed = allowed & (segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2))
        if branch_ids is not None:
            key_branch = branch_ids.unsqueeze(-2)
            allowed = allowed & ((key_branch == 0) | (key_branch == branch_ids.unsqueeze(-1)))
        mask = allowed.unsqueeze(1)  # [B, 1, T, T]
        local = None
        if has_local:
            if branch_ids is None:  # within a segment, index distance is position distance
                local = mask & self._local_mask(pos, pos, causal)
            else:  # a branch's index runs past its siblings; the window counts positions
                distance = position_ids.unsqueeze(-1) - position_ids.unsqueeze(-2)
                local = mask & (distance < self.config.window_size).unsqueeze(1)
        return _AttnPlan(mask_global=mask, mask_local=local)

    def _cache_plan(
        self, cache: KVCache, rows: torch.Tensor | None, b: int, t: int, device: torch.device
    ) -> tuple[_AttnPlan, torch.Tensor]:
        if rows is not None:
            rows = torch.as_tensor(rows, dtype=torch.long, device=cache.device)
            if rows.dim() != 1 or rows.shape[0] != b:
                raise ValueError(f"rows must be a 1-D tensor of {b} cache rows, got shape {tuple(rows.shape)}")
            lengths = cache.lengths.index_select(0, rows)
        else:
            if b != cache.batch_size:
                raise ValueError(f"batch of {b} rows but the KV cache has {cache.batch_size}; pass rows=")
            lengths = cache.lengths
        lens = lengths.tolist()
        longest = max(lens) + t
        if longest > self.config.n_positions:
            raise self._too_long(longest - 1)
        if longest > cache.max_len:
            raise ContextLengthError(f"KV cache is full: needs {longest} positions, holds {cache.max_len}")

        uniform = min(lens) == max(lens)
        start = lens[0]
        window = self.config.window_size
        plan = _AttnPlan(cache=cache, rows=rows, start=start, uniform=uniform, key_len=longest)
        if uniform:
            positions = torch.arange(start, start + t, device=device).unsqueeze(0).expand(b, t)
            if t == 1:  # single-token decode: every cached key is visible, no mask at all
                plan.causal_global = plan.causal_local = False
                plan.local_key_start = max(0, longest - window)
                return plan, positions
            if start == 0:  # prefill from empty: plain causal, Neo's window as in the no-cache case
                fresh = self._plain_plan(t, None, device)
                plan.mask_local = fresh.mask_local
                return plan, positions
            q_pos = torch.arange(start, start + t, device=device)  # [T]
        else:
            q_pos = lengths.to(device).unsqueeze(1) + torch.arange(t, device=device)  # [B, T]
            plan.write_pos = q_pos.to(cache.device)
            positions = q_pos
        k_pos = torch.arange(longest, device=device)
        causal = k_pos <= q_pos.unsqueeze(-1)  # [T, L] or [B, T, L]
        local = self._local_mask(q_pos, k_pos, causal)
        if not uniform:
            causal, local = causal.unsqueeze(1), local.unsqueeze(1)  # [B, 1, T, L]
        plan.mask_global, plan.mask_local = causal, local
        return plan, positions


def _segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 wherever the segment id changes along the row."""
    t = segment_ids.shape[-1]
    idx = torch.arange(t, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    segment_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return idx - segment_start


__all__ = ["GPT", "KVCache", "ContextLengthError"]
