"""Training metrics: one JSON object per line in `metrics.jsonl`, and loss curves as PNG.

On resume the log is cut back to the checkpoint's step, so the file always reads as one uninterrupted
run; that rewrite and the PNG go through the one atomic writer (`gpt2chat.atomic_files`), so a kill leaves the
old file or the new one. Records are appended a line at a time; a last line torn by a kill is not a
record and is dropped when the log is read or cut back. This module knows numbers and files only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from gpt2chat.atomic_files import write_atomic, write_text_atomic


class MetricsLog:
    """Append-only JSON-lines log (written by rank 0 only)."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps after `step` (a resumed run rewrites them)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [json.dumps(r) for r in read_metrics(self.path) if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def reset(self) -> None:
        if self.enabled and self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a last line torn by a kill (not JSON) is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):  # only the last line can be torn by a kill mid-append
                raise ValueError(f"{path}: line {number} is not JSON: {line[:80]!r}") from None
    return records


def plot_losses(metrics_path: str | Path, png_path: str | Path, title: str = "training") -> Path | None:
    """Train loss (and validation loss when present) against step; None when there is nothing to plot."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train" and r.get("loss") is not None]
    val = [(r["step"], r["loss"]) for r in records if r.get("split") == "val" and r.get("loss") is not None]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        axis.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if val:
        axis.plot(*zip(*val, strict=True), "o-", label="validation loss", linewidth=1.5)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    png_path = write_atomic(png_path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
    return png_path
