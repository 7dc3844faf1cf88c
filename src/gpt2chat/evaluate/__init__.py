"""Evaluation: metrics and the report card (`gpt2chat eval`, `evaluate_models`).

Modules: `metrics` (pure formulas), `scoring` (log-probs of token sequences), `flops` (parameters, FLOPs,
the measured peaks, MFU / MBU), `speed` (prefill / decode tokens/s timed by the engine's loop), `replies`
(generation for BLEU and the side-by-side), `harness` (lm-evaluation-harness bridge), `heldout` (the
held-out split a training run saves, model lineages, overlap with training rows), `inputs` (data,
prompts and checks before any model loads), `measure` (one checkpoint through everything), `report`
(markdown, JSON, plots) and `runner` (`evaluate_models`, `EvalConfig`).
Importing this package is light; torch loads when a measurement starts.
"""

from __future__ import annotations

from gpt2chat._lazy import lazy_getattr

_LAZY = {name: ("gpt2chat.evaluate.report_card", name) for name in ("evaluate_models", "EvalConfig")}

__all__ = list(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY, globals())
