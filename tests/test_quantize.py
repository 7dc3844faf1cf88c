"""gpt2chat.quantize: layouts keep greedy tokens (fp32) or bound the logit error (fp16, int8), the caller's model
is untouched, unsupported modes and saving a compact model are clear errors, tied heads stay one matrix."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpt2chat.config import get_preset
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.kernels import portable, unpack_int4, unpack_int4_scales, unpack_rows
from gpt2chat.kernels.packing import packed_shape
from gpt2chat.model import GPT
from gpt2chat.quantize import (
    Fp16Linear,
    InferenceLinear,
    Int4Linear,
    Int8Linear,
    TiedEmbedding,
    convert_for_inference,
    decode_read_bytes,
    load_for_inference,
    quantize_int8,
    weight_format,
)

# int8 on the 124M shape with random weights: a randomly initialised GPT-2 amplifies weight noise about 3x,
# and the errors of the five projection kinds add in quadrature (benchmarks/quantize_error.py). Measured:
# one scale per row 2.4%, one per 32 weights (our int8) 1.5-1.6%, llama.cpp's own q8_0 on the same weights
# 2.2% (it also rounds the activations to 8 bits). The 1% is NOT reached by any 8-bit form tried;
# 2% keeps ours below the peer's figure and is what a broken scale or kernel would blow through.
# Since int8 also rounds the activations to int8 blocks (as q8_0 does), ours measures 2.14% (1.55% with
# exact_activations); 2.2% keeps it at or below the peer's figure.
INT8_LOGIT_ERROR_124M = 0.022
INT8_EXACT_LOGIT_ERROR_124M = 0.017
# int4 = Q4_0 blocks with searched scales: 25.8% on the random 124M shape against llama.cpp's own q4_0 26.97%
# (benchmarks/quantize_error.py, 2026-12-07); a wrong scale or nibble order gives ~100%.
INT4_LOGIT_ERROR_124M = 0.28
FP16_LOGIT_ERROR = 2e-3  # measured: 6e-4 on the 124M shape, 3e-4 on the tiny one


def _greedy(model: nn.Module, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy tokens through the engine's KV-cache decode: one row per step, the kernels' decode path."""
    from gpt2chat.engine import Engine
    from gpt2chat.sampling import SamplingParams

    results = Engine(model).generate(prompts, SamplingParams(temperature=0, max_new_tokens=steps))
    return [r.token_ids for r in results]


