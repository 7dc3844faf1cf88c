"""The report card: `report.json` (every figure), `report.md` (tables) and PNG plots.

Takes the plain dict `evaluate_models` builds and only formats it: no model, no data. Every table is
followed by a "measured on" line (dataset, rows, template, device, dtype, threads) taken from the dict.
Loss curves come from the trainer's `metrics.jsonl` (JSON lines with `step` and `loss` / `eval_loss`, or
`loss` with `split` = train / val).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["write_report", "render_markdown", "read_loss_log", "plot_perplexity", "plot_loss_curves", "human"]


def human(value, digits: int = 3) -> str:
    """12_345_678 -> '12.3M'; None -> '—'."""
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    for threshold, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.{digits}g}{suffix}"
    return f"{value:.{digits}g}"


def _num(value, fmt: str = ".3f") -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, fmt)


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def read_loss_log(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """{'train': [(step, loss)], 'eval': [(step, loss)]} from a metrics.jsonl; bad lines are skipped."""
    curves: dict[str, list[tuple[float, float]]] = {"train": [], "eval": []}
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int | float):
            continue
        step = record["step"]
        if isinstance(record.get("eval_loss"), int | float):
            curves["eval"].append((step, float(record["eval_loss"])))
        if isinstance(record.get("loss"), int | float):
            split = str(record.get("split", "train")).lower()
            curves["eval" if split in ("val", "eval", "validation") else "train"].append((step, float(record["loss"])))
    return curves


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_perplexity(report: dict, path: Path) -> Path | None:
    """Grouped bars: assistant-token and plain-text perplexity per checkpoint."""
    labels, groups = [], {"assistant tokens (template)": [], "plain text (replies)": []}
    for entry in report["models"]:
        ppl = entry.get("perplexity") or {}
        if not ppl:
            continue
        labels.append(entry["label"])
        groups["assistant tokens (template)"].append((ppl.get("assistant") or {}).get("ppl"))
        groups["plain text (replies)"].append((ppl.get("plain") or {}).get("ppl"))
    if not labels:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(5, 1.6 * len(labels) + 2), 4), dpi=110)
    width = 0.38
    for offset, (name, values) in enumerate(groups.items()):
        xs = [i + (offset - 0.5) * width for i in range(len(labels))]
        heights = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
        bars = axis.bar(xs, heights, width, label=name)
        axis.bar_label(bars, labels=[human(v) for v in values], fontsize=7)
    axis.set_xticks(range(len(labels)), labels, rotation=15)
    axis.set_ylabel("perplexity (lower is better)")
    finite = [v for values in groups.values() for v in values if v is not None and math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 30:  # checkpoints orders of magnitude apart: log scale
        axis.set_yscale("log")
    else:
        axis.set_ylim(bottom=0)
    info = report["datasets"].get("conversations", {})
    env = report["environment"]
    axis.set_title(f"{info.get('spec', 'perplexity')}\n{info.get('used', '?')} conversations, {env['device']}, "
                   f"{env['dtype']}", fontsize=7)
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_loss_curves(logs: dict[str, str], path: Path) -> Path | None:
    """Training (lines) and evaluation (markers) loss against step, one colour per training log."""
    curves = {label: read_loss_log(log) for label, log in logs.items()}
    curves = {label: c for label, c in curves.items() if c["train"] or c["eval"]}
    if not curves:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    for index, (label, curve) in enumerate(curves.items()):
        colour = f"C{index % 10}"
        if curve["train"]:
            axis.plot(*zip(*curve["train"], strict=True), color=colour, linewidth=1.1, label=f"{label} train")
        if curve["eval"]:
            axis.plot(*zip(*curve["eval"], strict=True), "o--", color=colour, label=f"{label} eval")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    axis.set_title("loss curves from metrics.jsonl", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _section_perplexity(report: dict) -> list[str]:
    rows = []
    for entry in report["models"]:
        ppl = entry.get("perplexity")
        if not ppl:
            continue
        a, r, p = ppl["assistant"], ppl["rendered"], ppl["plain"]
        rows.append([entry["label"], entry["template"], _num(a["ppl"]), a["tokens"], _num(r["ppl"]),
                     _num(p["ppl"]), p["tokens"]])
    if not rows:
        return []
    lines = ["## Perplexity (lower is better)", ""]
    lines += _table(["model", "template", "PPL assistant tokens", "tokens", "PPL whole rendering",
                     "PPL plain replies", "tokens"], rows)
    lines += [f"- {e['label']}: {e['perplexity']['measured_on']}" for e in report["models"] if e.get("perplexity")]
    return lines + [""]


def _section_preference(report: dict) -> list[str]:
    rows = []
    for entry in report["models"]:
        pref = entry.get("preference")
        if pref:
            rows.append([entry["label"], pref["mode"], _pct(pref["accuracy"]), _num(pref["mean_margin"], ".4f"),
                         _num(pref["mean_chosen_reward"], ".4f"), _num(pref["mean_rejected_reward"], ".4f"),
                         pref["pairs"]])
    if not rows:
        return []
    lines = ["## Preference accuracy", ""]
    lines += _table(["model", "reward", "accuracy", "mean margin", "chosen reward", "rejected reward", "pairs"],
                    rows)
    lines += [f"- {e['label']}: {e['preference']['measured_on']}" for e in report["models"] if e.get("preference")]
    return lines + [""]


def _section_generation(report: dict) -> list[str]:
    rows = []
    for entry in report["models"]:
        gen = entry.get("generation")
        if gen:
            rows.append([entry["label"], _num(gen["bleu"], ".2f"), _num(gen["reward_mean"], ".1f"),
                         _num(gen["penalty_mean"], ".2f"), _num(gen["distinct_1"]), _num(gen["distinct_2"]),
                         _num(gen["mean_reply_words"], ".1f"), gen["replies"]])
    if not rows:
        return []
    lines = ["## Generated replies against the references", ""]
    lines += _table(["model", "BLEU", "reward (ref. words produced)", "penalty (repeated words)", "distinct-1",
                     "distinct-2", "mean reply words", "replies"], rows)
    lines += [f"- {e['label']}: {e['generation']['measured_on']}" for e in report["models"] if e.get("generation")]
    return lines + [""]


def _section_compute(report: dict) -> list[str]:
    rows = []
    for entry in report["models"]:
        flops, speed = entry.get("flops") or {}, entry.get("speed") or {}
        rows.append([entry["label"], human(entry.get("parameters")), human(flops.get("forward_per_token")),
                     human(flops.get("training_per_token")), _num(speed.get("prefill_tokens_per_s"), ".1f"),
                     _num(speed.get("decode_tokens_per_s"), ".1f"), _pct(speed.get("prefill_mfu")),
                     _pct(speed.get("decode_mbu"))])
    lines = ["## Size, compute and speed", ""]
    lines += _table(["model", "params", "FLOPs/token fwd", "FLOPs/token train (3x)", "prefill tok/s",
                     "decode tok/s", "prefill MFU", "decode MBU"], rows)
    context = next((e["flops"]["context"] for e in report["models"] if e.get("flops")), None)
    lines.append(f"- FLOPs: analytic matmul count at a context of {context} tokens (see `gpt2chat.evaluate.flops`).")
    for entry in report["models"]:
        if entry.get("speed"):
            lines.append(f"- {entry['label']}: {entry['speed']['measured_on']}")
    peaks = report.get("peaks")
    if peaks:
        lines.append(f"- Peaks measured on this machine: matmul {human(peaks['matmul_flops_per_s'])}FLOP/s "
                     f"({peaks['matmul_size']}x{peaks['matmul_size']} {peaks['dtype']}), copy "
                     f"{human(peaks['copy_bytes_per_s'])}B/s (read+write of {human(peaks['copy_bytes'])}B), "
                     f"{peaks['device']}, {peaks['threads']} threads; median of {peaks['repeats']}.")
    return lines + [""]


def _section_harness(report: dict) -> list[str]:
    rows = []
    for entry in report["models"]:
        for row in entry.get("harness") or []:
            value = _pct(row["value"]) if row["value"] is not None else row["status"]
            rows.append([entry["label"], row["alias"], row["metric"] or "—", value, row.get("message") or ""])
        if entry.get("harness_average") is not None and len(entry["harness"]) > 1:
            rows.append([entry["label"], "average", "", _pct(entry["harness_average"]), ""])
    if not rows:
        return []
    return ["## lm-evaluation-harness", ""] + _table(["model", "task", "metric", "score", "note"], rows)


def _section_side_by_side(report: dict) -> list[str]:
    side = report.get("side_by_side")
    if not side:
        return []
    lines = ["## Side-by-side replies", "", f"_{side['measured_on']}_", ""]
    for item in side["items"]:
        lines += [f"**Prompt:** {_cell(item['prompt'])}", ""]
        lines += _table(["model", "reply"], [[label, reply] for label, reply in item["replies"].items()])
    return lines


def render_markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["# gpt2chat evaluation report", "",
             f"gpt2chat {report['gpt2chat_version']}, seed {report['seed']}, device {env['device']} "
             f"({env.get('device_name') or 'unknown'}), dtype {env['dtype']}, {env['threads']} threads, "
             f"torch {env['torch']}.", ""]
    summary = [[e["label"], human(e.get("parameters")), human((e.get("flops") or {}).get("forward_per_token")),
                _num((e.get("speed") or {}).get("decode_tokens_per_s"), ".1f"),
                _num(((e.get("perplexity") or {}).get("assistant") or {}).get("ppl"))] for e in report["models"]]
    lines += ["## Summary", ""]
    lines += _table(["model", "params", "FLOPs/token", "tokens/s (decode)", "PPL ↓"], summary)
    conversations = report["datasets"].get("conversations", {}).get("spec", "—")
    context = next((e["flops"]["context"] for e in report["models"] if e.get("flops")), "—")
    lines.append(f"- PPL = perplexity of the assistant tokens of {conversations}, each checkpoint through its own "
                 f"template; tokens/s = batch-1 greedy decode; FLOPs/token = analytic forward at a context of "
                 f"{context}; {env['device']}, {env['dtype']}, {env['threads']} threads.")
    for name, info in report["datasets"].items():
        lines.append(f"- {name}: {info['summary']}")
    lines.append("")
    for section in (_section_perplexity, _section_preference, _section_generation, _section_compute,
                    _section_harness, _section_side_by_side):
        lines += section(report)
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"![{name}]({file})" for name, file in report["plots"].items()] + [""]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in report["notes"]] + [""]
    return "\n".join(lines)


def write_report(report: dict, out_dir: str | Path, loss_logs: dict[str, str] | None = None) -> dict:
    """Plots, report.md and report.json in `out_dir`; returns the report with `plots` filled in."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {}
    if plot_perplexity(report, out_dir / "perplexity.png"):
        plots["perplexity"] = "perplexity.png"
    if loss_logs and plot_loss_curves(loss_logs, out_dir / "loss_curves.png"):
        plots["loss curves"] = "loss_curves.png"
    report["plots"] = plots
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n",
                                         encoding="utf-8")
    (out_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")
    return report
