"""`evaluate_models`: every checkpoint through every measurement, then the report card.

This is the recipe that wires the components. Before any model loads: the evaluation data is chosen
(the run's own held-out split by default, see `heldout.py`) and checked against the training rows of
every model's lineage; overlap is a warning in the summary, or with `strict` an error. The machine's
peaks are measured (start of the run). Each checkpoint is then loaded in turn and scored (perplexity,
preference accuracy, generated replies, side-by-side replies, optional harness); speed is timed for all
checkpoints together, round-robin; the peaks are measured again (end of the run) and MFU / MBU divide
by the best of the two. `report.write_report` writes report.md, report.json and the plots.
`gpt2chat eval` is a thin argparse front over this function.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gpt2chat.device import device_and_dtype
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.evaluate import heldout, inputs

__all__ = ["EvalConfig", "evaluate_models", "SECTIONS"]

SECTIONS = ("ppl", "pref", "gen", "speed", "side")


@dataclass
class EvalConfig:
    """Everything `gpt2chat eval` can set; `evaluate_models(..., **fields)` overrides these."""

    ref: str | None = None  # reference checkpoint for DPO-style implicit rewards
    # held-out conversations / preference pairs: a FORMAT:PATH spec, "heldout" (the run's own split), or
    # None: the run's split when the models come from a run that saved one, else the files in ../shared
    data: str | None = None
    pref_data: str | None = None
    strict: bool = False  # evaluation rows that are training rows: an error instead of a warning
    prompts: str | list[str] | None = None  # side-by-side prompts: a file (one per line / JSON list) or list
    heldout_prompts: int = 3  # side-by-side also answers the first N held-out conversations
    max_rows: int | None = None  # first N conversations and first N pairs
    gen_rows: int = 16  # conversations whose last reply is generated for BLEU / reward / penalty
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy; > 0 = sampling seeded by `seed`
    top_k: int = 0
    top_p: float = 1.0
    harness: str | None = None  # lm-evaluation-harness tasks: names, local YAML files, "leaderboard"
    harness_limit: int | None = None
    seed: int = 0
    device: str | None = None  # default: cuda when present, else cpu
    dtype: str | None = None  # default: bfloat16 on cuda, float32 on cpu
    quantize: str | None = None  # speed rows with fp16 / int8 weights (gpt2chat.quantize)
    threads: int | None = None
    batch_tokens: int = 2048  # tokens per scoring forward
    batch_size: int = 8  # prompts per generation batch
    beta: float = 0.1  # DPO implicit-reward scale
    max_reply_tokens: int = 256  # preference replies are cut to this many tokens (same for both sides)
    flops_context: int | None = None  # context of the FLOPs/token figure (default n_positions)
    speed_prompt_tokens: int = 128
    speed_decode_steps: int = 128  # >= 64
    speed_repeats: int = 5  # >= 3; the row is their median, the range is shown
    peak_matmul_size: int | None = None
    peak_read_bytes: int | None = None
    peak_repeats: int = 5  # best of N, at the start and at the end of the run
    skip: tuple[str, ...] = ()  # any of SECTIONS
    labels: list[str] | None = None
    progress: bool = True
    notes: list[str] = field(default_factory=list)

    def check(self) -> None:
        from gpt2chat.evaluate.speed import MIN_DECODE_STEPS, MIN_REPEATS

        unknown = sorted(set(self.skip) - set(SECTIONS))
        if unknown:
            raise Gpt2ChatError(f"--skip: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
        minimums = {"gen_rows": 1, "max_new_tokens": 1, "batch_tokens": 1, "batch_size": 1, "max_reply_tokens": 1,
                    "speed_prompt_tokens": 1, "speed_decode_steps": MIN_DECODE_STEPS,
                    "speed_repeats": MIN_REPEATS, "peak_repeats": 1, "heldout_prompts": 0}
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                why = " (a speed row needs that many to be trusted)" if name.startswith("speed_") else ""
                raise Gpt2ChatError(f"{name}={value!r}: must be an integer >= {minimum}{why}")
        if self.max_rows is not None and (not isinstance(self.max_rows, int) or self.max_rows < 1):
            raise Gpt2ChatError(f"max_rows={self.max_rows!r}: must be an integer >= 1")
        if self.beta <= 0:
            raise Gpt2ChatError(f"beta={self.beta!r}: must be > 0")
        if self.temperature < 0:
            raise Gpt2ChatError(f"temperature={self.temperature!r}: must be >= 0 (0 = greedy)")
        from gpt2chat.quantize import QUANTIZE_MODES

        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise Gpt2ChatError(f"quantize={self.quantize!r}: choose from {', '.join(QUANTIZE_MODES)}")

    def decoding(self) -> str:
        """The sampling settings, as the report names them."""
        if self.temperature == 0:
            return "greedy (temperature 0)"
        return (f"sampling: temperature {self.temperature}, top_k {self.top_k or 'off'}, top_p {self.top_p}, "
                f"seed {self.seed}")


def _environment(device, dtype) -> dict:
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": str(device), "device_name": name, "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count()}


def _path_labels(models: list[str]) -> list[str]:
    parts = [Path(m).parts or (m,) for m in models]
    names = [p[-1] for p in parts]
    if len(set(names)) < len(names) or any(n in ("final", "latest") for n in names):
        names = ["/".join(p[-2:]) for p in parts]
    return names


def _labels(models: list[str], labels: list[str] | None, lineages: list[heldout.Lineage]) -> list[str]:
    """Given labels; else the stages a model was trained through (`sft+orpo`), else its path."""
    if labels:
        if len(labels) != len(models):
            raise Gpt2ChatError(f"{len(labels)} labels for {len(models)} models")
        return list(labels)
    by_path = _path_labels(models)
    names = [lineage.label or path for lineage, path in zip(lineages, by_path, strict=True)]
    names = [f"{name} ({path})" if names.count(name) > 1 and name != path else name
             for name, path in zip(names, by_path, strict=True)]
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


KINDS = {"conversations": ("--data", "conversations", inputs.held_out_conversations),
         "pairs": ("--pref-data", "preference pairs", inputs.held_out_pairs)}


def _from_run_splits(kind: str, splits: list[dict], max_rows: int | None, lineages, labels) -> tuple[list, dict]:
    """The rows the runs held out, minus any that a model's training data contains."""
    _, noun, loader = KINDS[kind]
    rows, read, seen = [], 0, set()
    for split in splits:
        items, info = loader(heldout.heldout_spec(split), None)
        read += info["rows_read"]
        for item in items:
            key = heldout.row_hashes(item, kind)
            if key not in seen:
                seen.add(key)
                rows.append(item)
    kept = len(rows)
    removed: dict[str, int] = {}
    for lineage, label in zip(lineages, labels, strict=True):
        hits = set(heldout.overlapping(rows, kind, lineage.hashes))
        if hits:
            removed[label] = len(hits)
            rows = [row for index, row in enumerate(rows) if index not in hits]
    if max_rows is not None:
        rows = rows[:max_rows]
    stages = ", ".join(f"{s['stage']} ({s['rows_path']})" for s in splits)
    if not rows:
        raise Gpt2ChatError(f"the held-out {noun} of {stages} are all in the training data of the models "
                            f"evaluated; give held-out files with {KINDS[kind][0]}")
    summary = f"held-out {noun} of stage {stages}: {len(rows)} used of {kept}"
    if removed:
        summary += " (" + ", ".join(f"{n} removed that {label} trained on" for label, n in removed.items()) + ")"
    info = {"spec": ", ".join(heldout.heldout_spec(s) for s in splits), "origin": "run", "rows_read": read,
            "kept": kept, "used": len(rows), "max_rows": max_rows, "removed": removed, "summary": summary}
    return rows, info


