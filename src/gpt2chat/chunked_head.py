"""The LM head and its log-softmax chunk by chunk: training losses that never hold `[positions, vocab]` logits.

A GPT-2 head is 50,257 wide, so the logits of 8 x 1,024 scored positions are 1.6 GB in fp32, and autograd
keeps about as much again (the log-softmax output) for the backward. Here the head projection
(`hidden @ weight.T`, the tied embedding), the log-softmax and their backward run over a few hundred
positions at a time (`chunk_rows`, ~32 MiB of fp32 logits), and only `[positions]`-sized tensors outlive a
chunk. Two autograd functions, one per shape of use:

- :func:`chunked_nll_sum`: ``-sum log p(target)`` as one scalar (SFT, ORPO's NLL can't use it: it needs
  per-sequence sums). The loss is linear in each token's log-prob with the same weight, so the gradient
  is known in the forward: each chunk's ``softmax - onehot`` goes straight into ``grad_hidden`` ([N, D])
  and ``grad_weight`` ([V, D]), and the backward only scales them. Three matmuls, as without chunking.
- :func:`chunked_token_logps`: ``log p(target)`` per position ([N], DPO / ORPO, whose weight per token
  depends on sums over whole sequences). The forward keeps the log-sum-exp of each position; the backward
  recomputes each chunk's logits from ``hidden`` and ``weight`` (one more head matmul than unchunked).

Both are device-agnostic (CPU, CUDA): no host reads, the compute dtype follows autocast (bf16 matmuls, fp32
log-softmax, fp32 accumulation of the weight's gradient), and `pad_multiple` pads the vocabulary to a
tensor-core-friendly width for the matmuls only (`GPT.head_multiple`). They take the hidden states of the
scored positions only: the model selects them before its head (`GPT.forward(select=..., head=...)`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# fp32 logits held per chunk: 2**23 elements = 32 MiB, 166 positions of GPT-2's vocabulary
CHUNK_ELEMENTS = 2**23


def _rows_per_chunk(vocab: int, chunk_rows: int | None) -> int:
    return chunk_rows if chunk_rows else max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would pick for the head (the weight's dtype outside autocast)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _head_weight(weight: torch.Tensor, dtype: torch.dtype, pad_multiple: int) -> torch.Tensor:
    weight = weight.to(dtype)
    pad = -weight.shape[0] % pad_multiple if pad_multiple else 0
    return F.pad(weight, (0, 0, 0, pad)) if pad else weight


def _chunk_log_softmax(hidden_chunk: torch.Tensor, weight: torch.Tensor, vocab: int) -> torch.Tensor:
    """fp32 log-softmax over the real vocabulary of one chunk's logits ([n, V])."""
    logits = (hidden_chunk @ weight.t())[:, :vocab].float()
    return logits - logits.logsumexp(dim=1, keepdim=True)


def _accumulate_grads(grad_logits: torch.Tensor, hidden_chunk: torch.Tensor, weight: torch.Tensor,
                      grad_weight: torch.Tensor | None) -> torch.Tensor | None:
    """`grad_logits` ([n, V] fp32) back through the head: returns the chunk's grad of hidden; adds into
    `grad_weight` ([V, D] fp32) in place when given."""
    vocab = grad_logits.shape[1]
    grad_logits = grad_logits.to(weight.dtype)
    if grad_weight is not None:
        if grad_weight.dtype == grad_logits.dtype:
            grad_weight.addmm_(grad_logits.t(), hidden_chunk)
        else:
            grad_weight += (grad_logits.t() @ hidden_chunk).float()
    return grad_logits @ weight[:vocab]