def _relative_error(model: nn.Module, reference: torch.Tensor, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        out = model(ids).double()
    return ((out - reference).norm() / reference.norm()).item()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(get_preset("tiny")).eval()


@pytest.fixture(scope="module")
def gpt2() -> GPT:
    torch.manual_seed(0)
    return GPT(get_preset("gpt2")).eval()


@pytest.mark.parametrize("mode", [None, "fp16", "int8", "int4"])
def test_conversion_leaves_the_callers_model_untouched(tiny, mode):
    before = _state(tiny)
    modules = {name: type(m) for name, m in tiny.named_modules()}
    converted = convert_for_inference(tiny, mode)
    assert {name: type(m) for name, m in tiny.named_modules()} == modules
    assert tiny.lm_head.weight is tiny.transformer.wte.weight
    assert all(p.requires_grad for p in tiny.parameters())
    ours = {id(t) for t in (*tiny.parameters(), *tiny.buffers())}
    shared = [name for name, t in (*converted.named_parameters(), *converted.named_buffers()) if id(t) in ours]
    assert not shared, f"tensors shared with the caller's model: {shared}"
    with torch.no_grad():  # writing into the converted model never reaches the caller's
        for t in (*converted.parameters(), *converted.buffers()):
            t.zero_() if t.is_floating_point() else t.fill_(1)
    for name, t in tiny.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_fp32_layout_keeps_greedy_tokens_tiny(tiny_checkpoint):
    from gpt2chat.checkpoint import load_model

    plain, _ = load_model(tiny_checkpoint, device="cpu")
    converted, _ = load_for_inference(tiny_checkpoint)
    assert weight_format(converted) == "fp32"
    assert isinstance(converted.transformer.h[0].mlp.c_fc, InferenceLinear)
    assert converted.lm_head.weight is converted.transformer.wte.weight  # still one tied matrix
    prompts = [[464, 2068, 7586, 21831], [40, 1101, 257], list(range(100, 140))]
    assert _greedy(converted, prompts, 32) == _greedy(plain, prompts, 32)
    fp16, _ = load_for_inference(tiny_checkpoint, quantize="fp16")
    assert [len(tokens) for tokens in _greedy(fp16, prompts, 32)] == [32, 32, 32]


def test_fp32_layout_keeps_greedy_tokens_124m(gpt2):
    prompts = [[464, 2068, 7586, 21831]]
    assert _greedy(convert_for_inference(gpt2), prompts, 24) == _greedy(gpt2, prompts, 24)


def test_compact_layouts_bound_the_logit_error_124m(gpt2):
    ids = torch.randint(0, gpt2.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = gpt2(ids).double()
    assert _relative_error(convert_for_inference(gpt2, "fp16"), reference, ids) <= FP16_LOGIT_ERROR
    int8 = convert_for_inference(gpt2, "int8")
    assert 1e-3 < _relative_error(int8, reference, ids) <= INT8_LOGIT_ERROR_124M
    for module in int8.modules():
        if isinstance(module, Int8Linear):
            module.exact_activations = True
    assert 1e-3 < _relative_error(int8, reference, ids) <= INT8_EXACT_LOGIT_ERROR_124M
    assert 0.05 < _relative_error(convert_for_inference(gpt2, "int4"), reference, ids) <= INT4_LOGIT_ERROR_124M


def _dequantized(module) -> torch.Tensor:
    if isinstance(module, Int8Linear):
        rows = unpack_rows(module.weight, module.in_features, 0, module.out_features).float()
        return rows * module.scale.repeat_interleave(32, dim=1)[:, : module.in_features]
    q = unpack_int4(module.weight, module.in_features)[: module.out_features].float()
    scale = unpack_int4_scales(module.scale)[: module.out_features].float()
    return (q - 8) * scale.repeat_interleave(32, dim=1)[:, : module.in_features]


@pytest.mark.parametrize("mode", ["int8", "int8-exact", "int4"])
def test_compact_model_computes_exactly_its_dequantized_weights(tiny, mode, monkeypatch):
    """All of int8's / int4's error is the rounding of the weights and (unless exact) of the activations to
    int8 blocks: the integer kernels add none (exact block products, fp32 sums)."""
    compact = convert_for_inference(tiny, mode.removesuffix("-exact"))
    dequantized = convert_for_inference(tiny)  # a private copy we may overwrite
    with torch.no_grad():
        for module, target in zip(compact.modules(), dequantized.modules(), strict=True):
            if isinstance(module, Int8Linear | Int4Linear):
                target.weight.copy_(_dequantized(module))
                module.exact_activations = mode == "int8-exact"
    ids = torch.randint(0, tiny.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = compact(ids)
        if mode != "int8-exact":  # the reference rounds its activations the same way
            monkeypatch.setattr(InferenceLinear, "forward",
                                lambda self, x: F.linear(portable.quantize_activations(x), self.weight, self.bias))
        torch.testing.assert_close(out, dequantized(ids), rtol=1e-4, atol=1e-4)
        reference = tiny(ids).double()
    assert _relative_error(convert_for_inference(tiny, "fp16"), reference, ids) <= FP16_LOGIT_ERROR


def test_q4_0_reference_is_llama_cpp_q4_0_bit_for_bit():
    """`quantize_q4_0_reference` holds the numbers of the `gguf` package's Q4_0 (what `export --type q4_0`
    writes): the rounding `--quantize int4` must never be worse than."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from gpt2chat.kernels.blocks import quantize_q4_0_reference

    weight = torch.randn(40, 96, generator=torch.Generator().manual_seed(3)) * 0.05
    weight[0, :32] = 0.0  # an all-zero block
    weight[1, 5] = -1.0  # a block led by a negative weight
    q, scale = quantize_q4_0_reference(weight)
    blocks = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q4_0).reshape(40, 3, 18)
    theirs_scale = blocks[..., :2].copy().view(np.float16)[..., 0]
    nibbles = blocks[..., 2:]
    theirs_q = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).reshape(40, 96)
    assert np.array_equal(scale.numpy(), theirs_scale) and np.array_equal(q.numpy(), theirs_q)
    assert torch.all(q[0, :32] == 8) and q[1, 5] == 0
    from gpt2chat.export.gguf_file import q4_0_blocks  # the bytes `export --type q4_0` writes, ggml's layout

    assert np.array_equal(q4_0_blocks(q, scale), blocks.reshape(40, 3 * 18))


def _block_errors(weight: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Squared error of each 32-block of a dequantized int4 weight, [N, K // 32], in float64."""
    dequantized = (q.double() - 8) * scale.double().repeat_interleave(32, dim=1)
    return (dequantized - weight.double()).square().view(weight.shape[0], -1, 32).sum(-1)


@pytest.mark.parametrize("shape", [(768, 3072), (3072, 768)])
def test_int4_scales_beat_llama_cpp_q4_0_rounding(shape):
    """`--quantize int4` picks each block's scale for the least squared error: on random weights of the
    124M's MLP shapes no block is worse than llama.cpp's max-abs rounding and the whole weight is >= 8%
    better (measured 10.6%); the all-zero block stays zero and every level stays in 0..15."""
    from gpt2chat.kernels.blocks import quantize_int4, quantize_q4_0_reference

    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(4)) * 0.02
    weight[0, :32] = 0.0
    weight[1, 40] = 0.5  # an outlier that sets its block's max-abs scale
    q, scale = quantize_int4(weight)
    assert q.dtype == torch.uint8 and scale.dtype == torch.float16 and int(q.max()) <= 15
    ours = _block_errors(weight, q, scale)
    reference = _block_errors(weight, *quantize_q4_0_reference(weight))
    assert torch.all(ours <= reference)
    assert ours.sum() <= 0.92 * reference.sum()
    assert torch.all(q[0, :32] == 8) and scale[0, 0] == 0


def test_native_int4_search_is_the_torch_search_bit_for_bit():
    """The C++ scale search (csrc/blocks.cpp) writes the torch search's bytes and scales exactly: random
    rows of many magnitudes, K not a multiple of 32, all-zero and single-weight blocks, ties of |peak|
    (the first wins), weights already on a Q4_0 grid (candidates tie, the reference must win), fp16
    overflow of a scale and subnormal weights."""
    from gpt2chat import kernels
    from gpt2chat.kernels.blocks import quantize_int4

    if kernels.load() != "native":
        pytest.skip("native kernels unavailable")
    generator = torch.Generator().manual_seed(11)
    weight = torch.randn(203, 197, generator=generator) * torch.logspace(-6, 1, 203)[:, None]
    weight[0, :32] = 0.0
    weight[1, 32:64] = 0.0
    weight[1, 40] = -0.3
    weight[2, :32] = torch.where(torch.arange(32) % 2 == 0, 0.25, -0.25)  # |peak| tied in every column
    grid = torch.randint(-8, 8, (3, 197), generator=generator).float() * 0.01
    weight[3:6] = grid  # exactly representable levels
    weight[6, :32] = 1e6  # d overflows fp16 (inf), as torch's conversion gives
    weight[7] = torch.randn(197, generator=generator) * 1e-41  # subnormal fp32 weights
    weight[8, -5:] = 0.7  # the padded last block
    for rows in (weight, weight[:, :33], weight[:, :1], weight[:0]):
        torch_q, torch_d = quantize_int4(rows, native=False)
        native_q, native_d = quantize_int4(rows)
        assert native_q.dtype == torch.uint8 and native_d.dtype == torch.float16
        assert torch.equal(native_q, torch_q), (native_q != torch_q).nonzero()[:5]
        assert torch.equal(native_d.view(torch.int16), torch_d.view(torch.int16)), (native_d != torch_d).nonzero()[:5]


def test_native_int4_search_refuses_bad_input():
    from gpt2chat import kernels

    if kernels.load() != "native":
        pytest.skip("native kernels unavailable")
    with pytest.raises(RuntimeError, match=r"contiguous float32 \[N, K\] CPU matrix"):
        torch.ops.gpt2chat.quantize_int4_blocks(torch.zeros(4, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="contiguous float32"):
        torch.ops.gpt2chat.quantize_int4_blocks(torch.zeros(8, 4).t())


def test_int8_projection_error_is_rounding_only():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(300, 768, generator=generator) * 0.02
    weight[7] = 0.0  # an all-zero row stays zero
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and scale.shape == (300, 768 // 32)  # one scale per 32 weights of a row
    per_weight = scale.repeat_interleave(32, dim=1)
    assert torch.all(((q.float() * per_weight) - weight).abs() <= per_weight / 2 + 1e-9)
    nonzero = torch.arange(300) != 7
    assert torch.all(q[nonzero].view(299, 24, 32).abs().amax(dim=2) == 127) and torch.all(q[7] == 0)
    torch.testing.assert_close(Int8Linear(weight, None).rows(torch.tensor([3, 7])), (q.float() * per_weight)[[3, 7]])
    x = torch.randn(16, 768, generator=generator)
    layer = Int8Linear(weight, None)
    exact = x @ weight.T
    assert ((layer(x) - exact).norm() / exact.norm()).item() < 0.01


def test_compact_head_is_the_embedding(tiny):
    """The tied head is one compact matrix: the embedding reads its rows, no fp32 copy of it stays."""
    vocab, width = tiny.config.vocab_size, tiny.config.n_embd
    ids = torch.tensor([[0, 5, vocab - 1]])
    for mode, cls in (("fp16", Fp16Linear), ("int8", Int8Linear), ("int4", Int4Linear)):
        converted = convert_for_inference(tiny, mode)
        assert isinstance(converted.lm_head, cls) and isinstance(converted.transformer.wte, TiedEmbedding)
        assert converted.transformer.wte.head is converted.lm_head
        big = [t for t in (*converted.parameters(), *converted.buffers()) if t.numel() >= vocab * width // 2]
        assert len(big) == 1 and not big[0].is_floating_point()  # the packed head, nothing else that size
        rows = converted.transformer.wte(ids)
        top = tiny.transformer.wte.weight.abs().max().item()
        step = top / 8 if mode == "int4" else top / 127  # the rounding step at most
        torch.testing.assert_close(rows, tiny.transformer.wte(ids), atol=step, rtol=0)


def test_read_bytes_follow_the_format(tiny):
    plain = decode_read_bytes(tiny)
    projections = sum(m.weight.numel() for m in tiny.modules() if isinstance(m, nn.Linear))
    assert plain == 4 * projections
    assert decode_read_bytes(convert_for_inference(tiny)) == plain
    shapes = [m.weight.shape for m in tiny.modules() if isinstance(m, nn.Linear)]
    packed = sum(math.prod(packed_shape(*shape)) for shape in shapes)  # padded to whole 4x8 blocks
    assert packed > projections  # the tiny head's 50257 rows are not a multiple of 4
    assert decode_read_bytes(convert_for_inference(tiny, "fp16")) == 2 * packed
    scales = sum(n * -(-k // 32) for n, k in shapes)  # one fp32 scale per 32 weights of a row
    assert decode_read_bytes(convert_for_inference(tiny, "int8")) == packed + 4 * scales
    lines = sum(-(-n // 4) * -(-k // 32) for n, k in shapes)  # 4 rows x 32 columns: 64 bytes + 4 fp16 scales
    assert decode_read_bytes(convert_for_inference(tiny, "int4")) == lines * (64 + 8)


def test_lora_adapters_are_merged_into_the_converted_weights(tiny):
    from gpt2chat.lora import apply_lora

    torch.manual_seed(3)
    adapted = GPT(get_preset("tiny")).eval()
    adapted.load_state_dict(tiny.state_dict())
    apply_lora(adapted, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.randint(0, tiny.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    converted = convert_for_inference(adapted)
    assert not any("lora" in name for name, _ in converted.named_modules())
    with torch.inference_mode():
        torch.testing.assert_close(converted(ids), adapted(ids), rtol=1e-4, atol=1e-5)


def test_modes_a_device_cannot_do_are_clear_errors(tiny, tiny_checkpoint):
    with pytest.raises(Gpt2ChatError, match="unknown quantize mode 'int3'"):
        convert_for_inference(tiny, "int3")
    for mode in ("int8", "int4"):
        with pytest.raises(Gpt2ChatError, match=f"{mode} is implemented for the CPU only"):
            load_for_inference(tiny_checkpoint, quantize=mode, device="cuda")  # raised before CUDA is touched
    with pytest.raises(Gpt2ChatError, match="computes in float32 on the CPU"):
        load_for_inference(tiny_checkpoint, quantize="fp16", dtype="bfloat16")
    with pytest.raises(Gpt2ChatError, match="already converted"):
        convert_for_inference(convert_for_inference(tiny, "int8"), "fp16")


@pytest.mark.parametrize("mode", ["fp16", "int8", "int4"])
def test_saving_a_compact_model_is_refused_and_writes_nothing(tiny_checkpoint, tmp_path, mode):
    from gpt2chat.checkpoint import save_pretrained

    model, tokenizer = load_for_inference(tiny_checkpoint, quantize=mode)
    out = tmp_path / "saved"
    with pytest.raises(Gpt2ChatError, match=f"converted for inference with {mode} weights"):
        save_pretrained(model, tokenizer, out)
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()


def test_saving_the_fp32_layout_writes_the_original_checkpoint(tiny_checkpoint, tmp_path):
    from gpt2chat.checkpoint import load_model, save_pretrained

    original, _ = load_model(tiny_checkpoint, device="cpu")
    model, tokenizer = load_for_inference(tiny_checkpoint)
    assert weight_format(model) == "fp32" and not any(p.requires_grad for p in model.parameters())
    save_pretrained(model, tokenizer, tmp_path / "again")
    reloaded, _ = load_model(tmp_path / "again", device="cpu")
    for (name, a), (_, b) in zip(reloaded.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_load_for_inference_modes(tiny_checkpoint):
    for mode, expected in ((None, "fp32"), ("fp16", "fp16"), ("int8", "int8"), ("int4", "int4")):
        model, tokenizer = load_for_inference(tiny_checkpoint, quantize=mode)
        assert weight_format(model) == expected and not model.training
        assert len(tokenizer) <= model.config.vocab_size
    plain, _ = load_for_inference(tiny_checkpoint, dtype="bfloat16")  # CPU bf16: the plain model
    assert weight_format(plain) == "plain" and next(plain.parameters()).dtype == torch.bfloat16


def test_converted_modules_trace_under_torch_compile(tiny):
    x = torch.randn(2, 1, tiny.config.n_embd)
    ids = torch.tensor([[1, 2, 3]])
    for mode in (None, "fp16", "int8", "int4"):
        converted = convert_for_inference(tiny, mode)
        mlp = converted.transformer.h[0].mlp
        compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
        with torch.inference_mode():
            torch.testing.assert_close(compiled(x), mlp(x))
            embed = torch.compile(converted.transformer.wte, fullgraph=True, backend="aot_eager")
            torch.testing.assert_close(embed(ids), converted.transformer.wte(ids))


def test_gpt_neo_converts_too():
    """GPT-Neo's separate q/k/v projections have no bias; its head is tied the same way."""
    torch.manual_seed(5)
    neo = GPT(get_preset("tiny-neo")).eval()
    ids = torch.randint(0, neo.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        reference = neo(ids).double()
    fp32 = convert_for_inference(neo)
    assert isinstance(fp32.transformer.h[0].attn.attention.q_proj, InferenceLinear)
    assert fp32.transformer.h[0].attn.attention.q_proj.bias is None
    assert _relative_error(fp32, reference, ids) < 1e-5
    assert _relative_error(convert_for_inference(neo, "fp16"), reference, ids) <= FP16_LOGIT_ERROR
    assert _relative_error(convert_for_inference(neo, "int8"), reference, ids) <= INT8_LOGIT_ERROR_124M
    assert _relative_error(convert_for_inference(neo, "int4"), reference, ids) <= INT4_LOGIT_ERROR_124M
