"""`gpt2chat sft | dpo | orpo | pipeline`: flags and `--config FILE.toml` (flags override the file).

Every flag maps to a `TrainConfig` key of the same name (`--lora-r` -> `lora_r`); `--set KEY=VALUE`
reaches any key without a flag of its own. Heavy modules load inside the handlers.
"""

from __future__ import annotations

import argparse
import tomllib
from typing import Any

from gpt2chat.errors import Gpt2ChatError

# flag -> (type, help); dest is the flag with dashes turned into underscores
_VALUE_FLAGS: dict[str, tuple[Any, str]] = {
    "--model": (str, "base model: hub id, local checkpoint folder, or init:PRESET for random weights"),
    "--template": (str, "chat template (llama3-context, user-assistant, plain, guanaco)"),
    "--out": (str, "output folder (checkpoints/, final/, metrics.jsonl, loss.png)"),
    "--lr": (float, "peak learning rate"),
    "--batch-size": (int, "examples (or packed rows) per micro-batch, per process"),
    "--grad-accum": (int, "micro-batches per optimizer step"),
    "--max-steps": (int, "optimizer steps (overrides --epochs)"),
    "--epochs": (float, "passes over the training data"),
    "--warmup-steps": (int, "linear warmup steps"),
    "--warmup-ratio": (float, "warmup as a fraction of all steps"),
    "--schedule": (str, "constant | cosine | linear (after warmup)"),
    "--weight-decay": (float, "AdamW weight decay (matrices only)"),
    "--max-grad-norm": (float, "gradient clipping norm"),
    "--max-length": (int, "tokens per example (SFT) or prompt + reply (DPO / ORPO)"),
    "--max-prompt-length": (int, "DPO / ORPO: prompt budget in tokens"),
    "--max-response-length": (int, "DPO / ORPO: reply budget in tokens"),
    "--max-examples": (int, "use at most this many training examples"),
    "--val-fraction": (float, "fraction of examples held out for validation"),
    "--lora-r": (int, "LoRA rank (0 = full fine-tuning)"),
    "--lora-alpha": (float, "LoRA alpha"),
    "--lora-dropout": (float, "LoRA dropout"),
    "--beta": (float, "DPO / ORPO beta"),
    "--dropout": (float, "dropout of the model while training"),
    "--seed": (int, "random seed"),
    "--eval-every": (int, "validate every N steps (0 = at the end)"),
    "--eval-batches": (int, "validation batches per evaluation"),
    "--save-every": (int, "checkpoint every N steps (0 = at the end)"),
    "--keep-last": (int, "checkpoints to keep"),
    "--precision": (str, "auto | bf16 | fp32"),
    "--device": (str, "cpu, cuda, cuda:1 ... (default: cuda when present)"),
    "--distributed": (str, "auto | ddp | fsdp | none (under torchrun)"),
    "--stop-after-steps": (int, "stop (as if interrupted) after this many steps; resume later"),
}
_BOOL_FLAGS = {
    "--pack": "SFT: pack several short examples per row (--no-pack: one per row, padded)",
    "--share-prompt": "DPO / ORPO: prompt, chosen and rejected in one row, the prompt computed once "
                      "(--no-share-prompt: two rows per pair)",
    "--precompute-ref": "DPO: reference log-probs once before training (--no-precompute-ref: frozen model)",
    "--merge-lora": "LoRA: also write a merged model at the end",
    "--progress": "show the progress bar",
    "--compile": "torch.compile the model",
}


def _parse_set(items: list[str] | None) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise Gpt2ChatError(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        values[key.strip().replace("-", "_")] = value
    return values


def _add_stage_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.toml", help="recipe file; flags override it")
    parser.add_argument("--data", action="append", metavar="SPEC",
                        help="dataset spec FORMAT:LOCATION[@WEIGHT] (repeatable; 'sample' = packaged sample)")
    parser.add_argument("--lora-targets", nargs="+", metavar="NAME", help="LoRA target module names")
    parser.add_argument("--resume", nargs="?", const="last", metavar="CHECKPOINT",
                        help="continue from the last checkpoint under --out (or the one given)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key (repeatable)")
    for flag, (kind, text) in _VALUE_FLAGS.items():
        parser.add_argument(flag, type=kind, help=text)
    for flag, text in _BOOL_FLAGS.items():
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = [f.lstrip("-").replace("-", "_") for f in (*_VALUE_FLAGS, *_BOOL_FLAGS)]
    values = {key: getattr(args, key) for key in (*keys, "data", "lora_targets", "resume")}
    values.update(_parse_set(args.set))
    return values


def _run_stage(objective: str, args: argparse.Namespace) -> int:
    from gpt2chat.train.config import build_config, read_recipe
    from gpt2chat.train.recipes import run_stage

    recipe = read_recipe(args.config) if args.config else None
    cfg = build_config(objective, recipe, _overrides(args))
    result = run_stage(cfg)
    if result.stopped_early:
        print(f"stopped after step {result.steps}; continue with --resume")
    return 0


def _run_pipeline(args: argparse.Namespace) -> int:
    from gpt2chat.train.recipes import run_pipeline

    overrides: dict[str, dict[str, Any]] = {"all": {}}
    for key, value in _parse_set(args.set).items():
        stage, dot, name = key.partition(".")
        if dot and stage in ("sft", "dpo", "orpo", "all", "eval"):
            overrides.setdefault(stage, {})[name] = value
        else:
            overrides["all"][key] = value
    for key in ("out", "device", "max_steps", "seed", "distributed", "precision"):
        value = getattr(args, key, None)
        if value is not None:
            overrides["all"][key] = value
    if args.sft_data:
        overrides.setdefault("sft", {})["data"] = args.sft_data
    if args.pref_data:
        for stage in ("dpo", "orpo"):
            overrides.setdefault(stage, {})["data"] = args.pref_data
    result = run_pipeline(args.config, overrides, resume=args.resume)
    for stage, path in result.get("stages", {}).items():
        print(f"[pipeline] {stage}: {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    helps = {
        "sft": "supervised fine-tuning on chat data (assistant tokens only)",
        "dpo": "Direct Preference Optimization on preference pairs",
        "orpo": "Odds Ratio Preference Optimization on preference pairs (no reference model)",
    }
    for objective, text in helps.items():
        parser = subparsers.add_parser(objective, help=text, description=text)
        _add_stage_flags(parser)
        parser.set_defaults(handler=lambda args, objective=objective: _run_stage(objective, args))

    parser = subparsers.add_parser(
        "pipeline", help="SFT -> DPO or ORPO -> evaluation from one recipe",
        description="Run a recipe's stages in order: [sft], then [dpo] or [orpo] from the SFT model, then [eval].")
    parser.add_argument("--config", required=True, metavar="FILE.toml", help="recipe file")
    parser.add_argument("--out", help="output root (one folder per stage)")
    parser.add_argument("--resume", action="store_true", help="skip finished stages, continue the interrupted one")
    parser.add_argument("--sft-data", action="append", metavar="SPEC", help="replace the SFT datasets")
    parser.add_argument("--pref-data", action="append", metavar="SPEC", help="replace the preference datasets")
    parser.add_argument("--max-steps", type=int, help="optimizer steps per stage")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device")
    parser.add_argument("--distributed")
    parser.add_argument("--precision")
    parser.add_argument("--set", action="append", metavar="[STAGE.]KEY=VALUE",
                        help="override any key, for one stage (sft.lr=1e-4), all stages (lr=1e-4) or [eval] (eval.max_rows=8)")
    parser.set_defaults(handler=_run_pipeline)