class _NLLSum(torch.autograd.Function):
    """-sum of log p(target); gradients computed in the forward, scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, pad_multiple, grad_hidden_on, grad_weight_on):
        device = hidden.device.type
        dtype = _compute_dtype(hidden, weight)
        vocab = weight.shape[0]
        with torch.autocast(device, enabled=False):
            head = _head_weight(weight, dtype, pad_multiple)
            h = hidden.to(dtype)
            total = torch.zeros((), device=hidden.device, dtype=torch.float32)
            grad_h = torch.empty_like(h) if grad_hidden_on else None
            grad_w = torch.zeros(vocab, weight.shape[1], device=weight.device,
                                 dtype=torch.float32) if grad_weight_on else None
            rows = _rows_per_chunk(vocab, chunk_rows)
            for start in range(0, h.shape[0], rows):
                h_chunk, t_chunk = h[start:start + rows], targets[start:start + rows, None]
                logp = _chunk_log_softmax(h_chunk, head, vocab)
                total -= logp.gather(1, t_chunk).sum()
                if grad_h is None and grad_w is None:
                    continue
                grad_logits = logp.exp_()                                    # d(-log p_t)/d logits
                grad_logits.scatter_add_(1, t_chunk, torch.full_like(t_chunk, -1, dtype=grad_logits.dtype))
                chunk_grad = _accumulate_grads(grad_logits, h_chunk, head, grad_w)
                if grad_h is not None:
                    grad_h[start:start + rows] = chunk_grad
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.flags = (grad_h is not None, grad_w is not None, hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        has_h, has_w, hidden_dtype, weight_dtype = ctx.flags
        saved = list(ctx.saved_tensors)
        grad_h = (saved.pop(0) * grad_total).to(hidden_dtype) if has_h else None
        grad_w = (saved.pop(0) * grad_total).to(weight_dtype) if has_w else None
        return grad_h, grad_w, None, None, None, None, None


class _TokenLogps(torch.autograd.Function):
    """log p(target) per position; the backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, pad_multiple):
        device = hidden.device.type
        dtype = _compute_dtype(hidden, weight)
        vocab = weight.shape[0]
        rows = _rows_per_chunk(vocab, chunk_rows)
        with torch.autocast(device, enabled=False):
            head = _head_weight(weight, dtype, pad_multiple)
            h = hidden.to(dtype)
            logps = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
            for start in range(0, h.shape[0], rows):
                logp = _chunk_log_softmax(h[start:start + rows], head, vocab)
                logps[start:start + rows] = logp.gather(1, targets[start:start + rows, None]).squeeze(1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.options = (dtype, rows, pad_multiple)
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, targets = ctx.saved_tensors
        dtype, rows, pad_multiple = ctx.options
        need_h, need_w = ctx.needs_input_grad[:2]
        vocab = weight.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            head = _head_weight(weight, dtype, pad_multiple)
            h = hidden.to(dtype)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(vocab, weight.shape[1], device=weight.device,
                                 dtype=torch.float32) if need_w else None
            grad_logps = grad_logps.float()
            for start in range(0, h.shape[0], rows):
                h_chunk, t_chunk = h[start:start + rows], targets[start:start + rows, None]
                g = grad_logps[start:start + rows, None]
                grad_logits = _chunk_log_softmax(h_chunk, head, vocab).exp_().mul_(-g)   # -g * softmax
                grad_logits.scatter_add_(1, t_chunk, g)                                  # + g * onehot
                chunk_grad = _accumulate_grads(grad_logits, h_chunk, head, grad_w)
                if grad_h is not None:
                    grad_h[start:start + rows] = chunk_grad
        return (grad_h.to(hidden.dtype) if grad_h is not None else None,
                grad_w.to(weight.dtype) if grad_w is not None else None, None, None, None)


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [N, D], weight [V, D] and targets [N], got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")


def chunked_nll_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    pad_multiple: int = 0, chunk_rows: int | None = None) -> torch.Tensor:
    """``-sum_i log softmax(hidden[i] @ weight.T)[targets[i]]`` (a float32 scalar), chunk by chunk.

    The same value and gradients as ``F.cross_entropy(hidden @ weight.T, targets, reduction="sum")`` in fp32,
    holding one chunk's logits at a time. Gradients are computed only for inputs that require them (a frozen
    tied embedding under LoRA skips the `[V, D]` product) and only when grad mode is on.
    """
    _check(hidden, weight, targets)
    grad_on = torch.is_grad_enabled()
    return _NLLSum.apply(hidden, weight, targets, chunk_rows, pad_multiple,
                         grad_on and hidden.requires_grad, grad_on and weight.requires_grad)


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                        pad_multiple: int = 0, chunk_rows: int | None = None) -> torch.Tensor:
    """``log softmax(hidden[i] @ weight.T)[targets[i]]`` for each i ([N] float32), chunk by chunk.

    Equal to `gpt2chat.losses.token_logps` of the full logits, gradients included, for any downstream use
    of the per-token values (per-sequence sums for DPO, averages for ORPO).
    """
    _check(hidden, weight, targets)
    return _TokenLogps.apply(hidden, weight, targets, chunk_rows, pad_multiple)
