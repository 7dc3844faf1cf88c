"""The LM head and its log-softmax chunk by chunk: training losses that never hold `[positions, vocab]` logits.

A GPT-2 head is 50,257 wide, so the logits of 8 x 1,024 scored positions are 1.6 GB in fp32, and autograd
keeps about as much again (the log-softmax output) for the backward. Here the head projection
(`hidden @ weight.T`, the tied embedding), the log-softmax and their backward run over a few hundred
positions at a time (`chunk_rows`, ~64 MiB of fp32 logits), and only `[positions]`-sized tensors outlive a
chunk. Two autograd functions, one per shape of use:

- :func:`chunked_nll_sum`: ``-sum log p(target)`` as one scalar (SFT; ORPO needs the chosen replies' sums
  per sequence, so it takes the next one). The loss is linear in each token's log-prob with the same weight, so the gradient
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

# fp32 logits held per chunk: 2**24 elements = 64 MiB, 333 positions of GPT-2's vocabulary (smaller chunks
# measured up to ~15% slower on the CPU: matmuls of fewer rows)
CHUNK_ELEMENTS = 2**24


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


class _ChunkBuffers:
    """One pass's chunk-sized buffers, allocated once and reused by every chunk: a fresh `[rows, vocab]`
    tensor per chunk (and per elementwise op) costs page faults on the CPU and allocator churn on CUDA, and
    made the chunked head ~20% slower than the unchunked one before the buffers were reused."""

    def __init__(self, rows: int, head: torch.Tensor, vocab: int, grad_weight: torch.Tensor | None):
        self.head, self.vocab = head, vocab
        self.matmul = torch.empty(rows, head.shape[0], device=head.device, dtype=head.dtype)
        half = head.dtype != torch.float32
        self.fp32 = torch.empty(rows, vocab, device=head.device, dtype=torch.float32) if half else None
        self.weight_update = torch.empty_like(head[:vocab]) if half and grad_weight is not None else None
        self.grad_weight = grad_weight

    def logits(self, hidden_chunk: torch.Tensor) -> torch.Tensor:
        """fp32 logits `[n, vocab]` of one chunk (a view of a buffer, overwritten by the next chunk)."""
        n = hidden_chunk.shape[0]
        out = self.matmul[:n]
        torch.mm(hidden_chunk, self.head.t(), out=out)
        if self.fp32 is None:
            return out[:, : self.vocab]
        return self.fp32[:n].copy_(out[:, : self.vocab])

    def backward(self, grad_logits: torch.Tensor, hidden_chunk: torch.Tensor, grad_hidden: torch.Tensor | None) -> None:
        """`grad_logits` (fp32 `[n, vocab]`) back through the head: into `grad_hidden` (`[n, D]`, a slice of
        the whole gradient) and added to `grad_weight` (`[V, D]` fp32)."""
        n = grad_logits.shape[0]
        if self.fp32 is not None:                       # matmuls in the compute dtype, as autocast's backward
            grad_logits = self.matmul[:n, : self.vocab].copy_(grad_logits)
        if grad_hidden is not None:
            torch.mm(grad_logits, self.head[: self.vocab], out=grad_hidden)
        if self.grad_weight is None:
            return
        if self.weight_update is None:
            self.grad_weight.addmm_(grad_logits.t(), hidden_chunk)
        else:
            self.grad_weight += torch.mm(grad_logits.t(), hidden_chunk, out=self.weight_update)


def _log_softmax_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) [n], log-sum-exp [n, 1]) of fp32 `logits`, which are left holding `exp(logits - max)`
    (in place: no chunk-sized temporaries)."""
    target_logits = logits.gather(1, targets)
    maxes = logits.amax(dim=1, keepdim=True)
    sums = logits.sub_(maxes).exp_().sum(dim=1, keepdim=True)
    lse = sums.log_().add_(maxes)
    return (target_logits - lse).squeeze(1), lse


def _grad_buffers(h: torch.Tensor, weight: torch.Tensor, need_h: bool, need_w: bool):
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
    return grad_h, grad_w


class _NLLSum(torch.autograd.Function):
    """-sum of log p(target); gradients computed in the forward, scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, pad_multiple, grad_hidden_on, grad_weight_on):
        device = hidden.device.type
        dtype = _compute_dtype(hidden, weight)
        vocab = weight.shape[0]
        rows = _rows_per_chunk(vocab, chunk_rows)
        with torch.autocast(device, enabled=False):
            head = _head_weight(weight, dtype, pad_multiple)
            h = hidden.to(dtype)
            grad_h, grad_w = _grad_buffers(h, weight, grad_hidden_on, grad_weight_on)
            buffers = _ChunkBuffers(min(rows, h.shape[0]), head, vocab, grad_w)
            total = torch.zeros((), device=hidden.device, dtype=torch.float32)
            for start in range(0, h.shape[0], rows):
                h_chunk, t_chunk = h[start:start + rows], targets[start:start + rows, None]
                logits = buffers.logits(h_chunk)
                logp, _ = _log_softmax_stats(logits, t_chunk)
                total -= logp.sum()
                if grad_h is None and grad_w is None:
                    continue
                grad_logits = logits.div_(logits.sum(dim=1, keepdim=True))   # softmax; minus onehot: d(-log p_t)/d logits
                grad_logits.scatter_add_(1, t_chunk, torch.full_like(t_chunk, -1, dtype=grad_logits.dtype))
                buffers.backward(grad_logits, h_chunk, grad_h[start:start + rows] if grad_h is not None else None)
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
            buffers = _ChunkBuffers(min(rows, h.shape[0]), head, vocab, None)
            logps = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
            lses = torch.empty(h.shape[0], 1, device=h.device, dtype=torch.float32)
            for start in range(0, h.shape[0], rows):
                logits = buffers.logits(h[start:start + rows])
                logps[start:start + rows], lses[start:start + rows] = _log_softmax_stats(
                    logits, targets[start:start + rows, None])
        ctx.save_for_backward(hidden, weight, targets, lses)
        ctx.options = (dtype, rows, pad_multiple)
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, targets, lses = ctx.saved_tensors
        dtype, rows, pad_multiple = ctx.options
        need_h, need_w = ctx.needs_input_grad[:2]
        vocab = weight.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            head = _head_weight(weight, dtype, pad_multiple)
            h = hidden.to(dtype)
            grad_h, grad_w = _grad_buffers(h, weight, need_h, need_w)
            buffers = _ChunkBuffers(min(rows, h.shape[0]), head, vocab, grad_w)
            grad_logps = grad_logps.float()
            for start in range(0, h.shape[0], rows):
                h_chunk, t_chunk = h[start:start + rows], targets[start:start + rows, None]
                g = grad_logps[start:start + rows, None]
                grad_logits = buffers.logits(h_chunk).sub_(lses[start:start + rows]).exp_().mul_(-g)  # -g softmax
                grad_logits.scatter_add_(1, t_chunk, g)                                               # + g onehot
                buffers.backward(grad_logits, h_chunk, grad_h[start:start + rows] if grad_h is not None else None)
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
