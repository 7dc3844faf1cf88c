"""Training configuration: the `TrainConfig` dataclass, TOML recipe loading and validation.

A recipe file is TOML. Keys at the top level are shared by every stage; a table per stage (`[sft]`,
`[dpo]`, `[orpo]`) holds that stage's keys and overrides the shared ones; `[eval]` holds the keyword
arguments of the pipeline's evaluation stage. A file with no stage table is a single-stage config.
Command-line flags override the file. Unknown keys and impossible values raise `ConfigError` naming the
key (with the nearest valid name as a suggestion).

This module knows nothing about models, data or torch: it only checks and carries values.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2chat.errors import Gpt2ChatError

OBJECTIVES = ("sft", "dpo", "orpo")
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("auto", "bf16", "fp32")
DISTRIBUTED = ("auto", "ddp", "fsdp", "none")
STAGE_TABLES = (*OBJECTIVES, "eval")


class ConfigError(Gpt2ChatError):
    """A recipe file or flag value is wrong: unknown key, bad type or impossible value."""


@dataclass
class TrainConfig:
    """Everything one training stage needs. Field names are the TOML keys and the CLI flags."""

    objective: str = "sft"
    # model and data
    model: str = "gpt2"                 # hub id, local folder, or "init:PRESET" (random weights)
    template: str = "llama3-context"
    data: list[str] = field(default_factory=list)   # specs FORMAT:LOCATION[@WEIGHT]; "sample" = packaged
    val_fraction: float = 0.02
    max_examples: int | None = None     # cap on training examples (after loading)
    max_length: int = 512               # tokens per example (SFT) or per prompt+reply (preferences)
    max_prompt_length: int | None = None
    max_response_length: int | None = None
    pack: bool = True                   # SFT: several short examples per row
    share_prompt: bool = True           # DPO / ORPO: one row prompt+chosen+rejected, the prompt run once
    out: str = "runs/train"
    # optimisation
    lr: float = 5e-5
    batch_size: int = 8                 # per process, per micro-batch
    grad_accum: int = 1
    max_steps: int | None = None        # optimizer steps; None = run `epochs` epochs
    epochs: float = 1.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0           # cosine / linear floor as a fraction of lr
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    dropout: float | None = None        # None: the checkpoint's own (SFT) or 0.0 (DPO / ORPO, like TRL)
    seed: int = 0
    precision: str = "auto"             # auto: bf16 autocast on CUDA when supported, else fp32
    device: str | None = None           # None: cuda when present
    compile: bool = False
    distributed: str = "auto"           # auto: under torchrun, DDP (FSDP for full fine-tuning of >= 700M)
    # preference objectives
    beta: float = 0.1
    precompute_ref: bool = True         # DPO: reference log-probs once before training
    # LoRA (lora_r = 0: full fine-tuning)
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])
    merge_lora: bool = True             # also write a merged model at the end
    # bookkeeping
    eval_every: int = 0                 # 0: only at the end
    eval_batches: int = 20
    save_every: int = 0                 # 0: only at the end
    keep_last: int = 2
    log_every: int = 1
    resume: str | None = None           # "last" or a checkpoint folder
    progress: bool = True
    stop_after_steps: int | None = None  # stop as if killed after this many steps (tests, time slicing)

    # keys that do not change what is trained: a resumed run may change them
    NON_TRAINING_KEYS = (
        "out", "eval_every", "eval_batches", "save_every", "keep_last", "log_every", "resume",
        "progress", "stop_after_steps", "device", "compile", "share_prompt",
    )

    def validate(self) -> TrainConfig:
        """Raise `ConfigError` naming the first impossible value; return self."""
        if self.objective not in OBJECTIVES:
            _bad("objective", self.objective, f"one of {', '.join(OBJECTIVES)}")
        _positive(self, "lr", "batch_size", "grad_accum", "max_length", "beta", "log_every", "keep_last")
        _positive_or_none(self, "max_steps", "max_examples", "max_prompt_length", "max_response_length",
                          "stop_after_steps")
        _non_negative(self, "warmup_steps", "eval_every", "save_every", "eval_batches", "weight_decay",
                      "lora_r")
        if not self.max_steps and not self.epochs > 0:
            _bad("epochs", self.epochs, "> 0 (or set max_steps)")
        for key in ("warmup_ratio", "min_lr_ratio", "val_fraction", "lora_dropout"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0 and not (key == "min_lr_ratio" and value == 1.0):
                _bad(key, value, "in [0, 1)")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            _bad("dropout", self.dropout, "in [0, 1)")
        if not 0.0 <= self.adam_beta1 < 1.0 or not 0.0 <= self.adam_beta2 < 1.0:
            _bad("adam_beta1/adam_beta2", (self.adam_beta1, self.adam_beta2), "in [0, 1)")
        if self.adam_eps <= 0:
            _bad("adam_eps", self.adam_eps, "> 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            _bad("max_grad_norm", self.max_grad_norm, "> 0 (or leave it out for no clipping)")
        if self.schedule not in SCHEDULES:
            _bad("schedule", self.schedule, f"one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            _bad("precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        if self.distributed not in DISTRIBUTED:
            _bad("distributed", self.distributed, f"one of {', '.join(DISTRIBUTED)}")
        if self.lora_r and self.lora_alpha <= 0:
            _bad("lora_alpha", self.lora_alpha, "> 0")
        if self.lora_r and not self.lora_targets:
            _bad("lora_targets", self.lora_targets, "a non-empty list of module names")
        if not self.data:
            raise ConfigError("data: no dataset given (use --data SPEC or `data = [...]` in the config)")
        if not self.out:
            raise ConfigError("out: an output folder is required")
        for budget in ("max_prompt_length", "max_response_length"):
            value = getattr(self, budget)
            if value is not None and value >= self.max_length:
                _bad(budget, value, f"< max_length ({self.max_length})")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A hash of the keys that decide what is trained: a resume must match it."""
        training = {k: v for k, v in self.to_dict().items() if k not in self.NON_TRAINING_KEYS}
        return hashlib.sha256(json.dumps(training, sort_keys=True).encode()).hexdigest()[:16]

    def training_diff(self, other: dict[str, Any]) -> list[str]:
        """Keys (that matter for training) whose values differ from a saved config dict."""
        mine = self.to_dict()
        return sorted(k for k in mine if k not in self.NON_TRAINING_KEYS and other.get(k) != mine[k])


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def _bad(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"{key} = {value!r} is not allowed: expected {expected}")


