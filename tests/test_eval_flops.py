"""Parameter and FLOP accounting against the well-known GPT-2 / GPT-Neo figures and formulas."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gpt2chat.evaluate.flops import (
    analytic_parameters,
    best_peaks,
    count_parameters,
    decode_bytes_per_token,
    forward_flops_per_token,
    measure_peaks,
    prefill_flops,
    training_flops_per_token,
    utilisation,
)

GPT2_124M = SimpleNamespace(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12,
                            n_head=12, n_inner=None)
NEO_125M = SimpleNamespace(model_type="gpt_neo", vocab_size=50257, n_positions=2048, n_embd=768, n_layer=12,
                           n_head=12, n_inner=None, attention_layers=["global", "local"] * 6, window_size=256)


def test_parameter_counts_of_the_published_shapes():
    assert analytic_parameters(GPT2_124M) == 124_439_808  # GPT2LMHeadModel("gpt2").num_parameters()
    assert analytic_parameters(NEO_125M) == 125_198_592  # GPTNeoForCausalLM 125M


def test_forward_flops_of_gpt2_124m_match_kaplan_plus_lm_head():
    L, d, V, ctx = 12, 768, 50257, 1024
    non_embedding = 12 * L * d * d  # Kaplan et al. 2020: N = 12 n_layer d_model^2 (d_ff = 4 d)
    # Kaplan's C_forward = 2N + 2 n_layer n_ctx d counts q.k only; we add the weighted sum over values
    # (another 2 n_layer n_ctx d) and the LM head (2 V d), which every generated token pays.
    expected = 2 * non_embedding + 2 * V * d + 4 * L * ctx * d
    flops = forward_flops_per_token(GPT2_124M, context=ctx)
    # 2 * 84,934,656 + 2 * 38,597,376 + 37,748,736 = 284,812,800 FLOPs per token (about 2.3x params)
    assert flops["total"] == expected == 284_812_800
    assert flops["attention"] == 4 * L * ctx * d
    # PaLM (Chowdhery et al. 2022, app. B): training FLOPs/token = 6N + 12 L H Q T, H*Q = d
    palm = 6 * (non_embedding + V * d) + 12 * L * d * ctx
    assert training_flops_per_token(GPT2_124M, ctx) == palm
    # a shorter context only changes the attention term
    assert forward_flops_per_token(GPT2_124M, 1)["weights"] == flops["weights"]
    with pytest.raises(ValueError):
        forward_flops_per_token(GPT2_124M, 0)


def test_gpt_neo_local_layers_attend_within_the_window():
    d, ctx = 768, 2048
    expected_attention = 6 * 4 * ctx * d + 6 * 4 * 256 * d  # 6 global layers, 6 local (window 256)
    assert forward_flops_per_token(NEO_125M, ctx)["attention"] == expected_attention


def test_count_parameters_counts_tied_weights_once_and_bytes_per_token():
    embedding = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    assert count_parameters(torch.nn.ModuleList([embedding, head])) == 40
    tiny = SimpleNamespace(model_type="gpt2", n_embd=4, n_layer=2)
    # weights 100 params * 2 bytes + KV cache: 2 layers * (k + v) * 8 keys * 4 wide * 2 bytes
    assert decode_bytes_per_token(tiny, 100, 2, 8) == 200 + 2 * 2 * 8 * 4 * 2


def test_measured_peaks_are_the_best_of_n_and_utilisation():
    peaks = measure_peaks("cpu", torch.float32, matmul_size=64, read_bytes=1 << 20, repeats=3)
    assert peaks["read_bytes"] == 1 << 20  # read only: a sum() reads each byte once and writes nothing
    # best of N: never below the median of the same timings
    assert peaks["matmul_flops_per_s"] >= peaks["matmul_flops_per_s_median"] > 0
    assert peaks["read_bytes_per_s"] >= peaks["read_bytes_per_s_median"] > 0
    start = {**peaks, "matmul_flops_per_s": 2.0, "read_bytes_per_s": 9.0}
    end = {**peaks, "matmul_flops_per_s": 3.0, "read_bytes_per_s": 7.0}
    best = best_peaks(start, end)
    assert (best["matmul_flops_per_s"], best["read_bytes_per_s"]) == (3.0, 9.0)
    assert [m["read_bytes_per_s"] for m in best["measurements"]] == [9.0, 7.0]
    figures = utilisation(flops_per_token=1e9, bytes_per_token=1e8, prefill_tokens_per_s=50.0,
                          decode_tokens_per_s=10.0,
                          peaks={"matmul_flops_per_s": 1e11, "read_bytes_per_s": 1e10})
    assert figures["prefill_mfu"] == pytest.approx(0.5)
    assert figures["decode_mfu"] == pytest.approx(0.1)
    assert figures["decode_mbu"] == pytest.approx(0.1)


@pytest.mark.parametrize("preset", ["tiny", "tiny-neo"])
def test_analytic_parameters_match_our_model(preset):
    from gpt2chat.config import get_preset
    from gpt2chat.model import GPT

    config = get_preset(preset)
    assert analytic_parameters(config) == count_parameters(GPT(config))


def test_prefill_flops_count_the_lm_head_for_the_last_position_only():
    """Issue 26: prefill MFU read 212-420% because the LM head was charged for every prompt token, while a
    prefill computes the logits of its last position alone."""
    L, d, V, P = 12, 768, 50257, 32
    blocks = 2 * 12 * L * d * d  # per token: QKV + output projections and the MLP
    attention = sum(4 * L * t * d for t in range(1, P + 1))  # token t attends to t keys
    assert prefill_flops(GPT2_124M, P) == P * blocks + attention + 2 * V * d
    assert prefill_flops(GPT2_124M, P, logits_positions=P) == sum(
        forward_flops_per_token(GPT2_124M, t)["total"] for t in range(1, P + 1))  # every position: the old count
    assert prefill_flops(GPT2_124M, 1) == forward_flops_per_token(GPT2_124M, 1)["total"]
    # the head is 2Vd = 77M FLOPs a token at 124M: counting it 32 times overstates this prefill by 1.43x
    # (by far more on the tiny shapes, where the head is most of the model)
    assert prefill_flops(GPT2_124M, P, logits_positions=P) / prefill_flops(GPT2_124M, P) > 1.4
    # GPT-Neo's local layers attend to at most the window: token 300 sees 300 keys on 6 layers, 256 on 6
    neo_blocks = prefill_flops(NEO_125M, 1) - 2 * V * d - 12 * 4 * d
    assert prefill_flops(NEO_125M, 300) - prefill_flops(NEO_125M, 299) == neo_blocks + 4 * d * (6 * 300 + 6 * 256)
    with pytest.raises(ValueError):
        prefill_flops(GPT2_124M, 0)
