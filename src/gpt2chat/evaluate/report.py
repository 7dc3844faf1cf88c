"""The report card: `report.json` (every figure), `report.md` (tables) and PNG plots.

Takes the plain dict `evaluate_models` builds and only formats it: no model, no data. Every table is
followed by a "measured on" line (dataset, rows, template, device, dtype, threads) taken from the dict.
Loss curves come from each training stage's `metrics.jsonl` (JSON lines with `step` and `loss` /
`eval_loss`, or `loss` with `split` = train / val), labelled by the stage (`sft`, `sft+orpo`) they belong
to. Evaluation rows found in a model's training data are a warning at the top of the summary. Every file is
written through the one atomic writer (`gpt2chat.atomic_files`): a killed run leaves the old report or the new one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from gpt2chat.atomic_files import write_atomic, write_json_atomic, write_text_atomic

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


def plot_perplexity(report: dict, path: Path) -> list[str] | None:
    """Grouped bars: assistant-token and plain-text perplexity per checkpoint (labelled by stage).

    Returns the bar groups' labels as read back from the figure."""
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
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png"))
    drawn = [tick.get_text() for tick in axis.get_xticklabels()]
    plt.close(figure)
    return drawn


def plot_loss_curves(logs: dict[str, str], path: Path) -> list[str] | None:
    """Training (lines) and evaluation (markers) loss against step, one colour per training stage.

    `logs` maps a stage label (`sft`, `sft+orpo`) to its metrics.jsonl. Returns the legend's labels as
    read back from the figure."""
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
    axis.set_xlabel("step (of each stage)")
    axis.set_ylabel("loss")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    axis.set_title("loss curves from each stage's metrics.jsonl", fontsize=9)
    figure.tight_layout()
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png"))
    drawn = [text.get_text() for text in axis.get_legend().get_texts()]
    plt.close(figure)
    return drawn


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


BUSY = "busy machine (see below)"  # a figure over its bound or too spread to be a result (evaluate/speed.py)


def _rate(speed: dict, key: str) -> str:
    """'90.2 (88.1-91.0)': the median and the range of the repeats; BUSY when it cannot be a result."""
    value, spread = speed.get(key), speed.get(f"{key}_range")
    if value is None:
        return "—"
    if key in (speed.get("busy_machine") or {}):
        return BUSY
    return f"{value:.1f} ({spread[0]:.1f}-{spread[1]:.1f})" if spread else f"{value:.1f}"


def _speed_pct(speed: dict, key: str) -> str:
    return BUSY if key in (speed.get("busy_machine") or {}) else _pct(speed.get(key))


FIGURE_NAMES = {"prefill_tokens_per_s": "prefill tok/s", "prefill_mfu": "prefill MFU", "prefill_mbu": "prefill MBU",
                "decode_tokens_per_s": "decode tok/s", "decode_mfu": "decode MFU", "decode_mbu": "decode MBU"}


def _busy_lines(report: dict) -> list[str]:
    lines = []
    for entry in report["models"]:
        reasons = (entry.get("speed") or {}).get("busy_machine") or {}
        for text in dict.fromkeys(reasons.values()):
            figures = ", ".join(FIGURE_NAMES.get(key, key) for key, why in reasons.items() if why == text)
            lines.append(f"- {entry['label']}: {figures}: not a result, measured on a busy machine: {text}. "
                         "Re-run on a quiet machine.")
    return lines


def _peak_line(peaks: dict) -> str:
    runs = peaks.get("measurements") or [peaks]
    when = ["start", "end"] if len(runs) == 2 else [f"#{i}" for i in range(1, len(runs) + 1)]
    each = ", ".join(f"{name}: {human(m['matmul_flops_per_s'])}FLOP/s, {human(m['read_bytes_per_s'])}B/s"
                     for name, m in zip(when, runs, strict=True))
    return (f"- Peaks measured on this machine, best of {peaks['repeats']} at the start and at the end of the run "
            f"({each}); MFU / MBU divide by the best: matmul {human(peaks['matmul_flops_per_s'])}FLOP/s "
            f"({peaks['matmul_size']}x{peaks['matmul_size']} {peaks['dtype']}), read bandwidth "
            f"{human(peaks['read_bytes_per_s'])}B/s (float32 sum() over {human(peaks['read_bytes'])}B, read "
            f"only); {peaks['device']}, {peaks['threads']} threads.")


