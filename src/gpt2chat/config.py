"""Model configuration: one dataclass for GPT-2 and GPT-Neo, named presets, and the mapping to and from
Hugging Face's `config.json` keys (GPT2Config and GPTNeoConfig spell the same things differently).

This module knows shapes and hyper-parameters only: no torch, no files, no weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gpt2chat.errors import Gpt2ChatError

MODEL_TYPES = ("gpt2", "gpt_neo")
# the names HF gives GELU in its tanh form (what our MLP, the native decode step and llama.cpp compute for them)
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
ACTIVATIONS = (*TANH_GELU, "gelu", "relu", "silu", "swish")


class ConfigError(Gpt2ChatError):
    """A model config (preset name, config.json contents) that we cannot build a model from."""


@dataclass
class ModelConfig:
    model_type: str = "gpt2"  # "gpt2" | "gpt_neo"
    vocab_size: int = 50257
    n_positions: int = 1024  # GPT-Neo: max_position_embeddings
    n_embd: int = 768  # GPT-Neo: hidden_size
    n_layer: int = 12  # GPT-Neo: num_layers
    n_head: int = 12  # GPT-Neo: num_heads
    n_inner: int | None = None  # MLP width; None = 4 * n_embd (GPT-Neo: intermediate_size)
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    attention_layers: list[str] | None = None  # GPT-Neo: "global" / "local" per layer
    window_size: int = 256  # GPT-Neo local attention window
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    pad_token_id: int | None = None  # written to config.json; the tokenizer owns the real value
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ConfigError naming the field when the numbers cannot make a model."""
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(
                f"unknown model_type {self.model_type!r}: supported are {', '.join(MODEL_TYPES)}"
            )
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or isinstance(self.n_inner, bool)
                                         or self.n_inner <= 0):
            raise ConfigError(f"n_inner must be a positive integer or null, got {self.n_inner!r}")
        for name in ("layer_norm_epsilon", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ConfigError(f"{name} must be a token id (an integer >= 0) or null, got {value!r}")
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(
                f"unsupported activation_function {self.activation_function!r}: "
                f"supported are {', '.join(ACTIVATIONS)}"
            )
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be a probability in [0, 1), got {value!r}")
        if self.model_type == "gpt_neo":
            if self.attention_layers is None:
                self.attention_layers = ["global", "local"] * (self.n_layer // 2) + ["global"] * (
                    self.n_layer % 2
                )
            self.attention_layers = list(self.attention_layers)
            if len(self.attention_layers) != self.n_layer:
                raise ConfigError(
                    f"attention_layers has {len(self.attention_layers)} entries but the model has "
                    f"{self.n_layer} layers"
                )
            bad = sorted({a for a in self.attention_layers if a not in ("global", "local")})
            if bad:
                raise ConfigError(f"attention_layers entries must be 'global' or 'local', got {bad}")
            if not isinstance(self.window_size, int) or self.window_size <= 0:
                raise ConfigError(f"window_size must be a positive integer, got {self.window_size!r}")
        elif self.attention_layers is not None and any(a != "global" for a in self.attention_layers):
            raise ConfigError("attention_layers with 'local' layers needs model_type 'gpt_neo'")

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def is_neo(self) -> bool:
        return self.model_type == "gpt_neo"

    def layer_is_local(self, layer: int) -> bool:
        return self.is_neo and self.attention_layers is not None and self.attention_layers[layer] == "local"

    @property
    def local_window(self) -> int | None:
        """GPT-Neo's attention window when some layer is local; None when every layer sees all keys."""
        if self.is_neo and "local" in (self.attention_layers or []):
            return self.window_size
        return None

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ Hugging Face config.json
    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` contents transformers expects for this model type."""
        common = {
            "vocab_size": self.vocab_size,
            "activation_function": self.activation_function,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": True,
            "use_cache": True,
        }
        if self.model_type == "gpt2":
            return {
                "model_type": "gpt2",
                "architectures": ["GPT2LMHeadModel"],
                "n_positions": self.n_positions,
                "n_ctx": self.n_positions,
                "n_embd": self.n_embd,
                "n_layer": self.n_layer,
                "n_head": self.n_head,
                "n_inner": self.n_inner,
                "resid_pdrop": self.resid_pdrop,
                "embd_pdrop": self.embd_pdrop,
                "attn_pdrop": self.attn_pdrop,
                "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False,
                **common,
            }
        return {
            "model_type": "gpt_neo",
            "architectures": ["GPTNeoForCausalLM"],
            "max_position_embeddings": self.n_positions,
            "hidden_size": self.n_embd,
            "num_layers": self.n_layer,
            "num_heads": self.n_head,
            "intermediate_size": self.n_inner,
            "attention_types": _compress_attention_layers(self.attention_layers or []),
            "window_size": self.window_size,
            "resid_dropout": self.resid_pdrop,
            "embed_dropout": self.embd_pdrop,
            "attention_dropout": self.attn_pdrop,
            **common,
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a `config.json` dict (GPT2Config or GPTNeoConfig key names)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type is None:
            raise ConfigError("config has no 'model_type' (expected 'gpt2' or 'gpt_neo')")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}: gpt2chat runs {' and '.join(MODEL_TYPES)} models"
            )

        def pick(*names: str, default: Any = None) -> Any:
            for name in names:
                if name in d and d[name] is not None:
                    return d[name]
            return default

        def number(name: str, default: float) -> float:
            value = pick(name, default=default)
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{name} must be a number, got {value!r}") from None

        def token_id(name: str) -> int | None:
            value = d.get(name)
            if isinstance(value, list):  # eos_token_id may be a list in newer configs
                value = value[0] if value else None
            return value

        if model_type == "gpt2":
            for flag, ok in (
                ("scale_attn_by_inverse_layer_idx", False),
                ("reorder_and_upcast_attn", False),
                ("add_cross_attention", False),
                ("scale_attn_weights", True),
            ):
                if flag in d and bool(d[flag]) != ok:
                    raise ConfigError(f"config sets {flag}={d[flag]!r}, which gpt2chat does not support")
            fields: dict[str, Any] = {
                "n_positions": pick("n_positions", "max_position_embeddings", "n_ctx", default=1024),
                "n_embd": pick("n_embd", "hidden_size", default=768),
                "n_layer": pick("n_layer", "num_hidden_layers", default=12),
                "n_head": pick("n_head", "num_attention_heads", default=12),
                "n_inner": pick("n_inner"),
                "resid_pdrop": pick("resid_pdrop", default=0.1),
                "embd_pdrop": pick("embd_pdrop", default=0.1),
                "attn_pdrop": pick("attn_pdrop", default=0.1),
            }
        else:
            layers = d.get("attention_layers")
            if layers is None and d.get("attention_types") is not None:
                layers = _expand_attention_types(d["attention_types"])
            fields = {
                "n_positions": pick("max_position_embeddings", "n_positions", default=2048),
                "n_embd": pick("hidden_size", "n_embd", default=2048),
                "n_layer": pick("num_layers", "num_hidden_layers", "n_layer", default=24),
                "n_head": pick("num_heads", "num_attention_heads", "n_head", default=16),
                "n_inner": pick("intermediate_size", "n_inner"),
                "attention_layers": layers,
                "window_size": pick("window_size", default=256),
                "resid_pdrop": pick("resid_dropout", "resid_pdrop", default=0.0),
                "embd_pdrop": pick("embed_dropout", "embd_pdrop", default=0.0),
                "attn_pdrop": pick("attention_dropout", "attn_pdrop", default=0.0),
            }
        fields.update(
            model_type=model_type,
            vocab_size=pick("vocab_size", default=50257),
            activation_function=pick("activation_function", default="gelu_new"),
            layer_norm_epsilon=number("layer_norm_epsilon", 1e-5),
            initializer_range=number("initializer_range", 0.02),
            bos_token_id=token_id("bos_token_id") if d.get("bos_token_id") is not None else 50256,
            eos_token_id=token_id("eos_token_id") if d.get("eos_token_id") is not None else 50256,
            pad_token_id=token_id("pad_token_id"),
        )
        return cls(**fields)


def _expand_attention_types(attention_types: Any) -> list[str]:
    """HF's compact form [[["global", "local"], 12]] -> the per-layer list."""
    try:
        layers: list[str] = []
        for pattern, repeat in attention_types:
            for _ in range(int(repeat)):
                layers.extend(str(a) for a in pattern)
        return layers
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"attention_types must look like [[['global', 'local'], 12]], got {attention_types!r}"
        ) from exc


def _compress_attention_layers(layers: list[str]) -> list[list[Any]]:
    """The per-layer list -> HF's compact form, using the shortest repeating pattern."""
    n = len(layers)
    for period in range(1, n + 1):
        if n % period == 0 and layers == layers[:period] * (n // period):
            return [[list(layers[:period]), n // period]]
    return [[list(layers), 1]]  # unreachable: period n always matches


def _preset_table() -> dict[str, ModelConfig]:
    def neo(n_layer: int, n_embd: int, n_head: int) -> ModelConfig:
        return ModelConfig(
            model_type="gpt_neo", n_positions=2048, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            attention_layers=["global", "local"] * (n_layer // 2), window_size=256,
        )  # fmt: skip

    return {
        "gpt2": ModelConfig(n_layer=12, n_embd=768, n_head=12),
        "gpt2-medium": ModelConfig(n_layer=24, n_embd=1024, n_head=16),
        "gpt2-large": ModelConfig(n_layer=36, n_embd=1280, n_head=20),
        "gpt2-xl": ModelConfig(n_layer=48, n_embd=1600, n_head=25),
        "gpt-neo-125m": neo(12, 768, 12),
        "gpt-neo-1.3b": neo(24, 2048, 16),
        # Test sizes: no dropout so that train-mode runs are deterministic.
        "tiny": ModelConfig(
            n_layer=2, n_embd=64, n_head=4, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
        ),
        "tiny-neo": ModelConfig(
            model_type="gpt_neo", n_layer=2, n_embd=64, n_head=4, n_positions=256,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            attention_layers=["global", "local"], window_size=16,
        ),  # fmt: skip
    }


PRESETS: dict[str, ModelConfig] = _preset_table()
PRESET_ALIASES = {"gpt2-small": "gpt2", "gpt-neo-125M": "gpt-neo-125m", "gpt-neo-1.3B": "gpt-neo-1.3b"}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A fresh copy of a named preset, with optional field overrides (e.g. vocab_size=...)."""
    key = PRESET_ALIASES.get(name, name)
    if key not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
    base = PRESETS[key]
    copy = dataclasses.replace(base, attention_layers=list(base.attention_layers or []) or None)
    return copy.replace(**overrides) if overrides else copy


__all__ = ["ModelConfig", "ConfigError", "PRESETS", "get_preset", "ACTIVATIONS", "TANH_GELU"]
