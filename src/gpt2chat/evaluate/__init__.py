"""Evaluation: metrics and the report card (`gpt2chat eval`, `evaluate_models`).

Modules: `metrics` (pure formulas), `scoring` (log-probs of token sequences), `flops` (parameters, FLOPs,
measured peaks, MFU / MBU), `speed` (prefill / decode tokens/s), `replies` (generation for BLEU and the
side-by-side), `harness` (lm-evaluation-harness bridge), `inputs` (data, prompts and checks before any
model loads), `measure` (one checkpoint through everything), `report` (markdown, JSON, plots) and
`runner` (`evaluate_models`, `EvalConfig`).
Importing this package is light; torch loads when a measurement starts.
"""

from __future__ import annotations

__all__ = ["evaluate_models", "EvalConfig"]


def __getattr__(name: str):
    if name in __all__:
        from gpt2chat.evaluate import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'gpt2chat.evaluate' has no attribute {name!r}")