def _section_compute(report: dict) -> list[str]:
    rows = []
    for entry in report["models"]:
        flops, speed = entry.get("flops") or {}, entry.get("speed") or {}
        rows.append([entry["label"], human(entry.get("parameters")), human(flops.get("forward_per_token")),
                     human(flops.get("training_per_token")), _rate(speed, "prefill_tokens_per_s"),
                     _rate(speed, "decode_tokens_per_s"), _speed_pct(speed, "prefill_mfu"),
                     _speed_pct(speed, "decode_mbu")])
    lines = ["## Size, compute and speed", ""]
    lines += _table(["model", "params", "FLOPs/token fwd", "FLOPs/token train (3x)", "prefill tok/s (range)",
                     "decode tok/s (range)", "prefill MFU", "decode MBU"], rows)
    context = next((e["flops"]["context"] for e in report["models"] if e.get("flops")), None)
    lines.append(f"- FLOPs: analytic matmul count at a context of {context} tokens (see `gpt2chat.evaluate.flops`).")
    lines += _busy_lines(report)
    for entry in report["models"]:
        if entry.get("speed"):
            lines.append(f"- {entry['label']}: {entry['speed']['measured_on']}")
    if report.get("peaks"):
        lines.append(_peak_line(report["peaks"]))
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
    ends = {e["label"]: ", ".join(e.get("end_of_turn") or []) for e in report["models"]}
    if any(ends.values()):
        lines += ["End-of-turn tokens: " + "; ".join(f"{label} `{end}`" for label, end in ends.items()), ""]
    for item in side["items"]:
        origin = item.get("source", "")
        if item.get("earlier_messages"):
            origin += f", after {item['earlier_messages']} earlier messages"
        lines += [f"**Prompt** ({origin}): {_cell(item['prompt'])}", ""]
        rows = [[label, reply] for label, reply in (item.get("replies") or {}).items()]
        if item.get("reference") is not None:
            rows.append(["(held-out reference)", item["reference"]])
        lines += _table(["model", "reply"], rows)
    return lines


def _dataset_lines(report: dict) -> list[str]:
    lines = []
    for name, info in report["datasets"].items():
        line = f"- {name}: {info['summary']}"
        if info.get("overlap_statement"):
            line += f"; {info['overlap_statement']}"
        lines.append(line)
    return lines


def render_markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["# gpt2chat evaluation report", "",
             f"gpt2chat {report['gpt2chat_version']}, seed {report['seed']}, device {env['device']} "
             f"({env.get('device_name') or 'unknown'}), dtype {env['dtype']}, {env['threads']} threads, "
             f"torch {env['torch']}.", ""]
    summary = [[e["label"], human(e.get("parameters")), human((e.get("flops") or {}).get("forward_per_token")),
                _rate(e.get("speed") or {}, "decode_tokens_per_s"),
                _num(((e.get("perplexity") or {}).get("assistant") or {}).get("ppl"))] for e in report["models"]]
    lines += ["## Summary", ""]
    lines += _table(["model", "params", "FLOPs/token", "tokens/s (decode, range)", "PPL ↓"], summary)
    for warning in report.get("warnings") or []:
        lines.append(f"> **Warning:** {warning}")
    if report.get("warnings"):
        lines.append("")
    conversations = report["datasets"].get("conversations", {}).get("spec", "—")
    context = next((e["flops"]["context"] for e in report["models"] if e.get("flops")), "—")
    lines.append(f"- PPL = perplexity of the assistant tokens of {conversations}, each checkpoint through its own "
                 f"template; tokens/s = batch-1 greedy decode, median and range of the repeats; FLOPs/token = "
                 f"analytic forward at a context of {context}; {env['device']}, {env['dtype']}, "
                 f"{env['threads']} threads.")
    lines += _dataset_lines(report)
    lines.append("")
    for section in (_section_perplexity, _section_preference, _section_generation, _section_compute,
                    _section_harness, _section_side_by_side):
        lines += section(report)
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"![{name}]({plot['file']})" for name, plot in report["plots"].items()] + [""]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in report["notes"]] + [""]
    return "\n".join(lines)


def write_report(report: dict, out_dir: str | Path) -> dict:
    """Plots, report.md and report.json in `out_dir`; returns the report with `plots` filled in.

    `report["loss_curves"]` maps stage labels to metrics.jsonl files; `plots` records each PNG with the
    labels read back from its figure."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {}
    drawn = plot_perplexity(report, out_dir / "perplexity.png")
    if drawn:
        plots["perplexity"] = {"file": "perplexity.png", "series": drawn}
    drawn = plot_loss_curves(report["loss_curves"], out_dir / "loss_curves.png") if report.get("loss_curves") else None
    if drawn:
        plots["loss curves"] = {"file": "loss_curves.png", "series": drawn}
    report["plots"] = plots
    write_json_atomic(out_dir / "report.json", report, ensure_ascii=False, default=str)
    write_text_atomic(out_dir / "report.md", render_markdown(report))
    return report