def _evaluation_rows(kind: str, spec: str | None, max_rows: int | None, lineages, labels):
    """(rows, info) of one kind; rows None when the data is optional and absent (preference pairs)."""
    flag, noun, loader = KINDS[kind]
    if spec in (None, heldout.HELDOUT):
        splits, folders = [], set()
        for lineage in lineages:
            split = lineage.split(kind)
            if split is not None and str(split["folder"]) not in folders:
                folders.add(str(split["folder"]))
                splits.append(split)
        if splits:
            return _from_run_splits(kind, splits, max_rows, lineages, labels)
        if spec == heldout.HELDOUT:
            raise Gpt2ChatError(f"{flag} heldout: none of the models comes from a training run that saved held-out "
                                f"{noun} (OUT/<stage>/{heldout.SPLIT_DIR}/{heldout.SPLIT_FILE}); name a file "
                                f"with {flag} FORMAT:PATH")
    rows, info = loader(spec, max_rows)
    if rows is not None:
        info["origin"] = "given" if spec else "default"
    return rows, info


def _overlap(kind: str, rows, info: dict, lineages, labels) -> list[str]:
    """Per-model overlap of the evaluation rows with its training rows, into `info`; the warnings."""
    _, noun, _ = KINDS[kind]
    info["overlap"], warnings, clean, found, unknown = {}, [], [], [], []
    for lineage, label in zip(lineages, labels, strict=True):
        hits = len(heldout.overlapping(rows, kind, lineage.hashes)) if lineage.known else None
        info["overlap"][label] = {"rows": hits, "of": len(rows), "trained_on": lineage.label}
        if hits:
            stages = "" if label == lineage.label else f" (stages {lineage.label})"
            found.append(f"{hits} of {len(rows)} are training rows of {label}{stages}")
            warnings.append(f"{hits} of {len(rows)} evaluation {noun} ({info['spec']}) are training rows of "
                            f"{label}{stages}: its figures on them are not held-out")
        elif hits == 0:
            clean.append(label)
        else:
            unknown.append(label)
    parts = [f"none of the {len(rows)} {noun} is a training row of {', '.join(clean)}"] if clean else []
    parts += found
    if unknown:
        parts.append(f"{', '.join(unknown)}: no record of training rows")
    info["overlap_statement"] = ("checked by content hash against each model's training rows: " + "; ".join(parts)
                                 + ".")
    return warnings


