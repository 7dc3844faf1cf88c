"""Our GPT-2 / GPT-Neo in plain PyTorch: attention, MLP, block, the model and its weights. How the tokens of
one forward attend is an `AttentionPlan` (attention_plan.py); the KV cache it reads and writes is kv_cache.py.

Module names mirror Hugging Face's, so `state_dict()` keys equal theirs (`transformer.h.0.attn.c_attn.weight`,
`transformer.h.0.attn.attention.q_proj.weight` for Neo); every projection is an `nn.Linear`, so HF GPT-2's
Conv1D weights ([in, out]) must be transposed when loading / saving (checkpoint.py does that).

`model(input_ids, plan)` returns logits. The plan (`AttentionPlan`) is built by the caller, outside the
forward, from what it already knows: plain causal (the default), packed segments, shared-prompt branches, or
rows of a KV cache whose lengths the caller tracks on the host (`for_cache`; chunks of several lengths
packed in one row, `for_ragged_cache`; or, for a compiled decode step, fixed shapes with the positions on the
device, `for_decode`). The forward therefore never reads a device tensor back to the host, and checks nothing
about the ids: token ids and lengths are checked once, where they enter (the trainer's batch builder, the
engine's prompt admission). A one-token decode step over a KV cache of an inference-layout GPT-2 on the CPU
runs as one native call instead of these modules (gpt2chat/fused_decode.py says when; same numbers).

This module knows nothing about files, tokenizers or sampling.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gpt2chat import fused_decode
from gpt2chat.attention_plan import AttentionPlan
from gpt2chat.block_masks import flex_available
from gpt2chat.config import TANH_GELU, ModelConfig
from gpt2chat.device import model_device_dtype
from gpt2chat.kv_cache import KVCache

__all__ = ["GPT", "attention_kernel"]


# ---------------------------------------------------------------------- the model
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

    def forward(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        b, t, c = x.shape
        if self.is_neo:
            q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        else:
            q, k, v = (self._heads(part) for part in self.c_attn(x).split(self.n_embd, dim=2))
        if plan.cache is not None:
            k, v = plan.cache.update(self.layer_idx, k, v)
        how = plan.local_layers if self.is_local else plan.global_layers
        if how.first_key:
            k, v = k[:, :, how.first_key :], v[:, :, how.first_key :]
        dropout_p = self.dropout_p if self.training else 0.0
        if how.block_mask is not None:
            y = self._flex(q, k, v, how.block_mask, dropout_p)
        elif self.is_neo:  # GPT-Neo: unscaled scores, computed in fp32 like HF
            y = how.attend(q.float(), k.float(), v.float(), dropout_p, scale=1.0).to(q.dtype)
        else:  # the kernel (SDPA, or attention dropout's blocked kernel on the CPU) is the plan's choice
            y = how.attend(q, k, v, dropout_p)
        y = y.transpose(1, 2).reshape(b, t, c)
        return self.resid_dropout(self.out_proj(y) if self.is_neo else self.c_proj(y))

    def _flex(self, q, k, v, block_mask, dropout_p: float) -> torch.Tensor:
        from gpt2chat.block_masks import attend

        if dropout_p:
            raise ValueError(
                "FlexAttention has no attention dropout: build the plan with kernel='dense' to train with "
                "attention dropout (attention_kernel(model, device) chooses)"
            )
        if self.is_neo:
            return attend(q.float(), k.float(), v.float(), block_mask, scale=1.0).to(q.dtype)
        return attend(q, k, v, block_mask)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.inner_dim)
        self.c_proj = nn.Linear(config.inner_dim, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)
        self.activation = config.activation_function

    def act(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation in TANH_GELU:
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

    def forward(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        return self.attention(x, plan)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = _NeoAttentionWrapper(config, layer_idx) if config.is_neo else Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
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
    """GPT-2 / GPT-Neo language model: `model(input_ids, plan)` -> logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        self.gradient_checkpointing = False
        self.vocab_multiple: int | None = None  # the LM head's matmul width while training (see _project)
        self.reset_parameters()

    def forward(
        self,
        input_ids: torch.Tensor,
        plan: AttentionPlan | None = None,
        *,
        logits_to_keep: int = 0,
        select: torch.Tensor | None = None,
        head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits of `input_ids` ([B, T]) attending as `plan` says (default: plain causal).

        Which positions get logits: all of them (`[B, T, vocab]`); the last `logits_to_keep` of each row
        (`[B, N, vocab]`, e.g. 1 for a prefill); or `select`, a LongTensor of flat indices `row * T + t`
        (`[N, vocab]`), so that a loss that scores a few positions projects only those through the
        vocabulary, inside the forward, where DDP, FSDP's gathered weights and `torch.compile` see it.
        `head(hidden, lm_head.weight)` replaces the head: the losses of `gpt2chat.chunked_head` project
        and score those positions chunk by chunk, so no `[N, vocab]` logits exist (training returns a loss).
        """
        if select is not None and logits_to_keep:
            raise ValueError("give logits_to_keep or select, not both")
        hidden = self.hidden_states(input_ids, plan)
        if select is not None:
            hidden = hidden.flatten(0, 1).index_select(0, select)
        elif logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        if head is not None:
            if type(self.lm_head) is not nn.Linear:
                raise ValueError(f"head= needs the plain tied lm_head, this model has {type(self.lm_head).__name__}")
            return head(hidden.flatten(0, -2), self.lm_head.weight)
        return self._project(hidden)

    def head_multiple(self, device: torch.device) -> int:
        """The width the LM head's matmul is padded to while training (0: none): `vocab_multiple`, or 64 on
        CUDA and off elsewhere when it is None."""
        if self.vocab_multiple is not None:
            return self.vocab_multiple
        return 64 if torch.device(device).type == "cuda" else 0

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head. With gradients on, it multiplies by the tied weight padded with zero rows to a multiple
        of `vocab_multiple` (GPT-2's 50257 + added tokens is odd, a slow shape for tensor-core matmuls) and
        slices the logits back: the same logits, and nothing stored padded. `vocab_multiple` None means 64 on
        CUDA and off elsewhere; 0 is off. Inference keeps the plain head: padding copies the weight every call,
        which a memory-bound decode step cannot afford."""
        multiple = self.head_multiple(hidden.device)
        pad = -self.config.vocab_size % multiple if multiple else 0
        if not (pad and torch.is_grad_enabled() and type(self.lm_head) is nn.Linear):
            return self.lm_head(hidden)
        weight = self.lm_head.weight
        if torch.is_autocast_enabled(hidden.device.type):
            weight = weight.to(torch.get_autocast_dtype(hidden.device.type))
        return F.linear(hidden, F.pad(weight, (0, 0, 0, pad)))[..., : self.config.vocab_size]

    def hidden_states(self, input_ids: torch.Tensor, plan: AttentionPlan | None = None) -> torch.Tensor:
        """The final (layer-normed) hidden states `[B, T, n_embd]`: what `lm_head` projects."""
        if plan is None:
            plan = AttentionPlan.causal(self.config, input_ids.shape[-1], input_ids.device)
        elif plan.window != self.config.local_window:
            raise ValueError(
                f"the attention plan was built for local window {plan.window}, this model has "
                f"{self.config.local_window}: build it from this model's config"
            )
        fused = fused_decode.hidden_states(self, input_ids, plan)  # a one-token cache step, natively (or None)
        if fused is not None:
            return fused
        tr = self.transformer
        x = tr.drop(tr.wte(input_ids) + tr.wpe(plan.position_ids))
        use_checkpointing = self.gradient_checkpointing and self.training and plan.cache is None
        for block in tr.h:
            x = checkpoint(block, x, plan, use_reentrant=False) if use_checkpointing else block(x, plan)
        return tr.ln_f(x)

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

    def compile_blocks(self, dynamic: bool | None = True, **options) -> None:
        """`torch.compile` each block in place (`Module.compile`): parameter names, state_dict, saving, LoRA
        and FSDP see the same modules; the LM head and the losses, whose shapes change every batch, stay eager.
        Dynamic shapes by default: batch widths vary, and a compile that first specialises recompiles."""
        for block in self.transformer.h:
            block.compile(dynamic=dynamic, **options)

    def new_kv_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        """A KVCache on this model's device and dtype (max_len defaults to n_positions); also for a quantized
        model, whose tied embedding has no `.weight` (device.model_device_dtype reads wpe)."""
        device, dtype = model_device_dtype(self)
        return KVCache(self.config, batch_size, max_len, device=device, dtype=dtype)



def attention_kernel(model: nn.Module, device: torch.device | str) -> str:
    """The kernel for a packed / shared-prompt plan of `model` on `device`: "flex" on CUDA (no [T, T] mask,
    flash-style tiles), unless the model is training with attention dropout, which FlexAttention cannot apply:
    then "dense" (SDPA with the mask, which can), with a warning once. "dense" off CUDA."""
    if torch.device(device).type != "cuda" or not flex_available():
        return "dense"
    dropout = model.training and any(
        getattr(module, "dropout_p", 0.0) > 0 for module in model.modules() if isinstance(module, Attention)
    )
    if dropout:
        warnings.warn(
            "attention dropout is on: packed / shared-prompt rows use SDPA with a dense [T, T] mask, since "
            "FlexAttention has no dropout; train with dropout = 0 for the FlexAttention kernel",
            stacklevel=2,
        )
        return "dense"
    return "flex"
