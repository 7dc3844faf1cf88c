"""Weight layouts for inference, chosen once at load time: the fast fp32 layout, fp16, int8 or int4 weights.

    model, tokenizer = load_for_inference("runs/sft/final", quantize=None | "fp16" | "int8" | "int4")
    fast = convert_for_inference(model, quantize)      # a new model; `model` is left exactly as it was

What each mode makes of a model, by device (dtype is the compute dtype of the activations):

| device | quantize=None | "fp16" | "int8" | "int4" |
|---|---|---|---|---|
| cpu, float32 (default) | fp32 weights through the native kernels (`InferenceLinear`) | fp16 weights, fp32 compute (`Fp16Linear`) | int8 weights + one fp32 scale per 32 weights of a row (1.125 bytes a weight; `Int8Linear`) | int4 weights + one fp16 scale per 32 (0.5625 bytes a weight, llama.cpp's Q4_0 format, each block's scale searched for the least error; `Int4Linear`) |
| cpu, bfloat16 / float16 | the plain model in that dtype | error | error | error |
| cuda and others | the plain model (bfloat16 on CUDA by default) | the plain model in float16 | error: CPU-only | error: CPU-only |

int8 and int4 multiply with the activations rounded to int8 per block of 32 (as llama.cpp's q8_0 / q4_0
matmuls do), in integer arithmetic, with fp32 sums of the block products (`gpt2chat::linear_i8_q8`,
`linear_i4_q8`); `Int8Linear(..., exact_activations=True)` keeps the activations in fp32 (the widening
`linear_i8`, about half the rate).

Every projection of the blocks and the tied head becomes a module that calls `gpt2chat.kernels`' ops; the
head's matmul reads the compact form, and in the fp16 / int8 modes the token embedding reads its rows from
the head's compact weight too (`TiedEmbedding`), so the model holds one copy of that matrix. The rounding of
the weights to int8 / int4 blocks is `gpt2chat.kernels.blocks`.

Saving: the fp32 layout keeps `nn.Linear`'s tensor names and values, so `save_pretrained` writes the same
checkpoint as the model before conversion. fp16 and int8 models refuse `state_dict()` with a
`Gpt2ChatError` (their weights are not the checkpoint's any more), so a corrupt checkpoint is never written.
A converted model is for inference: no gradients, eval mode, and it is not converted twice.

This module knows nothing about sampling, tokenizers or text; it reads checkpoints only through
`gpt2chat.checkpoint.load_model`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from gpt2chat.device import model_device_dtype
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.kernels.blocks import quantize_int4, quantize_int8
from gpt2chat.weight_formats import CPU_ONLY_MODES, QUANTIZE_MODES

__all__ = [
    "QUANTIZE_MODES", "load_for_inference", "convert_for_inference", "weight_format", "decode_read_bytes",
    "InferenceLinear", "Fp16Linear", "Int8Linear", "Int4Linear", "TiedEmbedding", "quantize_int8", "quantize_int4",
]  # fmt: skip



# ---------------------------------------------------------------------------------------------- modules
class InferenceLinear(nn.Module):
    """An fp32 projection through `gpt2chat::linear_f32`: same `weight` / `bias` tensors and names as nn.Linear."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.gpt2chat.linear_f32(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class _CompactLinear(nn.Module):
    """A projection whose weight is stored in a compact form: never saved (see the module docstring)."""

    format = ""

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32, copy=True))

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        raise Gpt2ChatError(
            f"this model was converted for inference with {self.format} weights ({prefix.rstrip('.')}), which "
            "are not the checkpoint's weights: saving it would write a corrupt checkpoint. Save the model "
            "before conversion (gpt2chat.checkpoint.load_model loads it unconverted)"
        )

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight as float32 (the embedding lookup of a tied head)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Fp16Linear(_CompactLinear):
    """fp16 weights, fp32 compute through `gpt2chat::linear_f16`. The weight is packed 4x8
    (`gpt2chat.kernels.pack_rows`) as IEEE half bit patterns in an int16 buffer, so `model.to(dtype)`
    cannot widen it."""

    format = "fp16"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        from gpt2chat.kernels import pack_rows

        super().__init__(weight.shape[0], weight.shape[1], bias)
        self.register_buffer("weight", pack_rows(weight.detach().to(torch.float16)).view(torch.int16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.gpt2chat.linear_f16(x, self.weight, self.out_features, self.bias)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        from gpt2chat.kernels import gather_rows

        return gather_rows(self.weight, self.in_features, ids).view(torch.float16).float()


class Int8Linear(_CompactLinear):
    """int8 weights (packed 4x8) with one fp32 scale per group of 32 consecutive weights of a row (`scale`
    [N, ceil(K / 32)], W[n, k] ~ weight[n, k] * scale[n, k // 32]; 1.125 bytes a weight, llama.cpp's q8_0
    has 1.0625 with fp16 scales). Activations rounded to int8 blocks (`gpt2chat::linear_i8_q8`), or kept
    fp32 with `exact_activations` (`gpt2chat::linear_i8`)."""

    format = "int8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, exact_activations: bool = False) -> None:
        from gpt2chat.kernels import pack_rows

        super().__init__(weight.shape[0], weight.shape[1], bias)
        quantized, scale = quantize_int8(weight)
        self.register_buffer("weight", pack_rows(quantized))
        self.register_buffer("scale", scale)
        self.exact_activations = exact_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact_activations:
            return torch.ops.gpt2chat.linear_i8(x, self.weight, self.scale, self.bias)
        return torch.ops.gpt2chat.linear_i8_q8(x, self.weight, self.scale, self.bias)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        from gpt2chat.kernels import INT8_GROUP, gather_rows

        rows = gather_rows(self.weight, self.in_features, ids).float()
        return rows * self.scale[ids].repeat_interleave(INT8_GROUP, dim=-1)[..., : self.in_features]


class Int4Linear(_CompactLinear):
    """int4 weights with one fp16 scale per block of 32 weights of a row, llama.cpp's Q4_0 format with
    each block's scale chosen for the least squared error (`gpt2chat.kernels.blocks.quantize_int4`; 0.5625
    bytes a weight), packed for the AVX2 kernel (`gpt2chat.kernels.pack_int4`); activations rounded to
    int8 blocks (`gpt2chat::linear_i4_q8`)."""

    format = "int4"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        from gpt2chat.kernels import pack_int4

        super().__init__(weight.shape[0], weight.shape[1], bias)
        packed, scales = pack_int4(*quantize_int4(weight))
        self.register_buffer("weight", packed)
        self.register_buffer("scale", scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.gpt2chat.linear_i4_q8(x, self.weight, self.scale, self.out_features, self.bias)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        from gpt2chat.kernels import gather_int4_rows

        return gather_int4_rows(self.weight, self.scale, self.in_features, ids)


class TiedEmbedding(nn.Module):
    """The token embedding of a model whose tied head is compact: it reads the head's rows, owns no tensor."""

    def __init__(self, head: _CompactLinear) -> None:
        super().__init__()
        self.__dict__["head"] = head  # a reference, not a submodule: the head's tensors are registered once
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head.rows(ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the tied {self.head.format} head"


# ---------------------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class _Plan:
    layout: str  # "fp32" (native kernels), "fp16", "int8", "int4", or "plain" (the model as it is, in `dtype`)
    device: torch.device
    dtype: torch.dtype


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    from gpt2chat.device import resolve_dtype

    return resolve_dtype(dtype, "cpu")


def _plan(quantize: str | None, device, dtype) -> _Plan:
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise Gpt2ChatError(f"unknown quantize mode {quantize!r}; choose one of {', '.join(QUANTIZE_MODES)} (or none)")
    from gpt2chat.device import resolve_device, resolve_dtype

    # an explicit device is taken as named, so that a mode it cannot do is the error, not its absence here
    device = resolve_device() if device is None else torch.device(device)
    dtype = _resolve_dtype(dtype)
    if device.type == "cpu":
        dtype = dtype or torch.float32
        if quantize is None:
            return _Plan("fp32" if dtype == torch.float32 else "plain", device, dtype)
        if dtype != torch.float32:
            raise Gpt2ChatError(
                f"quantize={quantize} stores the weights compactly and computes in float32 on the CPU; "
                f"it cannot compute in {str(dtype).removeprefix('torch.')} (leave the dtype unset)"
            )
        return _Plan(quantize, device, dtype)
    if quantize in CPU_ONLY_MODES:
        raise Gpt2ChatError(
            f"quantize={quantize} is implemented for the CPU only (AVX2 kernels); on {device.type} use "
            "quantize=fp16 or no quantization"
        )
    if quantize == "fp16":
        if dtype not in (None, torch.float16):
            raise Gpt2ChatError(f"quantize=fp16 on {device.type} computes in float16; it cannot compute in {dtype}")
        return _Plan("plain", device, torch.float16)
    return _Plan("plain", device, dtype or resolve_dtype(None, device))


# ---------------------------------------------------------------------------------------------- convert
def load_for_inference(name_or_path: str | os.PathLike, quantize: str | None = None, device=None, dtype=None):
    """(model, tokenizer) from a checkpoint folder or hub id, in the inference layout of `quantize`.

    The one way front ends load a model to generate with; see the module docstring for what each mode
    does on each device. A mode the device cannot do raises `Gpt2ChatError` before any weight is read.
    """
    from gpt2chat.checkpoint import load_model

    plan = _plan(quantize, device, dtype)
    load_dtype = plan.dtype if plan.layout == "plain" else torch.float32
    model, tokenizer = load_model(name_or_path, device=plan.device, dtype=load_dtype)
    return _convert(model, plan, owned=True), tokenizer


def convert_for_inference(model: nn.Module, quantize: str | None = None, device=None, dtype=None) -> nn.Module:
    """A new model in the inference layout of `quantize` (the caller's model and its tensors are untouched).

    `device` defaults to the model's own device; see the module docstring for the modes.
    """
    if weight_format(model) != "plain":
        raise Gpt2ChatError(f"this model is already converted for inference ({weight_format(model)}); "
                            "convert the original model instead")  # fmt: skip
    if device is None:
        device = model_device_dtype(model)[0]
    return _convert(model, _plan(quantize, device, dtype), owned=False)


def _convert(model: nn.Module, plan: _Plan, owned: bool) -> nn.Module:
    """Replace the projections of `model` (a copy of it unless `owned`) by the modules of `plan`."""
    source = model
    if not owned:  # copy the module tree; tensors stay shared until replaced or unshared below
        memo = {id(t): t for t in (*source.parameters(), *source.buffers())}
        model = copy.deepcopy(source, memo)
    if plan.layout != "plain":
        _replace_projections(model, plan, fresh=not owned)
    if not owned:
        _unshare(model, source)  # before .to(), which would otherwise convert the caller's tensors in place
    model.to(device=plan.device, dtype=plan.dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def _projections(module: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, projection) for every nn.Linear, or LoRA-wrapped one, under `module`."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) or _is_lora(child):
            yield module, name, child
        else:
            yield from _projections(child)


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "delta_weight")


def _effective_weight(projection: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) the projection applies; a LoRA-wrapped one has its adapter merged in (a new tensor)."""
    if _is_lora(projection):
        base = projection.base_layer
        return base.weight.float() + projection.delta_weight().to(base.weight.device), base.bias
    return projection.weight, projection.bias


def _replace_projections(model: nn.Module, plan: _Plan, fresh: bool) -> None:
    from gpt2chat.kernels import load

    load()  # the native kernels, or one warning line and the portable ones
    embedding = getattr(getattr(model, "transformer", None), "wte", None)
    tied_weight = embedding.weight if isinstance(embedding, nn.Embedding) else None
    new_head = None
    converted: dict[int, nn.Parameter] = {}  # fp32: one new Parameter per original tensor (keeps ties)
    for parent, name, projection in list(_projections(model)):
        weight, bias = _effective_weight(projection)
        weight = weight.to(plan.device)
        bias = None if bias is None else bias.to(device=plan.device, dtype=torch.float32)
        if plan.layout == "fp32":
            module = InferenceLinear(_fp32_parameter(weight, converted, fresh), _fp32_parameter(bias, converted, fresh))
        elif plan.layout == "fp16":
            module = Fp16Linear(weight, bias)
        elif plan.layout == "int8":
            module = Int8Linear(weight, bias)
        else:
            module = Int4Linear(weight, bias)
        if tied_weight is not None and projection.weight is tied_weight:
            new_head = module
        setattr(parent, name, module)
    if new_head is None:
        return
    if isinstance(new_head, InferenceLinear):
        model.transformer.wte.weight = new_head.weight
    else:
        model.transformer.wte = TiedEmbedding(new_head)


def _fp32_parameter(tensor: torch.Tensor | None, converted: dict[int, nn.Parameter], fresh: bool):
    """The float32, contiguous Parameter for `tensor` (the same one for a tensor seen before)."""
    if tensor is None:
        return None
    if id(tensor) not in converted:
        value = tensor.detach().to(torch.float32).contiguous()
        if fresh and value.data_ptr() == tensor.data_ptr():
            value = value.clone()
        converted[id(tensor)] = nn.Parameter(value, requires_grad=False)
    return converted[id(tensor)]


def _unshare(model: nn.Module, source: nn.Module) -> None:
    """Give `model` its own copy of every tensor it still shares with `source` (ties kept)."""
    originals = {id(t) for t in (*source.parameters(), *source.buffers())}
    copies: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None or id(tensor) not in originals:
                    continue
                if id(tensor) not in copies:
                    clone = tensor.detach().clone()
                    copies[id(tensor)] = nn.Parameter(clone, requires_grad=False) if isinstance(tensor, nn.Parameter) else clone
                table[name] = copies[id(tensor)]


# ---------------------------------------------------------------------------------------------- inspect
def weight_format(model: nn.Module) -> str:
    """"int4", "int8", "fp16", "fp32" (the native fp32 layout) or "plain" (not converted) for a model."""
    for module in model.modules():
        if isinstance(module, _CompactLinear):
            return module.format
        if isinstance(module, InferenceLinear):
            return "fp32"
    return "plain"


def decode_read_bytes(model: nn.Module) -> int:
    """Bytes of projection weights (and scales) one decode step reads: what bounds batch-1 decode speed."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear | InferenceLinear):
            total += module.weight.numel() * module.weight.element_size()
        elif isinstance(module, Int8Linear | Int4Linear):
            total += module.weight.numel() + module.scale.numel() * module.scale.element_size()
        elif isinstance(module, Fp16Linear):
            total += module.weight.numel() * 2
    return total
