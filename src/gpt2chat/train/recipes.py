"""Recipes: wire model, tokenizer, template, data, objective and trainer into one call per command.

`run_sft(cfg)`, `run_dpo(cfg)`, `run_orpo(cfg)` train one stage; `run_pipeline(recipe)` runs SFT, then
DPO or ORPO from the SFT result, then evaluation. Each is also a CLI command (`cli/train.py`).

This module is the only place in `train/` that touches checkpoints, tokenizers and datasets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gpt2chat.errors import Gpt2ChatError
from gpt2chat.train import distributed as dist_utils
from gpt2chat.train import training_state
from gpt2chat.train.batching import BatchPlan, check_context
from gpt2chat.train.config import TrainConfig, build_config, effective_max_length, read_recipe, recipe_stages
from gpt2chat.train.objectives import DPOObjective, ORPOObjective, SFTObjective
from gpt2chat.train.trainer import Trainer, TrainResult, autocast_for, check_resume_state


def _say(dist: dist_utils.DistState, message: str) -> None:
    if dist.is_main:
        print(message, flush=True)


# ---------------------------------------------------------------------- model
def resolve_base(cfg: TrainConfig, dist: dist_utils.DistState) -> str:
    """`init:PRESET` -> a random-weight checkpoint under OUT/init (built once, seeded); else as given."""
    if not cfg.model.startswith("init:"):
        return cfg.model
    from gpt2chat.checkpoint import init_checkpoint

    preset = cfg.model.removeprefix("init:")
    folder = Path(cfg.out) / "init"
    if dist.is_main and not (folder / "config.json").is_file():
        init_checkpoint(preset, folder, template=cfg.template, seed=cfg.seed)
        _say(dist, f"[{cfg.objective}] initialised a random {preset!r} model in {folder}")
    dist_utils.barrier(dist)
    return str(folder)


def load_base(source: str, cfg: TrainConfig, dist: dist_utils.DistState, quiet: bool = False):
    """Model + tokenizer with the template's special tokens present (embedding resized when added)."""
    from gpt2chat.checkpoint import load_model
    from gpt2chat.templates import get_template

    model, tokenizer = load_model(source, device="cpu", dtype=torch.float32)  # fp32 master weights; see autocast_for
    template = get_template(cfg.template)
    vocab_before = model.config.vocab_size
    added = template.ensure_tokens(tokenizer)
    if len(tokenizer) > vocab_before:
        if not added:
            raise Gpt2ChatError(
                f"{source}: the tokenizer has {len(tokenizer)} tokens but the model only {vocab_before} "
                "embedding rows: tokenizer and model do not belong together")
        model.resize_token_embeddings(len(tokenizer))
        if not quiet:
            _say(dist, f"[{cfg.objective}] added {added} special token(s) of template {cfg.template!r} to the "
                       f"tokenizer; resized the embedding {vocab_before} -> {len(tokenizer)}")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise Gpt2ChatError(f"{source}: the tokenizer has no pad token distinct from end-of-text")
    return model, tokenizer


def set_dropout(model: torch.nn.Module, p: float) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        if hasattr(module, "dropout_p"):
            module.dropout_p = p


def apply_lora_from(cfg: TrainConfig, model: torch.nn.Module) -> torch.nn.Module:
    from gpt2chat.lora import apply_lora

    apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=list(cfg.lora_targets))
    return model


def _model_writers(cfg: TrainConfig, tokenizer, base_name: str):
    from gpt2chat.atomic_files import atomic_folder
    from gpt2chat.checkpoint import save_pretrained
    from gpt2chat.lora import merge_lora, save_adapter

    def write_model(model, folder: Path) -> None:
        if cfg.lora_r:
            save_adapter(model, folder, base_model_name_or_path=base_name)
            tokenizer.save(folder)
        else:
            save_pretrained(model, tokenizer, folder, template=cfg.template)

    def write_final(model, folder: Path) -> Path:
        """OUT/final (and OUT/adapter), each built beside its name and swapped in whole: a kill or a full disk
        while writing never leaves a folder of old and new files (the pipeline takes a final/ as done)."""
        if not cfg.lora_r:
            with atomic_folder(folder) as staging:
                save_pretrained(model, tokenizer, staging, template=cfg.template)
            return folder
        adapter_dir = Path(cfg.out) / "adapter"
        with atomic_folder(adapter_dir) as staging:
            write_model(model, staging)
        if not cfg.merge_lora:
            return adapter_dir
        with atomic_folder(folder) as staging:
            save_pretrained(merge_lora(model), tokenizer, staging, template=cfg.template)
        print(f"[{cfg.objective}] LoRA adapter (PEFT layout, for --adapter): {adapter_dir}", flush=True)
        return folder

    return write_model, write_final