def _side_by_side_prompts(config: EvalConfig, conversations) -> list[dict]:
    from gpt2chat.evaluate.measure import generation_rows

    source = "seed 000" if config.prompts is None else "--prompts"
    items = [{"prompt": p, "messages": [{"role": "user", "content": p}], "source": source}
             for p in inputs.side_by_side_prompts(config.prompts)]
    if conversations and config.heldout_prompts:
        prompts, references = generation_rows(conversations, config.heldout_prompts)
        items += [{"prompt": messages[-1]["content"], "messages": messages, "source": "held-out",
                   "earlier_messages": len(messages) - 1, "reference": reference}
                  for messages, reference in zip(prompts, references, strict=True)]
    return items


def _training_logs(model: str, lineage: heldout.Lineage) -> list[tuple[str, Path]]:
    """(stage label, metrics.jsonl) of each training stage behind `model`, oldest first."""
    if lineage.known:
        logs = []
        for depth, stage in enumerate(lineage.stages, start=1):
            log = stage["stage_dir"] / "metrics.jsonl"
            if log.is_file():
                logs.append(("+".join(s["stage"] for s in lineage.stages[:depth]), log))
        return logs
    if heldout.is_stage_input(model):  # e.g. OUT/sft/init: the stage's log is not this model's
        return []
    log = inputs.find_metrics_log(model)
    return [(log.parent.name, log)] if log else []


def _peaks(config: EvalConfig, device, dtype) -> dict:
    from gpt2chat.evaluate.flops import measure_peaks

    return measure_peaks(device, dtype, matmul_size=config.peak_matmul_size, read_bytes=config.peak_read_bytes,
                         repeats=config.peak_repeats)


def evaluate_models(models, out_dir, *, config: EvalConfig | None = None, **overrides) -> dict:
    """Evaluate checkpoints (folders or hub ids) and write the report card into `out_dir`.

    Returns the report as a dict (what report.json holds). Keyword overrides are `EvalConfig` fields.
    """
    import torch

    models = [str(m) for m in ([models] if isinstance(models, str | os.PathLike) else models)]
    if not models:
        raise Gpt2ChatError("no model to evaluate: give at least one --model")
    config = dataclasses.replace(config or EvalConfig(), **overrides)
    config.check()
    for model in models + ([config.ref] if config.ref else []):
        inputs.check_model_location(model)
    harness_tasks = inputs.harness_tasks(config.harness)

    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _evaluate(models, out_dir, config, harness_tasks)
    finally:
        torch.set_num_threads(threads)


