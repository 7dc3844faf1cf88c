"""Attention dropout's blocked CPU kernel (gpt2chat.dropout_attention) against the dense formula with the same
masks, its dropout statistics, and the model training through it: nothing [B, H, T, T] kept for the backward,
seeded runs and gradient checkpointing's replay the same; without dropout, the plan's 0 / -inf mask made once
gives SDPA's results bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gpt2chat.dropout_attention as dropout_attention
from gpt2chat.attention_plan import AttentionPlan, LayerAttention
from gpt2chat.config import get_preset
from gpt2chat.dropout_attention import attention_with_dropout
from gpt2chat.model import GPT


def recorded_run(monkeypatch, q, k, v, mask, is_causal, p, scale=None):
    """The kernel's output and the dropout masks it drew, laid out as one [B, H, T, L] boolean."""
    drawn = []
    draw = dropout_attention._draw_dropped

    def spy(generator, shape, p):
        drop = draw(generator, shape, p)
        drawn.append(drop)
        return drop

    monkeypatch.setattr(dropout_attention, "_draw_dropped", spy)
    out = attention_with_dropout(q, k, v, mask, is_causal, p, scale, seed=11)
    t, length = q.shape[-2], k.shape[-2]
    dropped = torch.zeros(*q.shape[:-1], length, dtype=torch.bool)
    rows, blocks = dropout_attention._block_rows(q, length), iter(drawn)
    for start in range(0, t, rows):
        stop = min(start + rows, t)
        lo, hi = dropout_attention._key_range(mask, is_causal, start, stop, length)
        if lo < hi:
            dropped[..., start:stop, lo:hi] = next(blocks)
    assert next(blocks, None) is None
    return out, dropped


def packed_mask(lengths: list[int], keys: int | None = None) -> torch.Tensor:
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    t = len(segments)
    allowed = (segments[:, None] == segments) & torch.ones(t, t, dtype=torch.bool).tril()
    if keys is not None:                       # keys before the queries (a cache), all visible
        allowed = torch.cat([torch.ones(t, keys - t, dtype=torch.bool), allowed], dim=1)
    return allowed


@pytest.mark.parametrize("case", ["causal", "packed", "batched-mask", "cache-keys", "neo-scale"])
def test_equals_the_dense_formula_with_the_same_dropout_masks(monkeypatch, case):
    monkeypatch.setattr(dropout_attention, "BLOCK_ELEMENTS", 2 * 3 * 7 * 40)  # ~7 query rows: many blocks
    torch.manual_seed(0)
    t, keys = 37, 45 if case == "cache-keys" else 37
    q = torch.randn(2, 3, t, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, keys, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask, is_causal, scale = None, False, None
    if case in ("causal", "neo-scale"):
        is_causal, scale = True, (1.0 if case == "neo-scale" else None)
    elif case == "packed":
        mask = packed_mask([12, 20, 5])
    elif case == "batched-mask":
        mask = torch.stack([packed_mask([37]), packed_mask([3, 30, 4])]).unsqueeze(1)  # [B, 1, T, T]
    else:
        mask = packed_mask([37], keys=keys)
    out, dropped = recorded_run(monkeypatch, q, k, v, mask, is_causal, 0.25, scale)
    allowed = torch.ones(t, keys, dtype=torch.bool).tril() if is_causal else mask
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    expected = probs.masked_fill(dropped, 0.0) / 0.75 @ v
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(expected, (q, k, v), grad)
    for name, a, b in zip("qkv", ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=name)
    assert 0.1 < dropped[allowed.expand_as(dropped)].float().mean() < 0.4


def test_a_query_with_no_key_gets_zeros_and_zero_gradients():
    q, k, v = (torch.randn(1, 2, 6, 4, requires_grad=True) for _ in range(3))
    mask = packed_mask([6]).clone()
    mask[2] = False
    out = attention_with_dropout(q, k, v, mask, False, 0.5, seed=0)
    assert torch.equal(out[..., 2, :], torch.zeros(1, 2, 4))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[..., 2, :], torch.zeros(1, 2, 4))


def test_dropout_keeps_the_expectation():
    q, k = torch.randn(1, 4, 256, 16), torch.randn(1, 4, 256, 16)
    v = torch.ones(1, 4, 256, 16)
    out = attention_with_dropout(q, k, v, None, True, 0.3, seed=1)[..., 64:, 0]   # rows with >= 64 keys
    assert abs(out.mean().item() - 1.0) < 0.02          # kept probabilities scaled by 1 / (1 - p)
    assert out.std().item() > 0.05                      # and something was dropped


def test_refuses_a_mask_with_is_causal_and_a_dropout_outside_0_1():
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="not both"):
        attention_with_dropout(q, q, q, packed_mask([4]), True, 0.1)
    with pytest.raises(ValueError, match="dropout_p"):
        attention_with_dropout(q, q, q, None, True, 0.0)


def saved_tensors(run) -> list[torch.Tensor]:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        result = run()
    return result, saved


@pytest.mark.parametrize("layout", ["causal", "packed"])
def test_the_model_trains_with_attention_dropout_keeping_no_t_by_t_tensor(layout):
    config = get_preset("tiny").replace(attn_pdrop=0.1, resid_pdrop=0.1, embd_pdrop=0.1)
    torch.manual_seed(0)
    model = GPT(config).train()
    t = 48
    ids = torch.randint(0, config.vocab_size, (2, t))
    segments = torch.tensor([[1] * 20 + [2] * 28, [1] * 48])

    def step(checkpointing: bool, seed: int = 3):
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        plan = AttentionPlan.packed(config, segments) if layout == "packed" else None
        logits, saved = saved_tensors(lambda: model(ids, plan))
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved

    logits, grads, saved = step(False)
    assert not [s for s in saved if s.dim() == 4 and s.shape[-2:] == (t, t) and s.is_floating_point()]
    again, again_grads, _ = step(False)
    assert torch.equal(logits, again)                                       # seeded: the same masks
    other, _, _ = step(False, seed=4)
    assert not torch.equal(logits, other)                                   # and dropout is on
    replayed, replayed_grads, _ = step(True)                                # checkpointing redraws the same
    torch.testing.assert_close(replayed, logits, atol=0, rtol=0)
    for name, grad in grads.items():
        assert torch.equal(again_grads[name], grad), name
        torch.testing.assert_close(replayed_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_without_dropout_the_plans_float_mask_gives_sdpas_results_and_is_made_once():
    torch.manual_seed(0)
    mask = packed_mask([5, 9, 2]).expand(1, 1, 16, 16)
    how = LayerAttention(mask)
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    out, saved = saved_tensors(lambda: how.attend(q, k, v))
    assert torch.equal(out, expected)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), expected_grads, strict=True):
        assert torch.equal(a, b)
    additive = how._additive[torch.float32]
    assert any(s.untyped_storage().data_ptr() == additive.untyped_storage().data_ptr() for s in saved)
    how.attend(q, k, v)
    assert how._additive[torch.float32] is additive                 # every layer of the plan shares it
    with torch.no_grad():                                           # inference: the boolean mask, as before
        assert torch.equal(how.attend(q, k, v), expected)
