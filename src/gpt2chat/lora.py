"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) for our GPT, saved in PEFT's layout.

Why one module of ~440 lines (over ~400): the layer, merging, and both directions of PEFT's format
belong together (each side checks what the other writes).

``apply_lora`` wraps chosen ``nn.Linear`` projections in :class:`LoRALinear`
(``y = W x + b + (alpha / r) * B A dropout(x)``, Eq. 3 of the paper) and freezes everything else;
``merge_lora`` folds ``(alpha / r) * B A`` into ``W`` and puts plain ``nn.Linear`` layers back, so a merged
model is an ordinary checkpoint. ``save_adapter`` / ``load_adapter`` read and write the folder that PEFT's
``PeftModel.save_pretrained`` writes (``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` / ``lora_B.weight``), so an adapter trained here loads
with ``peft`` onto the ``transformers`` model, and one trained with ``peft`` loads here.

Module paths are the same as in ``transformers`` because our GPT mirrors its names. HF GPT-2 stores its
projections as ``Conv1D`` (weight ``[in, out]``), hence ``fan_in_fan_out: true`` in the config; the LoRA
factors themselves have the same shapes either way (``A: [r, in]``, ``B: [out, r]``).

This module knows nothing about training, tokenizers or checkpoints of the base model.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gpt2chat.atomic_files import write_atomic, write_json_atomic
from gpt2chat.errors import Gpt2ChatError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
_PEFT_PREFIX = "base_model.model."

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "gpt_neo": ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"),
}
# Never adapted: the output head is tied to the token embedding.
_EXCLUDED = ("lm_head",)


class AdapterError(Gpt2ChatError):
    """An adapter folder or LoRA setting that cannot be used with this model."""


@dataclass
class LoRASettings:
    """What ``apply_lora`` did to a model (kept on ``model.lora_settings``)."""

    r: int
    alpha: float
    dropout: float
    targets: list[str]  # the names given (leaf names like "c_attn", or dotted suffixes)
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class LoRALinear(nn.Module):
    """``base(x) + dropout(x) @ A^T @ B^T * scaling`` around a frozen ``nn.Linear``.

    ``lora_A`` starts Kaiming-uniform (as in PEFT) and ``lora_B`` at zero, so a fresh adapter leaves the
    output unchanged. Submodule names (``base_layer``, ``lora_A``, ``lora_B``) follow PEFT's.
    """

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **factory)
        self.r = r
        self.scaling = scaling
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A``, shaped like the base weight ``[out, in]`` (computed in float32)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


# ----------------------------------------------------------------------------------------------------
# Wrapping, freezing, merging


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", "gpt2")


def _linear_names(model: nn.Module) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name and name.split(".")[-1] not in _EXCLUDED
        and not name.endswith((".lora_A", ".lora_B", ".base_layer"))
    ]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _resolve_targets(model: nn.Module, targets: Iterable[str] | None) -> tuple[list[str], list[str]]:
    """(target names, module paths they select); unknown names raise with the valid choices."""
    names = _linear_names(model)
    if targets is None:
        model_type = _model_type(model)
        if model_type not in DEFAULT_TARGETS:
            raise AdapterError(f"no default LoRA targets for model_type {model_type!r}; pass targets=")
        targets = DEFAULT_TARGETS[model_type]
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = list(dict.fromkeys(targets))
    if not targets:
        raise AdapterError("LoRA targets: empty list")
    unknown = [t for t in targets if not any(_matches(n, t) for n in names)]
    if unknown:
        valid = sorted({n.split(".")[-1] for n in names})
        raise AdapterError(
            f"LoRA targets {unknown} match no linear layer of this {_model_type(model)} model; "
            f"valid module names: {', '.join(valid)}"
        )
    return targets, [n for n in names if any(_matches(n, t) for t in targets)]


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Module path -> LoRALinear for every adapted layer."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _check_hparams(r: int, alpha: float, dropout: float) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise AdapterError(f"LoRA alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise AdapterError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    targets: Iterable[str] | None = None,
    *,
    use_rslora: bool = False,
) -> int:
    """Wrap the target projections in :class:`LoRALinear`, freeze every other parameter.

    Args:
        targets: leaf module names (``"c_attn"``) or dotted suffixes (``"mlp.c_proj"``); a name matches
            every ``nn.Linear`` whose path ends with it. Default per model type: GPT-2 ``c_attn, c_proj,
            c_fc``; GPT-Neo ``q_proj, k_proj, v_proj, out_proj, c_fc, c_proj``.
        use_rslora: scale by ``alpha / sqrt(r)`` (rsLoRA) instead of ``alpha / r``.

    Returns:
        The number of trainable parameters (the adapter factors only).
    """
    _check_hparams(r, alpha, dropout)
    if lora_modules(model):
        raise AdapterError("model already has LoRA adapters: merge_lora() it or start from the base model")
    targets, paths = _resolve_targets(model, targets)
    settings = LoRASettings(r=r, alpha=float(alpha), dropout=float(dropout), targets=targets, use_rslora=use_rslora)
    model._lora_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for path in paths:
        base = model.get_submodule(path)
        layer = LoRALinear(base, r, settings.scaling, dropout)
        layer.train(base.training)  # a model in eval mode stays in eval mode (no adapter dropout)
        _set_submodule(model, path, layer)
    model.lora_settings = settings
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (``W += scaling * B A``) and restore plain ``nn.Linear``.

    The parameters get back the ``requires_grad`` they had before ``apply_lora``. Returns the model.
    """
    layers = lora_modules(model)
    if not layers:
        raise AdapterError("merge_lora: the model has no LoRA adapters")
    for path, layer in layers.items():
        base = layer.base_layer
        base.weight.copy_((base.weight.float() + layer.delta_weight()).to(base.weight.dtype))
        _set_submodule(model, path, base)
    flags = getattr(model, "_lora_requires_grad", {})
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, True))
    for attr in ("lora_settings", "_lora_requires_grad"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


# ----------------------------------------------------------------------------------------------------
# PEFT layout


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter factors under PEFT's saved key names (adapter name stripped)."""
    state = {}
    for path, layer in lora_modules(model).items():
        state[f"{_PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A.weight.detach()
        state[f"{_PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B.weight.detach()
    return state


def _adapter_config(model: nn.Module, settings: LoRASettings, base_model_name_or_path: str | None) -> dict:
    model_type = _model_type(model)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": sorted(settings.targets),
        "exclude_modules": None,
        # HF GPT-2 keeps its projections as Conv1D ([in, out] weights); GPT-Neo uses nn.Linear.
        "fan_in_fan_out": model_type == "gpt2",
        "bias": "none",
        "use_rslora": settings.use_rslora,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_bias": False,
        "auto_mapping": None,
    }


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT does; returns the folder."""
    from safetensors.torch import save_file

    settings = getattr(model, "lora_settings", None)
    if settings is None or not lora_modules(model):
        raise AdapterError("save_adapter: the model has no LoRA adapters (apply_lora or load_adapter first)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    config = _adapter_config(model, settings, None if base_model_name_or_path is None else str(base_model_name_or_path))
    write_atomic(out / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json_atomic(out / ADAPTER_CONFIG, config)
    return out


def _read_adapter_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{path}: not found (an adapter folder holds {ADAPTER_CONFIG})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: field 'peft_type' is {config.get('peft_type')!r}; only 'LORA' is supported")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterError(f"{path}: field 'task_type' is {config['task_type']!r}; expected 'CAUSAL_LM'")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "bias": config.get("bias", "none") != "none",
        "lora_bias": bool(config.get("lora_bias")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "layer_replication": bool(config.get("layer_replication")),
        "trainable_token_indices": bool(config.get("trainable_token_indices")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise AdapterError(f"{path}: unsupported LoRA options {bad} (plain LoRA only)")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"{path}: field 'r' must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise AdapterError(f"{path}: field 'lora_alpha' must be a positive number, got {alpha!r}")
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise AdapterError(f"{path}: field 'lora_dropout' must be in [0, 1), got {dropout!r}")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise AdapterError(f"{path}: field 'target_modules' must be a list of names or a regex, got {targets!r}")
    return config


def _read_adapter_weights(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    st_path, bin_path = folder / ADAPTER_WEIGHTS, folder / ADAPTER_WEIGHTS_BIN
    try:
        if st_path.is_file():
            from safetensors.torch import load_file

            return st_path, load_file(st_path)
        if bin_path.is_file():  # older PEFT; never unpickle code
            return bin_path, torch.load(bin_path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file: safetensors / torch raise assorted types
        raise AdapterError(f"{st_path if st_path.is_file() else bin_path}: cannot read adapter weights ({e})") from None
    raise AdapterError(f"{folder}: no {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_BIN}) in the adapter folder")


_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+?)\.(?P<factor>lora_[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def _group_factors(weights_path: Path, state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(f"{weights_path}: unexpected tensor {key!r} (expected ...lora_A.weight / lora_B.weight)")
        grouped.setdefault(match["path"], {})[match["factor"]] = tensor
    for path, factors in grouped.items():
        missing = {"lora_A", "lora_B"} - factors.keys()
        if missing:
            raise AdapterError(f"{weights_path}: module {path!r} lacks {sorted(missing)}")
    if not grouped:
        raise AdapterError(f"{weights_path}: holds no LoRA tensors")
    return grouped


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> int:
    """Attach the adapter in ``adapter_dir`` (PEFT layout, ours or PEFT-made) to ``model``.

    A model without adapters gets ``apply_lora`` with the folder's settings on exactly the modules the
    weights file names; a model that already has the same adapters (e.g. to resume) gets its factors
    overwritten. Shapes and settings are checked against the model first: nothing is changed when the
    folder does not fit. Returns the number of trainable parameters.
    """
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: adapter folder not found")
    config = _read_adapter_config(folder / ADAPTER_CONFIG)
    weights_path, state = _read_adapter_weights(folder)
    factors = _group_factors(weights_path, state)
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    use_rslora = bool(config.get("use_rslora", False))

    targets = config["target_modules"]
    linear_names = set(_linear_names(model)) | set(lora_modules(model))
    for path, pair in factors.items():
        if path not in linear_names:
            raise AdapterError(
                f"{weights_path}: module {path!r} is not a linear layer of this {_model_type(model)} model"
            )
        in_features = model.get_submodule(path).in_features
        out_features = model.get_submodule(path).out_features
        expected = {"lora_A": (r, in_features), "lora_B": (out_features, r)}
        for name, shape in expected.items():
            if tuple(pair[name].shape) != shape:
                raise AdapterError(
                    f"{weights_path}: {path}.{name} has shape {tuple(pair[name].shape)}, expected {shape} "
                    f"(r={r} from {ADAPTER_CONFIG}; is this adapter for another base model size?)"
                )
        selected = re.fullmatch(targets, path) if isinstance(targets, str) else any(_matches(path, t) for t in targets)
        if not selected:
            raise AdapterError(f"{weights_path}: module {path!r} is not covered by target_modules {targets!r}")

    existing = lora_modules(model)
    if existing:
        if set(existing) != set(factors) or any(m.r != r for m in existing.values()):
            raise AdapterError(
                f"{folder}: the model already has different LoRA adapters; load onto the base model instead"
            )
    else:
        # Wrap exactly the modules named by the weights file (dotted full paths match only themselves).
        apply_lora(model, r=r, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0)),
                   targets=sorted(factors), use_rslora=use_rslora)  # fmt: skip
        model.lora_settings.targets = list(targets) if isinstance(targets, list) else sorted(factors)
    model.lora_settings.alpha, model.lora_settings.use_rslora = alpha, use_rslora
    with torch.no_grad():
        for path, layer in lora_modules(model).items():
            layer.lora_A.weight.copy_(factors[path]["lora_A"])
            layer.lora_B.weight.copy_(factors[path]["lora_B"])
            layer.scaling = model.lora_settings.scaling
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "AdapterError",
    "DEFAULT_TARGETS",
    "LoRALinear",
    "LoRASettings",
    "adapter_state_dict",
    "apply_lora",
    "load_adapter",
    "lora_modules",
    "merge_lora",
    "save_adapter",
]