# ---------------------------------------------------------------------- data
def _specs(cfg: TrainConfig, preference: bool) -> list[str]:
    from gpt2chat import data

    return data.sample_specs(list(cfg.data), preference)


def build_data(cfg: TrainConfig, tokenizer, dist: dist_utils.DistState, max_length: int):
    from gpt2chat import data
    from gpt2chat.data.report import format_kept

    preference = cfg.objective != "sft"
    builder = data.build_preference_examples if preference else data.build_sft_examples
    budgets = data.Budgets(max_prompt_length=cfg.max_prompt_length, max_response_length=cfg.max_response_length,
                           max_length=max_length, prompt_truncation=cfg.prompt_truncation)
    train, val, stats = builder(_specs(cfg, preference), tokenizer, cfg.template, budgets,
                                val_fraction=cfg.val_fraction, seed=cfg.seed, strict=cfg.strict)
    _say(dist, "\n".join(f"[{cfg.objective}] {line}" for line in format_kept(stats)))
    if cfg.max_examples:
        train = train[: cfg.max_examples]
    if not train:
        raise Gpt2ChatError(f"[{cfg.objective}] no training examples left from {', '.join(cfg.data)}")
    _say(dist, f"[{cfg.objective}] {len(train)} training / {len(val)} validation examples")
    return list(train), list(val), stats


def record_split(cfg: TrainConfig, base: str, stats: dict) -> None:
    """OUT/heldout/: the validation rows and the training rows' content hashes, for `gpt2chat eval`; OUT/data.json:
    what the data build kept, skipped, dropped and cut, by reason (`gpt2chat data stats --json`'s numbers)."""
    from gpt2chat.atomic_files import write_json_atomic
    from gpt2chat.evaluate.heldout import write_split

    write_json_atomic(Path(cfg.out) / "data.json", {k: v for k, v in stats.items() if k != "split"})

    split = stats["split"]
    write_split(cfg.out, stage=cfg.objective, kind="conversations" if cfg.objective == "sft" else "pairs",
                rows=split["heldout"], hashes=split["train_hashes"], base_model=base, data=cfg.data, seed=cfg.seed,
                val_fraction=cfg.val_fraction)


# ---------------------------------------------------------------------- one stage
def run_stage(cfg: TrainConfig) -> TrainResult:
    """Train one objective as configured; the result names the final model folder."""
    cfg.validate()
    dist, device = dist_utils.setup(cfg.distributed, cfg.device)
    try:
        return _run_stage(cfg, dist, device)
    finally:
        dist_utils.teardown(dist)


