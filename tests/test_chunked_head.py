"""The chunked LM head losses equal the unchunked ones, values and gradients, and keep no `[N, vocab]` tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2chat.chunked_head import chunked_nll_sum, chunked_token_logps
from gpt2chat.losses import token_logps

N, D, V = 11, 16, 37      # 11 positions in chunks of 3 leave a short last chunk


def inputs(seed: int = 0, weight_grad: bool = True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, requires_grad=True)
    weight = torch.randn(V, D, generator=g, requires_grad=weight_grad)
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, targets


def grads_of(value: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor | None]:
    value.backward()
    out = [t.grad.clone() if t.grad is not None else None for t in tensors]
    for t in tensors:
        t.grad = None
    return out


@pytest.mark.parametrize("pad_multiple", [0, 8])
@pytest.mark.parametrize("chunk_rows", [3, None])
def test_nll_sum_equals_cross_entropy_of_the_full_logits(chunk_rows, pad_multiple):
    hidden, weight, targets = inputs()
    expected = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    expected_grads = grads_of(expected * 0.37, hidden, weight)       # a scale the backward must apply
    got = chunked_nll_sum(hidden, weight, targets, chunk_rows=chunk_rows, pad_multiple=pad_multiple)
    got_grads = grads_of(got * 0.37, hidden, weight)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pad_multiple", [0, 8])
def test_token_logps_equal_log_softmax_of_the_full_logits_for_any_upstream_gradient(pad_multiple):
    hidden, weight, targets = inputs(1)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(5))  # per-token weights, as DPO's
    expected = token_logps(hidden @ weight.t(), targets)
    expected_grads = grads_of((expected * upstream).sum(), hidden, weight)
    got = chunked_token_logps(hidden, weight, targets, chunk_rows=3, pad_multiple=pad_multiple)
    got_grads = grads_of((got * upstream).sum(), hidden, weight)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("loss", [chunked_nll_sum, chunked_token_logps])
def test_a_frozen_weight_gets_no_gradient_and_no_grad_mode_keeps_no_graph(loss):
    hidden, weight, targets = inputs(2, weight_grad=False)
    value = loss(hidden, weight, targets, chunk_rows=4).sum()
    hidden_grad, weight_grad = grads_of(value, hidden, weight)
    assert weight_grad is None and hidden_grad is not None and hidden_grad.abs().sum() > 0
    with torch.no_grad():
        again = loss(hidden, weight, targets, chunk_rows=4).sum()
    assert again.grad_fn is None
    torch.testing.assert_close(again, value.detach())


@pytest.mark.parametrize("loss", [chunked_nll_sum, chunked_token_logps])
def test_nothing_of_size_positions_x_vocab_is_kept_for_the_backward(loss):
    """Autograd's saved tensors, recorded: the chunked losses keep `[N]`-, `[N, D]`- and `[V, D]`-sized
    tensors, never the `[N, V]` logits or log-softmax the unchunked path keeps."""
    n, vocab = 64, 512                      # N x V much larger than V x D and N x D
    hidden = torch.randn(n, D, requires_grad=True)
    weight = torch.randn(vocab, D, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))

    def saved_sizes(compute) -> list[int]:
        sizes: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            compute()
        return sizes

    unchunked = saved_sizes(lambda: token_logps(hidden @ weight.t(), targets).sum())
    assert max(unchunked) >= n * vocab                            # the probe sees what it is meant to see
    chunked = saved_sizes(lambda: loss(hidden, weight, targets, chunk_rows=8))
    assert chunked and max(chunked) <= vocab * D


def test_bad_shapes_are_refused():
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match="hidden"):
        chunked_nll_sum(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="targets"):
        chunked_token_logps(hidden, weight, targets[:-1])


def test_bf16_autocast_runs_the_head_in_bf16_and_the_softmax_in_fp32():
    """Under autocast the chunked losses follow the unchunked path's precision: bf16 matmuls, fp32
    log-softmax; their values agree to bf16 rounding of the logits."""
    hidden, weight, targets = inputs(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = token_logps(F.linear(hidden, weight), targets)
        got = chunked_token_logps(hidden, weight, targets, chunk_rows=4)
        total = chunked_nll_sum(hidden, weight, targets, chunk_rows=4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)     # the same bf16 logits, fp32 after
    torch.testing.assert_close(total, -expected.sum(), atol=1e-4, rtol=1e-5)
    total.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    exact = F.cross_entropy(hidden.detach() @ weight.detach().t(), targets, reduction="sum")
    assert abs(float(total.detach()) - float(exact)) < 0.05 * N                # bf16 logits are close to fp32 ones
