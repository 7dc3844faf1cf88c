"""The GPT-2 decode step as one native call, and the one rule for when a forward takes it.

A decode step of the engine (`AttentionPlan.for_cache(..., length=1)`: B rows, each adding ONE token to its
own KV-cache row at its own length) runs, on the module path, ~40 small torch ops and ~12 module calls per
layer around the four projections. `gpt2chat::decode_step` (kernels/csrc/decode.cpp) runs the embedding
(the token's row read from wte or the tied compact head, plus wpe), every block (LayerNorms, the projections through the same kernels the modules call, the KV write, the
attention of the one query per row and head, GELU, the residuals) and ln_f in one call; `GPT.hidden_states`
asks `hidden_states` here first and takes the module path, unchanged, whenever it returns None:

- `GPT2CHAT_FUSED_DECODE=0` (or false / off / no) in the environment;
- gradients on, the model training, a tensor off the CPU, `torch.compile` tracing, global module hooks;
- a forward that is not a one-token step over a `CacheSlots` plan (T > 1 chunks, prefill, ragged or static
  `for_decode` plans);
- a model the native step cannot run as the modules would (`why_not(model)` says which): GPT-Neo, an
  activation other than GELU's tanh form, a projection that is not one of quantize.py's inference modules
  (a plain or LoRA-wrapped `nn.Linear`, anything unknown), a subclass of a block module, hooks on a
  submodule, or the native kernels not loaded (the portable backend, no AVX2, no compiler).

What the step needs from the model (which format each projection has and its packed tensors, the
LayerNorms, wpe) is gathered once per model into `DecodeWeights` and kept beside it (not in it: a deepcopy
or `convert_for_inference` of the model does not inherit it). Any parameter, buffer or submodule assigned
anywhere afterwards (`quantize`, `load_state_dict(assign=True)`, `apply_lora`, retying) marks every gathered
set stale and the next step gathers again; in-place changes (`load_state_dict`, `.to()` on the same
tensors) need nothing, since the set holds the model's own tensors. Not seen: hooks added to a submodule
after the first step, and one submodule switched to train mode while the model is in eval mode.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from gpt2chat.attention_plan import AttentionPlan
from gpt2chat.config import TANH_GELU
from gpt2chat.kv_cache import CacheSlots

__all__ = ["FUSED_ENV", "DecodeWeights", "decode_weights", "hidden_states", "why_not"]

FUSED_ENV = "GPT2CHAT_FUSED_DECODE"
_OFF = ("0", "false", "off", "no")
# projection formats, as csrc/decode.cpp numbers them
F32, F16, I8, I8_Q8, I4_Q8 = range(5)


@dataclass(frozen=True, eq=False)
class DecodeWeights:
    """The arguments of `gpt2chat::decode_step` that depend on the model alone, in its order."""

    wte: list[torch.Tensor]  # the token embedding's own tensors ([weight], or the tied head's [weight, scale])
    wte_format: int
    vocab: int
    wpe: torch.Tensor
    tensors: list[torch.Tensor]  # per layer: ln_1 w, b; (weight, scale, bias) of c_attn, attn.c_proj; ln_2 w, b;
    # (weight, scale, bias) of c_fc, mlp.c_proj; then ln_f w, b. An absent scale / bias is an empty tensor.
    formats: list[int]  # per layer: c_attn, attn.c_proj, c_fc, mlp.c_proj
    n_head: int
    inner: int
    eps: float
    int8_modules: tuple[nn.Module, ...]  # their `exact_activations` picks the kernel: checked every step
    exact: tuple[bool, ...]

    def current(self) -> bool:
        """False when a plain attribute the registration hooks cannot see has changed the module path."""
        return all(m.exact_activations == e for m, e in zip(self.int8_modules, self.exact, strict=True))


# Every parameter / buffer / submodule registered anywhere bumps the generation; a gathered set is good for
# the generation it was built in (cheaper than re-walking ~200 tensors to compare them every step).
_generation = 0
_gathered: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (generation, weights, reason)


def _bump(*_args) -> None:
    global _generation
    _generation += 1


nn.modules.module.register_module_parameter_registration_hook(_bump)
nn.modules.module.register_module_buffer_registration_hook(_bump)
nn.modules.module.register_module_module_registration_hook(_bump)


def decode_weights(model: nn.Module) -> DecodeWeights | None:
    """The model's gathered `DecodeWeights` (built on first use, rebuilt when stale), or None if the native
    step cannot run this model (`why_not` says why)."""
    entry = _gathered.get(model)
    if entry is None or entry[0] != _generation or (entry[1] is not None and not entry[1].current()):
        generation = _generation
        try:
            weights, reason = _gather(model), None
        except _Unsupported as exc:
            weights, reason = None, str(exc)
        entry = (generation, weights, reason)
        _gathered[model] = entry
    return entry[1]


def why_not(model: nn.Module) -> str | None:
    """Why the native decode step cannot run `model` (None when it can); the per-step conditions aside."""
    decode_weights(model)
    return _gathered[model][2]


def hidden_states(model: nn.Module, input_ids: torch.Tensor, plan: AttentionPlan | None) -> torch.Tensor | None:
    """The final layer-normed hidden states [B, 1, C] of a one-token decode step through the native step,
    having written the step's keys / values into the plan's cache; None when the module path must run."""
    if plan is None or type(plan.cache) is not CacheSlots or input_ids.dim() != 2 or input_ids.shape[1] != 1:
        return None
    if torch.is_grad_enabled() or model.training or input_ids.device.type != "cpu":
        return None
    if os.environ.get(FUSED_ENV, "").strip().lower() in _OFF or _global_hooks() or torch.compiler.is_compiling():
        return None
    weights = decode_weights(model)
    if weights is None:
        return None
    slots = plan.cache
    cache = slots.cache
    if cache.k[0].dtype != torch.float32 or cache.k[0].device.type != "cpu":
        return None
    return torch.ops.gpt2chat.decode_step(
        input_ids, weights.wte, weights.wte_format, weights.vocab, weights.wpe, plan.position_ids, slots.rows,
        slots.first_row, cache.k, cache.v, weights.tensors, weights.formats, weights.n_head, weights.inner,
        weights.eps,
    )  # fmt: skip


def _global_hooks() -> bool:
    module = nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


class _Unsupported(Exception):
    pass


def _gather(model: nn.Module) -> DecodeWeights:
    from gpt2chat import kernels
    from gpt2chat.model import MLP, Attention, Block
    from gpt2chat.quantize import Fp16Linear, InferenceLinear, Int4Linear, Int8Linear, TiedEmbedding

    config = getattr(model, "config", None)
    tr = getattr(model, "transformer", None)
    if config is None or tr is None:
        raise _Unsupported("not a gpt2chat GPT model")
    if config.is_neo:
        raise _Unsupported("GPT-Neo (q/k/v projections, local layers, unscaled scores) has no native step")
    if config.activation_function not in TANH_GELU:
        raise _Unsupported(f"activation {config.activation_function!r}: the native step computes tanh GELU")
    if kernels.load() != "native":
        raise _Unsupported("the native CPU kernels are not loaded")
    for name, module in tr.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            raise _Unsupported(f"transformer.{name} has forward hooks, which the native step would not call")

    def projection(module: nn.Module, where: str) -> tuple[int, list[torch.Tensor]]:
        empty = torch.empty(0)
        bias = empty if module.bias is None else module.bias
        kind = type(module)
        if kind is InferenceLinear and module.weight.dtype == torch.float32:
            return F32, [module.weight, empty, bias]
        if kind is Fp16Linear:
            return F16, [module.weight, empty, bias]
        if kind is Int8Linear:
            return (I8 if module.exact_activations else I8_Q8), [module.weight, module.scale, bias]
        if kind is Int4Linear:
            return I4_Q8, [module.weight, module.scale, bias]
        raise _Unsupported(f"{where} is a {kind.__name__}, not one of the inference projections "
                           "(gpt2chat.quantize.convert_for_inference makes them)")  # fmt: skip

    def norm(module: nn.Module, where: str) -> list[torch.Tensor]:
        if type(module) is not nn.LayerNorm or module.weight is None or module.bias is None:
            raise _Unsupported(f"{where} is not an affine nn.LayerNorm")
        if module.weight.dtype != torch.float32 or module.bias.dtype != torch.float32:
            raise _Unsupported(f"{where} is {module.weight.dtype}, not float32")
        if tuple(module.normalized_shape) != (config.n_embd,) or module.eps != ln_eps:
            raise _Unsupported(f"{where} normalises {tuple(module.normalized_shape)} with eps {module.eps}")
        return [module.weight, module.bias]

    wte = tr.wte
    if type(wte) is nn.Embedding and wte.weight.dtype == torch.float32:
        wte_format, wte_tensors = F32, [wte.weight]
    elif type(wte) is TiedEmbedding and type(wte.head) in (Fp16Linear, Int8Linear, Int4Linear):
        wte_format, parts = projection(wte.head, "the tied lm_head")
        wte_tensors = parts[:1] if wte_format == F16 else parts[:2]
    else:
        raise _Unsupported(f"transformer.wte is a {type(wte).__name__}, not an fp32 nn.Embedding or a TiedEmbedding")
    if wte.num_embeddings < config.vocab_size:
        raise _Unsupported(f"transformer.wte has {wte.num_embeddings} rows for a vocabulary of {config.vocab_size}")
    ln_eps = tr.ln_f.eps if isinstance(tr.ln_f, nn.LayerNorm) else None
    tensors: list[torch.Tensor] = []
    formats: list[int] = []
    int8 = []
    for i, block in enumerate(tr.h):
        where = f"transformer.h.{i}"
        if type(block) is not Block or type(block.attn) is not Attention or type(block.mlp) is not MLP:
            raise _Unsupported(f"{where} is not the plain GPT-2 block")
        for ln, pair in (
            ("ln_1", ((block.attn.c_attn, "attn.c_attn"), (block.attn.c_proj, "attn.c_proj"))),
            ("ln_2", ((block.mlp.c_fc, "mlp.c_fc"), (block.mlp.c_proj, "mlp.c_proj"))),
        ):  # fmt: skip
            tensors += norm(getattr(block, ln), f"{where}.{ln}")
            for module, name in pair:
                code, parts = projection(module, f"{where}.{name}")
                formats.append(code)
                tensors += parts
                int8 += [module] if type(module) is Int8Linear else []
    tensors += norm(tr.ln_f, "transformer.ln_f")
    wpe = tr.wpe.weight if type(tr.wpe) is nn.Embedding else None
    if wpe is None or wpe.dtype != torch.float32:
        raise _Unsupported("transformer.wpe is not a float32 nn.Embedding")
    if any(t.device.type != "cpu" for t in (wpe, *tensors)):
        raise _Unsupported("the model is not on the CPU")
    return DecodeWeights(wte_tensors, wte_format, config.vocab_size, wpe, tensors, formats, config.n_head, config.inner_dim, float(ln_eps), tuple(int8),
                         tuple(m.exact_activations for m in int8))  # fmt: skip
