"""Bridge to EleutherAI's lm-evaluation-harness (optional dependency `lm_eval`) for benchmark scores.

The checkpoint is evaluated by lm-eval's own `hf` backend on the checkpoint folder (`pretrained=FOLDER`,
its tokenizer from the same folder), so the harness sees exactly what `AutoModelForCausalLM` loads.
A task is either a local task file (`path/to/task.yaml`, lm-eval's YAML task format, with its data in
local files) or one of lm-eval's registered names. Seed 001's Open LLM Leaderboard tasks have short names
with their leaderboard shot counts: `arc` (arc_challenge, 25-shot, acc_norm), `hellaswag` (10-shot,
acc_norm), `mmlu` (5-shot, acc), `truthfulqa` (truthfulqa_mc2, 0-shot, acc), `leaderboard` = all four;
any other name passes through (`TASK:SHOTS` sets its shots).

Local tasks run with the Hugging Face hub switched off, so nothing reaches for the network. Registered
tasks download their datasets from the hub: when it is off (HF_HUB_OFFLINE) or does not answer within
seconds, they run offline too, which works for datasets already in the cache and fails fast for the rest.
Two failures get their own message rather than a traceback: the harness is not installed (`HarnessError`,
raised before any work starts) and the harness cannot reach its datasets: those tasks are reported
"unavailable" with the reason.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from gpt2chat.errors import Gpt2ChatError

__all__ = ["HarnessError", "HarnessTask", "parse_tasks", "require_harness", "run_harness", "hub_answers", "hub_off",
           "LEADERBOARD"]


class HarnessError(Gpt2ChatError):
    """lm-evaluation-harness is missing or was asked for something it cannot do."""


@dataclass(frozen=True)
class HarnessTask:
    name: str  # the harness task name
    num_fewshot: int | None
    metric: str | None  # the metric the report shows (None: the first the harness returns)
    alias: str
    path: str | None = None  # a local task file; None: a task registered in lm-eval


LEADERBOARD = {
    "arc": HarnessTask("arc_challenge", 25, "acc_norm", "ARC (25-shot)"),
    "hellaswag": HarnessTask("hellaswag", 10, "acc_norm", "HellaSwag (10-shot)"),
    "mmlu": HarnessTask("mmlu", 5, "acc", "MMLU (5-shot)"),
    "truthfulqa": HarnessTask("truthfulqa_mc2", 0, "acc", "TruthfulQA (0-shot)"),
}
INSTALL_HINT = "install it with `pip install 'gpt2chat[harness]'` (lm-eval[hf]>=0.4), or run without --harness"
_OFFLINE_NAMES = re.compile(r"Connection|Offline|LocalEntryNotFound|Timeout|MaxRetry|ProxyError|NameResolution")
_OFFLINE_TEXT = re.compile(r"offline|connect|couldn't reach|could not reach|network|resolve host|timed out", re.I)


_TASK_FILE = (".yaml", ".yml")
_TASK_NAME = re.compile(r"^task:\s*['\"]?([^'\"\s#]+)", re.M)


def _local_task(item: str, shots: str | None) -> HarnessTask:
    path = Path(item).expanduser()
    if not path.is_file():
        raise HarnessError(f"--harness: task file not found: {item}")
    match = _TASK_NAME.search(path.read_text(encoding="utf-8", errors="replace"))
    if match is None:
        raise HarnessError(f"--harness {item}: not an lm-eval task file (no `task:` name in it)")
    name = match.group(1)
    alias = f"{name} ({path.name}{f', {int(shots)}-shot' if shots else ''})"
    return HarnessTask(name, int(shots) if shots else None, None, alias, str(path.resolve()))


def parse_tasks(text: str) -> list[HarnessTask]:
    """`"arc,hellaswag"`, `"leaderboard"`, `"winogrande:5"`, `"tasks/mine.yaml"` -> tasks; bad -> HarnessError."""
    tasks: list[HarnessTask] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, shots = item.rpartition(":") if re.search(r":\s*\w*$", item) else (item, "", "")
        name, shots = name.strip(), shots.strip()
        if shots and not shots.isdigit():
            raise HarnessError(f"--harness {text!r}: shots for {name!r} must be an integer, got {shots!r}")
        if name.lower().endswith(_TASK_FILE):
            tasks.append(_local_task(name, shots))
            continue
        name = name.lower()
        if name in ("leaderboard", "openllm", "open-llm-leaderboard"):
            tasks.extend(LEADERBOARD.values())
            continue
        known = LEADERBOARD.get(name) or next((t for t in LEADERBOARD.values() if t.name == name), None)
        base = known or HarnessTask(name, None, None, name)
        if shots:
            base = HarnessTask(base.name, int(shots), base.metric, f"{base.name} ({int(shots)}-shot)")
        tasks.append(base)
    if not tasks:
        raise HarnessError(f"--harness {text!r} names no task (e.g. leaderboard, arc,hellaswag, or a task.yaml)")
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
        metric, comma, _filter = str(key).partition(",")
        if not comma or metric.endswith("_stderr"):  # "sample_len", "alias": not metrics
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            values.setdefault(metric, (float(value), task_results.get(f"{metric}_stderr,{_filter}")))
    if not values:
        return None, None, None
    metric = wanted if wanted in values else next(iter(values))
    value, stderr = values[metric]
    return metric, value, stderr if isinstance(stderr, int | float) else None


def _flag_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_answers(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub is allowed (no offline flag) and answers within `timeout` seconds."""
    if _flag_on("HF_HUB_OFFLINE") or _flag_on("HF_DATASETS_OFFLINE"):
        return False
    from gpt2chat.checkpoint import _with_deadline

    try:
        from huggingface_hub import constants, get_session

        _with_deadline(lambda: get_session().head(constants.ENDPOINT, timeout=timeout), timeout + 1)
    except Exception:  # noqa: BLE001 - any failure means: do not wait for the hub
        return False
    return True


