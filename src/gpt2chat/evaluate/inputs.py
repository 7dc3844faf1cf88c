"""What an evaluation reads, checked before any model loads: model locations, held-out conversations and
preference pairs (defaults in ../shared when present), side-by-side prompts, training logs.

Every problem here is a `Gpt2ChatError` naming the flag, the file and what to do.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from gpt2chat.errors import Gpt2ChatError

__all__ = [
    "DEFAULT_PROMPTS",
    "shared_file",
    "check_model_location",
    "held_out_conversations",
    "held_out_pairs",
    "side_by_side_prompts",
    "find_metrics_log",
    "harness_tasks",
    "seed_everything",
    "version",
]

# Seed 000's three example prompts.
DEFAULT_PROMPTS = (
    "What's the best way to learn Python?",
    "How can I improve my English skills?",
    "How can we maintain our well-being?",
)
DEFAULT_CONVERSATIONS = ("oasst1", "data/oasst1/en-validation.jsonl")
DEFAULT_PAIRS = ("ultrafeedback", "data/ultrafeedback/heldout-200.jsonl")
_LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


def version() -> str:
    from gpt2chat import __version__

    return __version__


def _shared_dirs() -> list[Path]:
    candidates = []
    if os.environ.get("GPT2CHAT_SHARED"):
        candidates.append(Path(os.environ["GPT2CHAT_SHARED"]))
    candidates.append(Path.cwd().parent / "shared")
    candidates.append(Path(__file__).resolve().parents[3].parent / "shared")  # beside the repository
    return candidates


def shared_file(relative: str) -> Path | None:
    """`relative` inside the read-only shared folder ($GPT2CHAT_SHARED, or ../shared), if it exists."""
    for folder in _shared_dirs():
        path = folder / relative
        if path.is_file():
            return path
    return None


def _looks_local(location: str) -> bool:
    return (location.startswith((".", "/", "~")) or os.sep in location and Path(location).suffix != ""
            or location.endswith(_LOCAL_SUFFIXES) or Path(location).expanduser().exists())


def check_model_location(model: str) -> None:
    """A model argument that names a local folder must exist and be a folder (hub ids pass through)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise Gpt2ChatError(f"--model {model}: not a checkpoint folder (it is a file)")
        if not (path / "config.json").is_file():
            raise Gpt2ChatError(f"--model {model}: folder has no config.json, so it is not a checkpoint "
                                "(make one with `gpt2chat init` or a training command)")
        return
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep == "\\" and "\\" in model:
        raise Gpt2ChatError(f"--model {model}: checkpoint folder not found")


def _load(kind: str, spec: str, loader, max_rows: int | None):
    fmt, _, location = spec.partition(":")
    if not location:
        raise Gpt2ChatError(f"{kind} spec {spec!r}: expected FORMAT:PATH, e.g. oasst1:en-validation.jsonl")
    location = location.rsplit("@", 1)[0] if "@" in location and location.rsplit("@", 1)[1].replace(".", "").isdigit() \
        else location
    if not location.startswith("package:") and _looks_local(location) and not Path(location).expanduser().exists():
        raise Gpt2ChatError(f"{kind} file not found: {location} (from {spec!r})")
    items, load_report = loader(spec)
    rows_read, kept = load_report.rows, len(items)
    if max_rows is not None:
        items = items[:max_rows]
    if not items:
        raise Gpt2ChatError(f"{kind} {spec!r}: no usable rows ({rows_read} rows read, {kept} kept)\n"
                            + load_report.summary())
    summary = f"{spec}: {len(items)} used of {kept} kept from {rows_read} rows read"
    if load_report.n_problems:
        summary += f" ({load_report.n_problems} skipped: {', '.join(sorted(load_report.dropped))})"
    info = {"spec": spec, "rows_read": rows_read, "kept": kept, "used": len(items), "summary": summary,
            "max_rows": max_rows}
    return items, info


def _default_spec(default: tuple[str, str]) -> str | None:
    path = shared_file(default[1])
    return f"{default[0]}:{path}" if path else None


def held_out_conversations(spec: str | None, max_rows: int | None):
    """(conversations, info) for perplexity and BLEU; without --data the OASST1 validation file."""
    from gpt2chat.data import load_conversations

    if spec is None:
        spec = _default_spec(DEFAULT_CONVERSATIONS)
        if spec is None:
            raise Gpt2ChatError(
                f"no held-out conversations: the default OASST1 validation file (../shared/"
                f"{DEFAULT_CONVERSATIONS[1]}) is not here and --data was not given; pass "
                "--data oasst1:PATH/en-validation.jsonl (or any FORMAT:PATH), or --skip ppl,gen")
    conversations, info = _load("held-out conversations (--data)", spec, load_conversations, max_rows)
    return conversations, info


def held_out_pairs(spec: str | None, max_rows: int | None):
    """(pairs, info) for preference accuracy; (None, info) when the default file is absent."""
    from gpt2chat.data import load_preferences

    if spec is None:
        spec = _default_spec(DEFAULT_PAIRS)
        if spec is None:
            return None, {"summary": f"preference accuracy skipped: no --pref-data and the default "
                                     f"../shared/{DEFAULT_PAIRS[1]} is not here"}
    return _load("held-out preference pairs (--pref-data)", spec, load_preferences, max_rows)


def side_by_side_prompts(prompts) -> list[str]:
    """Seed 000's three prompts by default; a file of one prompt per line (or a JSON list); or a list."""
    if prompts is None:
        return list(DEFAULT_PROMPTS)
    if isinstance(prompts, list | tuple):
        items = [str(p).strip() for p in prompts]
    else:
        path = Path(prompts).expanduser()
        if not path.is_file():
            raise Gpt2ChatError(f"--prompts file not found: {prompts}")
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".json":
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as exc:
                raise Gpt2ChatError(f"--prompts {prompts}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
            if not isinstance(loaded, list) or not all(isinstance(p, str) for p in loaded):
                raise Gpt2ChatError(f"--prompts {prompts}: expected a JSON list of strings")
            items = [p.strip() for p in loaded]
        else:
            items = [line.strip() for line in text.splitlines()]
    items = [p for p in items if p]
    if not items:
        raise Gpt2ChatError(f"--prompts {prompts}: no prompt in it")
    return items


def find_metrics_log(model: str) -> Path | None:
    """The trainer's metrics.jsonl in the checkpoint folder or its parent (the run folder)."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return None
    for folder in (path, path.parent):
        if (folder / "metrics.jsonl").is_file():
            return folder / "metrics.jsonl"
    return None


def harness_tasks(text: str | None):
    """Parsed --harness tasks, after checking that lm_eval is importable (fail before any slow work)."""
    if not text:
        return []
    from gpt2chat.evaluate.harness import parse_tasks, require_harness

    tasks = parse_tasks(text)
    require_harness()
    return tasks


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