def _run_stage(cfg: TrainConfig, dist: dist_utils.DistState, device: torch.device) -> TrainResult:
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    resume_path = tensors = None
    if cfg.resume:
        resume_path = training_state.resolve_resume(cfg.resume, out)
        state, tensors = training_state.read_checkpoint(resume_path)
        check_resume_state(cfg, state, dist.world_size, resume_path)
        _say(dist, f"[{cfg.objective}] resuming from {resume_path} (step {state['step']})")
    else:
        earlier = training_state.list_checkpoints(out)
        if earlier:  # kept (nothing is deleted), but said: a later --resume must not surprise anyone
            _say(dist, f"[{cfg.objective}] note: {out} already holds {len(earlier)} checkpoint(s) of an earlier run "
                       f"(newest {earlier[-1].name}); this run starts over beside them (pass --resume to continue "
                       "that run instead, or use another --out)")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    base = resolve_base(cfg, dist)
    source = str(resume_path) if resume_path is not None and not cfg.lora_r else base
    model, tokenizer = load_base(source, cfg, dist)
    max_length = effective_max_length(cfg, model.config.n_positions)
    check_context(max_length, model.config.n_positions, source)     # before any data work
    dropout = cfg.dropout if cfg.dropout is not None else (0.0 if cfg.objective != "sft" else None)
    if dropout is not None:
        set_dropout(model, dropout)
    reference = None
    if cfg.objective == "dpo" and not cfg.precompute_ref:
        reference, _ = load_base(base, cfg, dist, quiet=True)
        reference.requires_grad_(False).eval().to(device)
    if cfg.lora_r:
        model = apply_lora_from(cfg, model)
        if tensors is not None and tensors.get("trainable"):
            missing = model.load_state_dict(tensors["trainable"], strict=False)
            if missing.unexpected_keys:
                raise training_state.ResumeError(f"{resume_path}: LoRA weights do not fit: {missing.unexpected_keys[:3]}")
    dist_utils.settle_auto(dist, cfg.distributed, sum(p.numel() for p in model.parameters()), bool(cfg.lora_r))
    model.to(device)
    model.train()
    if dist.active and not dist.is_main:
        dist_utils.barrier(dist)              # rank 0 tokenizes (and fills the data cache) first
    train, val, stats = build_data(cfg, tokenizer, dist, max_length)
    if dist.is_main:
        record_split(cfg, base, stats)
    if dist.active and dist.is_main:
        dist_utils.barrier(dist)
    kind = "sft" if cfg.objective == "sft" else "preference"
    common = {"seed": cfg.seed, "max_length": max_length, "pad_id": tokenizer.pad_token_id,
              "vocab_size": model.config.vocab_size, "context": model.config.n_positions}
    train_plan = BatchPlan(train, kind, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                           world_size=dist.world_size, pack=cfg.pack, share_prompt=cfg.share_prompt, **common)
    val_plan = (BatchPlan(val, kind, batch_size=cfg.batch_size, grad_accum=1, world_size=1,
                          pack=cfg.pack, share_prompt=cfg.share_prompt, **common) if val else None)
    autocast = autocast_for(cfg, device)
    if cfg.objective == "sft":
        objective = SFTObjective(autocast)
    elif cfg.objective == "dpo":
        objective = DPOObjective(cfg.beta, reference=reference, autocast=autocast)
    else:
        objective = ORPOObjective(cfg.beta, autocast=autocast)
    if cfg.compile or (cfg.compile is None and device.type == "cuda"):
        # per block, in place: names, saving, LoRA and FSDP unchanged; on CPU it did not pay (benchmarks/README.md)
        model.compile_blocks()
    write_model, write_final = _model_writers(cfg, tokenizer, base)
    trainer = Trainer(cfg, model, objective, train_plan, val_plan, dist, device, write_model, write_final,
                      extra_state={"base_model": base})
    _say(dist, f"[{cfg.objective}] {trainer.total_steps} steps of {train_plan.rows_per_step} rows "
               f"({dist.world_size} process(es), {device.type}); output in {out}")
    return trainer.fit(resume_path)


def _stage(objective: str, cfg: TrainConfig | dict | None, overrides: dict[str, Any]) -> TrainResult:
    if isinstance(cfg, TrainConfig):
        if overrides:
            cfg = build_config(objective, {**cfg.to_dict(), "objective": objective}, overrides)
        elif cfg.objective != objective:
            cfg = build_config(objective, {**cfg.to_dict(), "objective": objective})
    else:
        cfg = build_config(objective, cfg, overrides)
    return run_stage(cfg)


def run_sft(cfg: TrainConfig | dict | None = None, **overrides) -> TrainResult:
    """Supervised fine-tuning on assistant tokens (packing or padding)."""
    return _stage("sft", cfg, overrides)


def run_dpo(cfg: TrainConfig | dict | None = None, **overrides) -> TrainResult:
    """DPO from a reference (precomputed log-probs by default)."""
    return _stage("dpo", cfg, overrides)


