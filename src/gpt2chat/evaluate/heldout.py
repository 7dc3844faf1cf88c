"""Held-out data saved with a training run, and the overlap of evaluation rows with a model's training rows.

A training stage writes `OUT/<stage>/heldout/`: `split.json` (the stage, its data, seed and validation
fraction, the model it started from, and the content hashes of every training row) and the validation
rows it set aside, `conversations.jsonl` (messages format) or `pairs.jsonl` (UltraFeedback's chosen /
rejected message lists). `gpt2chat eval` reads them back: the run's own held-out rows are the default
evaluation data, and every evaluation row is checked against the training rows of each model's whole
lineage (a `sft+orpo` model trained on the rows of both stages) before anything is scored.

A content hash (`gpt2chat.data.mixing.content_hash`) is one conversation ending in an assistant reply,
its messages normalised the way de-duplication does. The data builders record the hashes of the training
rows: every prefix of a training conversation that ends in an assistant reply (each was a target, or
context the model read), prompt + chosen and prompt + rejected of a training pair. An evaluation conversation overlaps when its whole
text is among them; an evaluation pair when either of its two conversations is.

Knows nothing about models, scoring or reports.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gpt2chat.data.mixing import content_hash, pair_hashes
from gpt2chat.errors import Gpt2ChatError

__all__ = [
    "SPLIT_DIR", "SPLIT_FILE", "HELDOUT", "write_split", "read_split", "is_stage_input", "Lineage", "lineage_of",
    "row_hashes", "overlapping", "heldout_spec",
]

SPLIT_DIR = "heldout"
SPLIT_FILE = "split.json"
HELDOUT = "heldout"  # the `--data` / `--pref-data` value that names the run's own held-out rows
_ROW_FILES = {"conversations": ("conversations.jsonl", "messages"), "pairs": ("pairs.jsonl", "ultrafeedback")}


def _atomic_text(path: Path, text: str) -> None:
    from gpt2chat.atomic_files import write_text_atomic

    write_text_atomic(path, text)


def write_split(stage_dir: str | Path, *, stage: str, kind: str, rows: Iterable[dict], hashes: Iterable[str],
                base_model: str, data: Sequence[str], seed: int, val_fraction: float) -> Path:
    """Write `stage_dir/heldout/`. `rows` and `hashes` are a data builder's `stats["split"]`: validation rows
    as dicts (`messages` for kind "conversations"; `prompt`, `chosen`, `rejected` for "pairs", each with its
    `source`) and the training rows' content hashes. Returns the split folder."""
    if kind not in _ROW_FILES:
        raise ValueError(f"kind must be one of {sorted(_ROW_FILES)}")
    folder = Path(stage_dir) / SPLIT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    name, row_format = _ROW_FILES[kind]
    lines = []
    for row in rows:
        if kind == "conversations":
            record = {"messages": row["messages"], "source": row["source"]}
        else:
            prompt = list(row["prompt"])
            record = {"chosen": [*prompt, {"role": "assistant", "content": row["chosen"]}],
                      "rejected": [*prompt, {"role": "assistant", "content": row["rejected"]}],
                      "source": row["source"]}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    _atomic_text(folder / name, "".join(lines))
    base = Path(base_model).expanduser()
    manifest = {
        "stage": stage, "kind": kind, "rows": name, "row_format": row_format, "count": len(lines),
        "data": list(data), "seed": seed, "val_fraction": val_fraction,
        "base_model": str(base_model),
        "base_model_resolved": str(base.resolve()) if base.exists() else None,
        "hash": "sha256 of the normalised messages, first 64 bits (gpt2chat.data.mixing.content_hash)",
        "training_hashes": sorted(set(hashes)),
    }
    _atomic_text(folder / SPLIT_FILE, json.dumps(manifest, ensure_ascii=False) + "\n")
    return folder


def read_split(stage_dir: str | Path) -> dict | None:
    """The manifest of `stage_dir/heldout/split.json` with `folder` and `rows_path` added, or None."""
    folder = Path(stage_dir) / SPLIT_DIR
    path = folder / SPLIT_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        rows_path = folder / manifest["rows"]
        manifest["training_hashes"] = set(manifest["training_hashes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Gpt2ChatError(f"{path}: unreadable held-out split record ({type(exc).__name__}: {exc}); "
                            "delete the folder or retrain the stage") from exc
    manifest["folder"], manifest["rows_path"], manifest["stage_dir"] = folder, rows_path, Path(stage_dir)
    return manifest


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _stage_of(model: Path) -> dict | None:
    """The split record of the stage that produced `model` (final/, checkpoints/step-N/, adapter/), if any.

    A stage folder also holds its input (`init/` of a random start): a model that is the stage's base is
    not its product.
    """
    for folder in (model, model.parent, model.parent.parent):
        manifest = read_split(folder)
        if manifest is None:
            continue
        base = _base_path(manifest)
        if base is not None and _same(base, model):
            return None
        return manifest
    return None


def is_stage_input(model: str | Path) -> bool:
    """Whether `model` is the starting point of a recorded stage beside it (OUT/<stage>/init/)."""
    path = Path(model).expanduser()
    for folder in (path.parent, path.parent.parent):
        manifest = read_split(folder)
        base = _base_path(manifest) if manifest else None
        if base is not None and _same(base, path):
            return True
    return False


def _base_path(manifest: dict) -> Path | None:
    given = Path(manifest["base_model"]).expanduser()
    for candidate in (given, manifest["stage_dir"] / given, Path(manifest.get("base_model_resolved") or "")):
        if str(candidate) and candidate.exists():
            return candidate
    return None


@dataclass
class Lineage:
    """The training stages behind one model, oldest first, with the union of their training hashes."""

    stages: list[dict] = field(default_factory=list)
    hashes: set[str] = field(default_factory=set)

    @property
    def label(self) -> str | None:
        """`sft`, `sft+orpo`, ... or None when the model has no recorded training."""
        return "+".join(m["stage"] for m in self.stages) or None

    @property
    def known(self) -> bool:
        return bool(self.stages)

    def split(self, kind: str) -> dict | None:
        """The newest stage's held-out split of `kind` ("conversations" / "pairs")."""
        return next((m for m in reversed(self.stages) if m["kind"] == kind), None)


def lineage_of(model: str | Path) -> Lineage:
    """Follow a checkpoint back through the `base_model` of each stage's split record."""
    lineage = Lineage()
    path = Path(model).expanduser()
    seen: set[str] = set()
    while path.exists():
        manifest = _stage_of(path)
        if manifest is None or str(manifest["folder"].resolve()) in seen:
            break
        seen.add(str(manifest["folder"].resolve()))
        lineage.stages.insert(0, manifest)
        lineage.hashes |= manifest["training_hashes"]
        base = _base_path(manifest)
        if base is None:
            break
        path = base
    return lineage


def heldout_spec(manifest: dict) -> str:
    """The data spec (`FORMAT:PATH`) of a split's rows."""
    return f"{manifest['row_format']}:{manifest['rows_path']}"


def row_hashes(row, kind: str) -> tuple[str, ...]:
    """The content hashes of one evaluation row: a Conversation's, or a PreferencePair's two."""
    if kind == "conversations":
        return (content_hash(row.messages),)
    return tuple(pair_hashes(row.prompt, row.chosen, row.rejected))


def overlapping(rows: Sequence, kind: str, hashes: set[str]) -> list[int]:
    """Indices of evaluation rows (Conversations or PreferencePairs) whose content is in `hashes`."""
    return [index for index, row in enumerate(rows) if any(h in hashes for h in row_hashes(row, kind))]
