"""`gpt2chat sft | dpo | orpo | pipeline`: flags and `--config FILE.toml` (flags override the file).

The flags are generated from the `TrainConfig` fields (`lora_r` -> `--lora-r`, with the field's type and
help text), so a new field is a flag at once; `--set KEY=VALUE` takes a TOML value for any key. Heavy
modules load inside the handlers.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tomllib
from typing import Any

from gpt2chat.errors import Gpt2ChatError

# fields the command itself decides, not a flag
_NOT_FLAGS = ("objective",)
_TYPES = {"int": int, "float": float, "str": str}


def _config_fields() -> list:
    import dataclasses

    from gpt2chat.train.config import TrainConfig

    return [f for f in dataclasses.fields(TrainConfig) if f.name not in _NOT_FLAGS]


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
    """`--config`, `--set`, and one flag per `TrainConfig` field (its type, its help text)."""
    parser.add_argument("--config", metavar="FILE.toml", help="recipe file; flags override it")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config key (repeatable)")
    for f in _config_fields():
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type).split(" | ")[0]
        settings = dict(f.metadata["cli"])
        if kind == "bool":
            settings["action"] = argparse.BooleanOptionalAction
        elif kind in _TYPES and "action" not in settings:
            settings["type"] = _TYPES[kind]
        parser.add_argument(flag, default=None, help=f.metadata["help"], **settings)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    values = {f.name: getattr(args, f.name) for f in _config_fields()}
    values.update(_parse_set(args.set))
    return values


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted run: the same flags, with `--resume` (the last checkpoint)."""
    kept, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--resume":  # a stage's --resume may name a checkpoint: drop that value too
            i += 2 if i + 1 < len(argv) and not argv[i + 1].startswith("-") else 1
            continue
        if not arg.startswith("--resume="):
            kept.append(arg)
        i += 1
    return shlex.join(["gpt2chat", *kept, "--resume"])


def _interrupted(exc: KeyboardInterrupt, args: argparse.Namespace, pipeline: bool) -> int:
    """Ctrl-C: what is intact (the trainer's message) and the command that goes on from it."""
    print(f"interrupted: {exc}" if str(exc) else "interrupted", file=sys.stderr)
    argv = args.argv  # as typed (cli.main)
    if pipeline or getattr(exc, "checkpoint", None) is not None:
        print(f"continue with: {resume_command(argv)}", file=sys.stderr)
    else:
        print(f"nothing to resume from; start again with: {shlex.join(['gpt2chat', *argv])}", file=sys.stderr)
    return 130


def _run_stage(objective: str, args: argparse.Namespace) -> int:
    from gpt2chat.train.config import build_config, read_recipe
    from gpt2chat.train.recipes import run_stage

    recipe = read_recipe(args.config) if args.config else None
    cfg = build_config(objective, recipe, _overrides(args))
    try:
        result = run_stage(cfg)
    except KeyboardInterrupt as exc:
        return _interrupted(exc, args, pipeline=False)
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
    try:
        result = run_pipeline(args.config, overrides, resume=args.resume)
    except KeyboardInterrupt as exc:
        return _interrupted(exc, args, pipeline=True)
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