def run_orpo(cfg: TrainConfig | dict | None = None, **overrides) -> TrainResult:
    """ORPO: SFT + odds-ratio preference term, no reference model."""
    return _stage("orpo", cfg, overrides)


# ---------------------------------------------------------------------- pipeline
def run_pipeline(recipe: str | Path | dict, overrides: dict[str, dict[str, Any]] | None = None,
                 resume: bool = False) -> dict[str, Any]:
    """SFT -> DPO or ORPO (starting from the SFT model) -> evaluation, each stage in OUT/<stage>.

    `overrides` maps a stage name ("sft", "dpo", "orpo", or "all") to flag values. With `resume`, a stage
    whose final model exists is skipped and an interrupted one continues from its last checkpoint.
    """
    recipe = read_recipe(recipe) if not isinstance(recipe, dict) else dict(recipe)
    overrides = overrides or {}
    if overrides.get("eval"):
        recipe["eval"] = {**recipe.get("eval", {}), **overrides["eval"]}
    _check_eval_keys(recipe)
    stages = recipe_stages(recipe)
    root = Path(overrides.get("all", {}).get("out") or recipe.get("out") or "runs/pipeline")
    results: dict[str, Any] = {"stages": {}}
    previous_model: str | None = None
    for stage in stages:
        stage_overrides = {**overrides.get("all", {}), **overrides.get(stage, {})}
        stage_overrides["out"] = str(root / stage)
        if previous_model is not None:
            stage_overrides["model"] = previous_model
        cfg = build_config(stage, recipe, stage_overrides)
        final = Path(cfg.out) / "final"
        if resume and (final / "config.json").is_file():
            print(f"[pipeline] {stage}: already done ({final}), skipped", flush=True)
            result_dir = final
        else:
            if resume and training_state.list_checkpoints(cfg.out):
                cfg.resume = "last"
            result = run_stage(cfg)
            if result.final_dir is None:
                results["stopped_early"] = stage
                return results
            result_dir = result.final_dir
        if cfg.lora_r and not cfg.merge_lora and stage != stages[-1]:
            raise Gpt2ChatError(f"[{stage}] merge_lora = false: the next stage needs a merged model")
        results["stages"][stage] = str(result_dir)
        previous_model = str(result_dir)
    if "eval" in recipe and int(_env_rank()) == 0:
        results["eval"] = _run_eval(recipe, root, results["stages"])
    return results


def _env_rank() -> str:
    import os

    return os.environ.get("RANK", "0")


def _check_eval_keys(recipe: dict[str, Any]) -> None:
    """Unknown `[eval]` keys fail before any training starts."""
    import dataclasses

    from gpt2chat.evaluate.report_card import EvalConfig
    from gpt2chat.train.config import ConfigError, suggest

    fields = [f.name for f in dataclasses.fields(EvalConfig)]
    for key in recipe.get("eval", {}):
        if key not in fields:
            raise ConfigError(f"{recipe.get('__path__', 'config')}: [eval] unknown key {key!r}{suggest(key, fields)}")


def _run_eval(recipe: dict[str, Any], root: Path, models: dict[str, str]) -> Any:
    """The pipeline's last stage: `gpt2chat.evaluate.evaluate_models` over the base and every stage's model.

    Keys of the recipe's `[eval]` table are `EvalConfig` fields (checked before training starts).
    """
    from gpt2chat import data
    from gpt2chat.evaluate import evaluate_models

    options = dict(recipe.get("eval", {}))
    for key, preference in (("data", False), ("pref_data", True)):
        if key in options and isinstance(options[key], str):
            (options[key],) = data.sample_specs([options[key]], preference)
    paths, labels = [], []
    base = Path(root / "sft" / "init") if str(recipe.get("model", "")).startswith("init:") else None
    if base is not None and (base / "config.json").is_file():
        paths.append(str(base))
        labels.append("base (random init)")
    done: list[str] = []
    for stage, path in models.items():
        done.append(stage)
        paths.append(path)
        labels.append("+".join(done))
    options.setdefault("labels", labels)
    print(f"[pipeline] evaluating {', '.join(labels)} -> {root / 'eval'}", flush=True)
    return evaluate_models(paths, root / "eval", **options)

