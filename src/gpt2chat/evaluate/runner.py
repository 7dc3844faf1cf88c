"""`evaluate_models`: every checkpoint through every measurement, then the report card.

This is the recipe that wires the components: inputs (held-out conversations, preference pairs, prompts)
are loaded and checked once, then each checkpoint is loaded in turn and scored (perplexity, preference
accuracy, generated replies, size / FLOPs / speed, optional harness), and `report.write_report` writes
report.md, report.json and the plots. `gpt2chat eval` is a thin argparse front over this function.
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
from gpt2chat.evaluate import inputs

__all__ = ["EvalConfig", "evaluate_models", "SECTIONS"]

SECTIONS = ("ppl", "pref", "gen", "speed", "side")


@dataclass
class EvalConfig:
    """Everything `gpt2chat eval` can set; `evaluate_models(..., **fields)` overrides these."""

    ref: str | None = None  # reference checkpoint for DPO-style implicit rewards
    data: str | None = None  # held-out conversations spec (default: OASST1 validation in ../shared)
    pref_data: str | None = None  # held-out preference pairs spec (default: UltraFeedback heldout-200)
    prompts: str | list[str] | None = None  # side-by-side prompts: a file (one per line / JSON list) or list
    max_rows: int | None = None  # first N conversations and first N pairs
    gen_rows: int = 16  # conversations whose last reply is generated for BLEU / reward / penalty
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy; > 0 = sampling seeded by `seed`
    top_k: int = 0
    top_p: float = 1.0
    harness: str | None = None  # lm-evaluation-harness tasks ("leaderboard", "arc,hellaswag", ...)
    harness_limit: int | None = None
    seed: int = 0
    device: str | None = None  # default: cuda when present, else cpu
    dtype: str | None = None  # default: bfloat16 on cuda, float32 on cpu
    threads: int | None = None
    batch_tokens: int = 2048  # tokens per scoring forward
    batch_size: int = 8  # prompts per generation batch
    beta: float = 0.1  # DPO implicit-reward scale
    max_reply_tokens: int = 256  # preference replies are cut to this many tokens (same for both sides)
    flops_context: int | None = None  # context of the FLOPs/token figure (default n_positions)
    speed_prompt_tokens: int = 128
    speed_new_tokens: int = 64
    speed_repeats: int = 3
    peak_matmul_size: int | None = None
    peak_copy_bytes: int | None = None
    skip: tuple[str, ...] = ()  # any of SECTIONS
    labels: list[str] | None = None
    progress: bool = True
    notes: list[str] = field(default_factory=list)

    def check(self) -> None:
        unknown = sorted(set(self.skip) - set(SECTIONS))
        if unknown:
            raise Gpt2ChatError(f"--skip: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
        for name in ("gen_rows", "max_new_tokens", "batch_tokens", "batch_size", "max_reply_tokens",
                     "speed_prompt_tokens", "speed_new_tokens", "speed_repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise Gpt2ChatError(f"{name}={value!r}: must be an integer >= 1")
        if self.max_rows is not None and (not isinstance(self.max_rows, int) or self.max_rows < 1):
            raise Gpt2ChatError(f"max_rows={self.max_rows!r}: must be an integer >= 1")
        if self.beta <= 0:
            raise Gpt2ChatError(f"beta={self.beta!r}: must be > 0")
        if self.temperature < 0:
            raise Gpt2ChatError(f"temperature={self.temperature!r}: must be >= 0 (0 = greedy)")


def _environment(device, dtype) -> dict:
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": str(device), "device_name": name, "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count()}


def _labels(models: list[str], labels: list[str] | None) -> list[str]:
    if labels:
        if len(labels) != len(models):
            raise Gpt2ChatError(f"{len(labels)} labels for {len(models)} models")
        return list(labels)
    parts = [Path(m).parts or (m,) for m in models]
    names = [p[-1] for p in parts]
    if len(set(names)) < len(names) or any(n in ("final", "latest") for n in names):
        names = ["/".join(p[-2:]) for p in parts]
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def _where(env: dict) -> str:
    return f"{env['device']}, {env['dtype']}, {env['threads']} threads"


def evaluate_models(models, out_dir, *, config: EvalConfig | None = None, **overrides) -> dict:
    """Evaluate checkpoints (folders or hub ids) and write the report card into `out_dir`.

    Returns the report as a dict (what report.json holds). Keyword overrides are `EvalConfig` fields.
    """
    import torch

    from gpt2chat.evaluate import measure
    from gpt2chat.evaluate.report import write_report

    models = [str(m) for m in ([models] if isinstance(models, str | os.PathLike) else models)]
    if not models:
        raise Gpt2ChatError("no model to evaluate: give at least one --model")
    config = dataclasses.replace(config or EvalConfig(), **overrides)
    config.check()
    for model in models + ([config.ref] if config.ref else []):
        inputs.check_model_location(model)
    harness_tasks = inputs.harness_tasks(config.harness)

    if config.threads:
        torch.set_num_threads(config.threads)
    device, dtype = device_and_dtype(config.device, config.dtype)
    inputs.seed_everything(config.seed)
    env = _environment(device, dtype)
    skip = set(config.skip)
    notes = list(config.notes)
    datasets: dict[str, dict] = {}

    conversations = None
    if not {"ppl", "gen"} <= skip:
        conversations, datasets["conversations"] = inputs.held_out_conversations(config.data, config.max_rows)
    pairs = None
    if "pref" not in skip:
        pairs, info = inputs.held_out_pairs(config.pref_data, config.max_rows)
        if pairs is None:
            notes.append(info["summary"])
        else:
            datasets["preferences"] = info
    prompts = inputs.side_by_side_prompts(config.prompts) if "side" not in skip else []
    peaks = None
    if "speed" not in skip:
        from gpt2chat.evaluate.flops import measure_peaks

        peaks = measure_peaks(device, dtype, matmul_size=config.peak_matmul_size,
                              copy_bytes=config.peak_copy_bytes, repeats=config.speed_repeats)

    labels = _labels(models, config.labels)
    reference = measure.Reference(config.ref, device, dtype) if config.ref and pairs else None
    entries, side_items = [], [{"prompt": p, "replies": {}} for p in prompts]
    loss_logs: dict[str, str] = {}
    for number, (label, path) in enumerate(zip(labels, models, strict=True), start=1):
        if config.progress:
            print(f"[eval] {number}/{len(models)} {label} ({path})", file=sys.stderr, flush=True)
        entry = measure.evaluate_one(path, label, config, device=device, dtype=dtype, env=env,
                                     conversations=conversations, conversation_info=datasets.get("conversations"),
                                     pairs=pairs, pair_info=datasets.get("preferences"), reference=reference,
                                     peaks=peaks, prompts=prompts, harness_tasks=harness_tasks)
        for item, reply in zip(side_items, entry.pop("side_by_side_replies", []), strict=False):
            item["replies"][label] = reply
        log = inputs.find_metrics_log(path)
        if log:
            entry["metrics_log"] = str(log)
            loss_logs.setdefault(str(log), label)
        entries.append(entry)
    if reference is not None:
        reference.close()

    if not config.harness:
        notes.append("lm-evaluation-harness not run (add --harness leaderboard for ARC / HellaSwag / MMLU / "
                     "TruthfulQA).")
    if "speed" not in skip:
        notes.append("Speeds and peaks are wall-clock measurements: they vary from run to run; every other "
                     "figure is deterministic for a given --seed.")
    decoding = ("greedy" if config.temperature == 0 else
                f"sampling T={config.temperature} top_k={config.top_k} top_p={config.top_p} seed {config.seed}")
    report = {
        "gpt2chat_version": inputs.version(),
        "seed": config.seed,
        "environment": env,
        "settings": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("notes", "progress")},
        "datasets": datasets,
        "peaks": peaks,
        "models": entries,
        "side_by_side": {
            "measured_on": f"{len(prompts)} prompts, each checkpoint through its own template, {decoding}, "
                           f"at most {config.max_new_tokens} new tokens; {_where(env)}",
            "items": side_items,
        } if prompts else None,
        "notes": notes,
    }
    return write_report(report, out_dir, loss_logs={label: log for log, label in loss_logs.items()})