@contextlib.contextmanager
def hub_off():
    """Switch the Hugging Face hub off for `datasets`, `transformers` and `huggingface_hub`, then restore.

    The libraries read the flags at import, so the imported modules' copies are switched too."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved_env = {name: os.environ.get(name) for name in names}
    modules = [("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
               ("datasets.config", "HF_DATASETS_OFFLINE")]
    saved_attrs = [(m, a, getattr(sys.modules[m], a)) for m, a in modules
                   if m in sys.modules and hasattr(sys.modules[m], a)]
    os.environ.update({name: "1" for name in names})
    for module, attr, _ in saved_attrs:
        setattr(sys.modules[module], attr, True)
    try:
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for module, attr, value in saved_attrs:
            setattr(sys.modules[module], attr, value)


def _task_manager(task: HarnessTask, managers: dict):
    """lm-eval's task index for `task`, built once per folder.

    A local file needs no index of lm-eval's own tasks. Indexing all of them parses ~14,000 YAML files
    (a minute on a busy 2-core machine), so a registered name is first looked up in lm-eval's folder named
    after it (`arc_easy` -> tasks/arc_easy, tasks/arc), and only then in the full index.
    """
    from lm_eval.tasks import TaskManager

    if task.path:
        if "local" not in managers:
            managers["local"] = TaskManager(include_defaults=False)
        return managers["local"]
    root = Path(importlib.import_module("lm_eval.tasks").__file__).parent
    parts = task.name.split("_")
    for folder in dict.fromkeys(root / "_".join(parts[:n]) for n in range(len(parts), 0, -1)):
        if folder.is_dir():
            key = str(folder)
            if key not in managers:
                managers[key] = TaskManager(include_defaults=False, include_path=str(folder))
            if task.name in managers[key].all_tasks:
                return managers[key]
    if "all" not in managers:
        managers["all"] = TaskManager()
    return managers["all"]


def run_harness(model_path: str, tasks: list[HarnessTask], *, device: str = "cpu", dtype: str = "float32",
                batch_size: int = 8, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Run each task through lm_eval's `hf` model on `model_path`; one result row per task.

    A registered task whose datasets cannot be reached gets `status: "unavailable"` and the reason, and the
    remaining registered tasks are not attempted (they need the same hub); other harness errors are
    `status: "failed"`.
    """
    simple_evaluate = require_harness()
    online = None  # probed once, only if a registered task comes
    managers: dict = {}
    rows: list[dict] = []
    unreachable: str | None = None
    for task in tasks:
        row = {"task": task.name, "alias": task.alias, "num_fewshot": task.num_fewshot, "metric": task.metric,
               "value": None, "stderr": None, "limit": limit, "source": task.path or "lm-eval registry"}
        if unreachable and task.path is None:
            rows.append({**row, "status": "unavailable", "message": unreachable})
            continue
        if task.path is None and online is None:
            online = hub_answers()
        kwargs = dict(model="hf", model_args=f"pretrained={model_path},dtype={dtype}",
                      tasks=[task.path or task.name], num_fewshot=task.num_fewshot, batch_size=batch_size,
                      device=device, limit=limit, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed)
        try:
            with hub_off() if task.path or not online else contextlib.nullcontext():
                output = simple_evaluate(**kwargs, task_manager=_task_manager(task, managers))
        except Exception as exc:  # the harness raises many types; sort them into two messages
            reason = f"{type(exc).__name__}: {exc}"
            if _is_unreachable(exc) and task.path is None:
                unreachable = (f"lm-evaluation-harness could not reach the datasets of task {task.name!r} "
                               f"({reason}); registered tasks download them from the Hugging Face hub: run where "
                               "the hub is reachable, with the datasets already in the HF cache, or give a "
                               "local task file (task.yaml)")
                rows.append({**row, "status": "unavailable", "message": unreachable})
            else:
                rows.append({**row, "status": "failed", "message": f"lm-evaluation-harness failed on "
                                                                 f"{task.name!r}: {reason}"})
            continue
        results = (output or {}).get("results", {})
        task_results = results.get(task.name) or (next(iter(results.values())) if results else {})
        metric, value, stderr = _pick_metric(task_results, task.metric)
        rows.append({**row, "metric": metric, "value": value, "stderr": stderr,
                     "samples": task_results.get("sample_len"),
                     "status": "ok" if value is not None else "failed",
                     "message": None if value is not None else "the harness returned no metric"})
    return rows