def _evaluate(models: list[str], out_dir, config: EvalConfig, harness_tasks) -> dict:
    from gpt2chat.evaluate import measure
    from gpt2chat.evaluate.report import write_report

    device, dtype = device_and_dtype(config.device, config.dtype)
    inputs.seed_everything(config.seed)
    env = _environment(device, dtype)
    skip = set(config.skip)
    notes = list(config.notes)
    lineages = [heldout.lineage_of(m) for m in models]
    labels = _labels(models, config.labels, lineages)

    datasets: dict[str, dict] = {}
    warnings: list[str] = []
    conversations = pairs = None
    if not {"ppl", "gen"} <= skip:
        conversations, datasets["conversations"] = _evaluation_rows("conversations", config.data, config.max_rows,
                                                                    lineages, labels)
    elif "side" not in skip and config.heldout_prompts:  # only for side-by-side prompts: optional
        try:
            conversations, datasets["conversations"] = _evaluation_rows("conversations", config.data,
                                                                        config.max_rows, lineages, labels)
        except Gpt2ChatError as exc:
            notes.append(f"side-by-side: no held-out prompts ({str(exc).splitlines()[0]})")
    if conversations is not None:
        warnings += _overlap("conversations", conversations, datasets["conversations"], lineages, labels)
    if "pref" not in skip:
        pairs, info = _evaluation_rows("pairs", config.pref_data, config.max_rows, lineages, labels)
        if pairs is None:
            notes.append(info["summary"])
        else:
            datasets["preferences"] = info
            warnings += _overlap("pairs", pairs, info, lineages, labels)
    if warnings and config.strict:
        raise Gpt2ChatError("evaluation data overlaps training data (--strict):\n  " + "\n  ".join(warnings))
    side_items = _side_by_side_prompts(config, conversations) if "side" not in skip else []
    peaks_start = _peaks(config, device, dtype) if "speed" not in skip else None

    reference = measure.Reference(config.ref, device, dtype) if config.ref and pairs else None
    entries, loss_logs = [], {}
    for number, (label, path, lineage) in enumerate(zip(labels, models, lineages, strict=True), start=1):
        if config.progress:
            print(f"[eval] {number}/{len(models)} {label} ({path})", file=sys.stderr, flush=True)
        entry = measure.evaluate_one(path, label, config, device=device, dtype=dtype, env=env,
                                     conversations=conversations, conversation_info=datasets.get("conversations"),
                                     pairs=pairs, pair_info=datasets.get("preferences"), reference=reference,
                                     prompts=[item["messages"] for item in side_items],
                                     harness_tasks=harness_tasks)
        for item, reply in zip(side_items, entry.pop("side_by_side_replies", []), strict=False):
            item.setdefault("replies", {})[label] = reply
        entry["trained_on"] = lineage.label
        logs = _training_logs(path, lineage)
        if logs:
            entry["metrics_log"] = str(logs[-1][1])
        for stage_label, log in logs:
            if str(log) not in loss_logs.values():
                name = stage_label if stage_label not in loss_logs else f"{stage_label} ({log.parent.parent.name})"
                loss_logs[name] = str(log)
        entries.append(entry)
    if reference is not None:
        reference.close()

    peaks = None
    if "speed" not in skip:
        from gpt2chat.evaluate.flops import best_peaks

        if config.progress:
            print(f"[eval] speed: {len(models)} checkpoint(s), round-robin", file=sys.stderr, flush=True)
        speeds = measure.speed_entries(models, config, device=device, dtype=dtype)
        peaks = best_peaks(peaks_start, _peaks(config, device, dtype))
        for entry, (speed, model_config) in zip(entries, speeds, strict=True):
            entry["speed"] = measure.add_utilisation(speed, model_config, peaks)
        notes.append("Speeds and peaks are wall-clock measurements: they vary from run to run (the range shows "
                     "by how much); every other figure is deterministic for a given --seed.")
    if not config.harness:
        notes.append("lm-evaluation-harness not run (add --harness with task names or local task YAML files).")
    report = {
        "gpt2chat_version": inputs.version(),
        "seed": config.seed,
        "environment": env,
        "settings": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("notes", "progress")},
        "datasets": datasets,
        "warnings": warnings,
        "peaks": peaks,
        "models": entries,
        "loss_curves": loss_logs,
        "side_by_side": {
            "decoding": config.decoding(),
            "measured_on": (f"{len(side_items)} prompts, each checkpoint through its own template, "
                            f"{config.decoding()}, at most {config.max_new_tokens} new tokens, each reply cut at "
                            f"its template's end-of-turn token; {env['device']}, {env['dtype']}, "
                            f"{env['threads']} threads"),
            "items": side_items,
        } if side_items else None,
        "notes": notes,
    }
    return write_report(report, out_dir)