def _positive(cfg: TrainConfig, *keys: str) -> None:
    for key in keys:
        value = getattr(cfg, key)
        if not value > 0:
            _bad(key, value, "> 0")


def _positive_or_none(cfg: TrainConfig, *keys: str) -> None:
    for key in keys:
        value = getattr(cfg, key)
        if value is not None and not value > 0:
            _bad(key, value, "> 0")


def _non_negative(cfg: TrainConfig, *keys: str) -> None:
    for key in keys:
        value = getattr(cfg, key)
        if not value >= 0:
            _bad(key, value, ">= 0")


def suggest(key: str, valid: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_type(key: str, value: Any, where: str) -> Any:
    """Coerce a TOML / flag value to the field's type, or raise naming the key."""
    kind = _FIELD_TYPES[key]
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"{where}{key}: a value is required")
    if kind.startswith("list"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}{key} = {value!r}: expected a list of strings")
        return list(value)
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}{key} = {value!r}: expected true or false")
        return value
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}{key} = {value!r}: expected an integer")
        return value
    if kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}{key} = {value!r}: expected a number")
        return float(value)
    if kind.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"{where}{key} = {value!r}: expected a string")
        return value
    return value


def check_keys(values: dict[str, Any], where: str, allowed: tuple[str, ...]) -> None:
    for key in values:
        if key not in allowed:
            raise ConfigError(f"{where}unknown key {key!r}{suggest(key, allowed)}")


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Parse a TOML recipe and check every key name (values are checked when a stage is built)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        recipe = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    check_keys(recipe, f"{path}: ", (*FIELD_NAMES, *STAGE_TABLES))
    for table in STAGE_TABLES:
        if table in recipe and not isinstance(recipe[table], dict):
            raise ConfigError(f"{path}: [{table}] must be a table")
    for table in OBJECTIVES:
        if table in recipe:
            check_keys(recipe[table], f"{path}: [{table}] ", tuple(k for k in FIELD_NAMES if k != "objective"))
    recipe["__path__"] = str(path)
    return recipe


def recipe_stages(recipe: dict[str, Any]) -> list[str]:
    """The objectives a recipe trains, in pipeline order (SFT first)."""
    stages = [s for s in OBJECTIVES if s in recipe]
    if not stages:
        stages = [recipe.get("objective", "sft")]
    if "dpo" in stages and "orpo" in stages:
        raise ConfigError(f"{recipe.get('__path__', 'config')}: give either [dpo] or [orpo], not both")
    return stages


def build_config(objective: str, recipe: dict[str, Any] | None = None,
                 overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Shared keys, then the `[objective]` table, then flags (None = not given), validated."""
    recipe = recipe or {}
    where = f"{recipe['__path__']}: " if "__path__" in recipe else ""
    values: dict[str, Any] = {}
    for key, value in recipe.items():
        if key in FIELD_NAMES:
            values[key] = _check_type(key, value, where)
    for key, value in recipe.get(objective, {}).items():
        values[key] = _check_type(key, value, f"{where}[{objective}] ")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in FIELD_NAMES:
            raise ConfigError(f"unknown option {key!r}{suggest(key, FIELD_NAMES)}")
        values[key] = _check_type(key, value, "--")
    if values.get("objective", objective) != objective:
        raise ConfigError(f"{where}objective = {values['objective']!r} but the command is {objective!r}")
    values["objective"] = objective
    return TrainConfig(**values).validate()
