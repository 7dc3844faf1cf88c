"""Evaluation: metrics and the report card (`gpt2chat eval`, `evaluate_models`).

Modules: `metrics` (pure formulas), `scoring` (log-probs of sequences), `flops` (parameters, FLOPs,
peaks, MFU / MBU), `speed` (tokens/s), `replies` (generation for BLEU and side-by-side), `harness`
(lm-evaluation-harness bridge), `report` (markdown, JSON, plots), `runner` (`evaluate_models`).
Importing this package is light; torch loads when a measurement starts.
"""

from __future__ import annotations

__all__ = ["evaluate_models", "EvalConfig"]


def __getattr__(name: str):
    if name in __all__:
        from gpt2chat.evaluate import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'gpt2chat.evaluate' has no attribute {name!r}")
