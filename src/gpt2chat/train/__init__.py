"""Training: one trainer for SFT, DPO and ORPO, their recipes and the pipeline.

Names load lazily so that `import gpt2chat.train` stays cheap (torch loads on first use).
"""

from __future__ import annotations

from gpt2chat._lazy import lazy_getattr

_LAZY = {
    "TrainConfig": ("gpt2chat.train.config", "TrainConfig"),
    "ConfigError": ("gpt2chat.train.config", "ConfigError"),
    "build_config": ("gpt2chat.train.config", "build_config"),
    "read_recipe": ("gpt2chat.train.config", "read_recipe"),
    "Trainer": ("gpt2chat.train.trainer", "Trainer"),
    "TrainResult": ("gpt2chat.train.trainer", "TrainResult"),
    "TrainingDivergedError": ("gpt2chat.train.trainer", "TrainingDivergedError"),
    "run_sft": ("gpt2chat.train.recipes", "run_sft"),
    "run_dpo": ("gpt2chat.train.recipes", "run_dpo"),
    "run_orpo": ("gpt2chat.train.recipes", "run_orpo"),
    "run_stage": ("gpt2chat.train.recipes", "run_stage"),
    "run_pipeline": ("gpt2chat.train.recipes", "run_pipeline"),
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
