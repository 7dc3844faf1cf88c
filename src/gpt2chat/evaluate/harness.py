"""Bridge to EleutherAI's lm-evaluation-harness (optional dependency `lm_eval`) for leaderboard scores.

The checkpoint is evaluated through its `transformers` layout (`model="hf"`, `pretrained=FOLDER`), so the
harness sees exactly what `AutoModelForCausalLM` loads. Seed 001's Open LLM Leaderboard tasks have short
names with their leaderboard shot counts: `arc` (arc_challenge, 25-shot, acc_norm), `hellaswag` (10-shot,
acc_norm), `mmlu` (5-shot, acc), `truthfulqa` (truthfulqa_mc2, 0-shot, acc), `leaderboard` = all four;
any other harness task name passes through (`TASK:SHOTS` sets its shots).

Two failures get their own message rather than a traceback: the harness is not installed
(`HarnessError`, raised before any work starts) and the harness cannot reach its datasets (the hub is
offline or blocked): those tasks are reported "unavailable" with the reason.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

from gpt2chat.errors import Gpt2ChatError

__all__ = ["HarnessError", "HarnessTask", "parse_tasks", "require_harness", "run_harness", "LEADERBOARD"]


class HarnessError(Gpt2ChatError):
    """lm-evaluation-harness is missing or was asked for something it cannot do."""


@dataclass(frozen=True)
class HarnessTask:
    name: str  # the harness task name
    num_fewshot: int | None
    metric: str | None  # the metric the report shows (None: the first the harness returns)
    alias: str


LEADERBOARD = {
    "arc": HarnessTask("arc_challenge", 25, "acc_norm", "ARC (25-shot)"),
    "hellaswag": HarnessTask("hellaswag", 10, "acc_norm", "HellaSwag (10-shot)"),
    "mmlu": HarnessTask("mmlu", 5, "acc", "MMLU (5-shot)"),
    "truthfulqa": HarnessTask("truthfulqa_mc2", 0, "acc", "TruthfulQA (0-shot)"),
}
INSTALL_HINT = "install it with `pip install 'gpt2chat[harness]'` (lm-eval>=0.4), or run without --harness"
_OFFLINE_NAMES = re.compile(r"Connection|Offline|LocalEntryNotFound|Timeout|MaxRetry|ProxyError|NameResolution")
_OFFLINE_TEXT = re.compile(r"offline|connect|couldn't reach|could not reach|network|resolve host|timed out", re.I)


def parse_tasks(text: str) -> list[HarnessTask]:
    """`"arc,hellaswag"`, `"leaderboard"`, `"winogrande:5"` -> tasks; bad syntax -> HarnessError."""
    tasks: list[HarnessTask] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, shots = item.partition(":")
        name = name.strip().lower()
        if shots and not shots.strip().isdigit():
            raise HarnessError(f"--harness {text!r}: shots for {name!r} must be an integer, got {shots!r}")
        if name in ("leaderboard", "openllm", "open-llm-leaderboard"):
            tasks.extend(LEADERBOARD.values())
            continue
        known = LEADERBOARD.get(name) or next((t for t in LEADERBOARD.values() if t.name == name), None)
        base = known or HarnessTask(name, None, None, name)
        if shots:
            base = HarnessTask(base.name, int(shots), base.metric, f"{base.name} ({int(shots)}-shot)")
        tasks.append(base)
    if not tasks:
        raise HarnessError(f"--harness {text!r} names no task (e.g. leaderboard, or arc,hellaswag,mmlu,truthfulqa)")
    return list(dict.fromkeys(tasks))


def require_harness():
    """The `simple_evaluate` function of lm_eval, or HarnessError saying that it is not installed."""
    try:
        module = importlib.import_module("lm_eval")
    except ImportError as exc:
        raise HarnessError(f"lm-evaluation-harness (python module `lm_eval`) is not installed: {INSTALL_HINT}") from exc
    simple_evaluate = getattr(module, "simple_evaluate", None)
    if simple_evaluate is None:
        try:
            simple_evaluate = importlib.import_module("lm_eval.evaluator").simple_evaluate
        except (ImportError, AttributeError) as exc:
            raise HarnessError(f"the installed lm_eval has no simple_evaluate (need lm-eval>=0.4): {exc}") from exc
    return simple_evaluate


def _is_unreachable(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ConnectionError | TimeoutError):
            return True
        if _OFFLINE_NAMES.search(type(exc).__name__) or _OFFLINE_TEXT.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _pick_metric(task_results: dict, wanted: str | None) -> tuple[str | None, float | None, float | None]:
    """(metric, value, stderr) from one task's harness results (`"acc_norm,none"`-style keys)."""
    values = {}
    for key, value in task_results.items():
        metric, _, _filter = str(key).partition(",")
        if isinstance(value, int | float) and not isinstance(value, bool) and not metric.endswith("_stderr"):
            values.setdefault(metric, (float(value), task_results.get(f"{metric}_stderr,{_filter}")))
    if not values:
        return None, None, None
    metric = wanted if wanted in values else next(iter(values))
    value, stderr = values[metric]
    return metric, value, stderr if isinstance(stderr, int | float) else None


def run_harness(model_path: str, tasks: list[HarnessTask], *, device: str = "cpu", dtype: str = "float32",
                batch_size: int = 8, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Run each task through lm_eval's `hf` model on `model_path`; one result row per task.

    A task whose datasets cannot be reached gets `status: "unavailable"` and the reason, and the remaining
    tasks are not attempted (they need the same hub); other harness errors are `status: "failed"`.
    """
    simple_evaluate = require_harness()
    rows: list[dict] = []
    unreachable: str | None = None
    for task in tasks:
        row = {"task": task.name, "alias": task.alias, "num_fewshot": task.num_fewshot, "metric": task.metric,
               "value": None, "stderr": None, "limit": limit}
        if unreachable:
            rows.append({**row, "status": "unavailable", "message": unreachable})
            continue
        try:
            output = simple_evaluate(model="hf", model_args=f"pretrained={model_path},dtype={dtype}",
                                     tasks=[task.name], num_fewshot=task.num_fewshot, batch_size=batch_size,
                                     device=device, limit=limit, random_seed=seed, numpy_random_seed=seed,
                                     torch_random_seed=seed)
        except Exception as exc:  # the harness raises many types; sort them into two messages
            reason = f"{type(exc).__name__}: {exc}"
            if _is_unreachable(exc):
                unreachable = (f"lm-evaluation-harness could not reach the datasets of task {task.name!r} "
                               f"({reason}); it downloads them from the Hugging Face hub: run where the hub "
                               "is reachable, or with the datasets already in the HF cache")
                rows.append({**row, "status": "unavailable", "message": unreachable})
            else:
                rows.append({**row, "status": "failed", "message": f"lm-evaluation-harness failed on "
                                                                 f"{task.name!r}: {reason}"})
            continue
        results = (output or {}).get("results", {})
        task_results = results.get(task.name) or (next(iter(results.values())) if results else {})
        metric, value, stderr = _pick_metric(task_results, task.metric)
        rows.append({**row, "metric": metric, "value": value, "stderr": stderr,
                     "status": "ok" if value is not None else "failed",
                     "message": None if value is not None else "the harness returned no metric"})
    return rows
