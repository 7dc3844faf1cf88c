"""The one training loop for every objective (SFT, DPO, ORPO).

AdamW (fused / foreach where available, no weight decay on biases and LayerNorm), warmup then constant /
cosine / linear learning rate, gradient accumulation, clipping, bf16 autocast on CUDA, evaluation every N
steps, a tqdm bar (loss, tokens/s, ETA), `metrics.jsonl`, a loss-curve PNG, atomic checkpoints every N
steps and at the end, exact resume, and a clean stop on a NaN / inf loss.

Determinism: the data plan is a function of (seed, epoch) and the RNG is reseeded from (seed, step, rank)
at the start of every step, so a resumed run repeats the uninterrupted one step for step.

The loop knows objectives only through `Objective.micro_loss` and models only as `nn.Module`s; building
models, data and files is the job of `recipes.py`.

Why ~420 lines (over ~400): the step's order (losses, backward, norm, update, checkpoint, resume) is one piece
of logic; what stands alone lives beside it (`training_state`, `step_in_backward`, `distributed`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt2chat.device import resolve_dtype
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.train import distributed as dist_utils
from gpt2chat.train import training_state
from gpt2chat.train.batching import BatchPlan
from gpt2chat.train.config import TrainConfig
from gpt2chat.train.metrics_log import MetricsLog, plot_losses
from gpt2chat.train.objectives import Objective
from gpt2chat.train.step_in_backward import StepInBackward, step_if_finite


class TrainingDivergedError(Gpt2ChatError):
    """The loss or the gradient became NaN / inf; the run stopped without saving the bad state."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during `Trainer.fit`; its message says which checkpoint is intact (the CLI adds the command)."""

    def __init__(self, message: str, checkpoint: Path | None):
        super().__init__(message)
        self.checkpoint = checkpoint  # the newest complete one, None when none was written


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress)       # linear


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over trainable parameters; matrices decay, biases / LayerNorm / 1-d parameters do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise Gpt2ChatError("nothing to train: every parameter is frozen")
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_eps}
    if device.type in ("cuda", "cpu"):
        kwargs["fused"] = True      # one kernel over all parameters instead of one per tensor list (foreach)
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(groups, **kwargs)


def allocate_state(optimizer: torch.optim.AdamW) -> None:
    """AdamW's state (zero moments, step 0) made now, as its first `step()` would make it, instead of inside that
    step: allocated before any activation, the 2 x weights of moments sit below the step's transient memory,
    and the first backward's freed activations stay free for the next forward (the process's peak RSS)."""
    for group in optimizer.param_groups:
        on_device = group["fused"] or group["capturable"]
        for param in group["params"]:
            state = optimizer.state[param]
            if state:
                continue
            dtype = torch.float32 if group["fused"] or torch.get_default_dtype() != torch.float64 else torch.float64
            state["step"] = torch.zeros((), dtype=dtype, device=param.device if on_device else "cpu")
            for key in ("exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if group["amsgrad"] else ())):
                state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)


def seed_for_step(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


@dataclass
class TrainResult:
    out_dir: Path
    final_dir: Path | None
    steps: int
    last_checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False


class Trainer:
    """Runs `total_steps` optimizer steps of `objective` over `train_plan`.

    `write_model(model, folder)` saves the (unwrapped) model into a folder: the HF layout, or a LoRA
    adapter. `trainable_state()` returns extra tensors to restore on resume (LoRA weights).
    """

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, objective: Objective,
                 train_plan: BatchPlan, val_plan: BatchPlan | None, dist: dist_utils.DistState,
                 device: torch.device, write_model: Callable[[torch.nn.Module, Path], None],
                 write_final: Callable[[torch.nn.Module, Path], Path] | None = None,
                 extra_state: dict[str, Any] | None = None):
        self.cfg = cfg
        self.raw_model = model
        self.objective = objective
        self.train_plan = train_plan
        self.val_plan = val_plan
        self.dist = dist
        self.device = device
        self.write_model = write_model
        self.write_final = write_final
        self.extra_state = extra_state or {}
        self.out_dir = Path(cfg.out)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", enabled=dist.is_main)
        steps_per_epoch = train_plan.steps_per_epoch()
        if steps_per_epoch == 0:
            raise Gpt2ChatError(
                f"not enough training data for one optimizer step: {len(train_plan.rows_for_epoch(0))} rows, "
                f"a step needs batch_size x grad_accum x processes = {train_plan.rows_per_step}"
            )
        if cfg.step_in_backward and dist.mode != "none":
            raise Gpt2ChatError(f"step_in_backward needs one process ({dist.mode.upper()} reduces the gradients "
                                "across processes before any update); leave it off under torchrun")
        if cfg.gradient_checkpointing:                      # the model recomputes each block in the backward
            if not hasattr(model, "gradient_checkpointing"):
                raise Gpt2ChatError(f"gradient_checkpointing: {type(model).__name__} has no checkpointed blocks")
            model.gradient_checkpointing = True
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        self.warmup_steps = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * self.total_steps)
        self.last_checkpoint: Path | None = None
        self._progress = None  # the tqdm bar while fit() runs: lines printed meanwhile go above it
        self._skeleton: torch.nn.Module | None = None    # FSDP: the model's structure, to rebuild it for saving
        self._backward_step: StepInBackward | None = None   # cfg.step_in_backward, while fit() runs

    # ------------------------------------------------------------------ state
    def _state(self, step: int) -> dict[str, Any]:
        return {
            "step": step,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.dist.world_size,
            "fingerprint": self.cfg.fingerprint(),
            "config": self.cfg.to_dict(),
            "torch": torch.__version__,
            **self.extra_state,
        }

    def _save(self, step: int, optimizer) -> torch.nn.Module | None:
        """Write checkpoint `step` (every process calls it); returns the model it saved, on rank 0."""
        optim_state = _optimizer_state(self.model, optimizer, self.dist)
        model = self._plain_model()
        failure = None
        if self.dist.is_main:
            tensors = {"optimizer": optim_state, "rng": training_state.rng_state(),
                       "trainable": _trainable_state(model), **self.objective.state_tensors()}
            try:
                training_state.write_checkpoint(self.out_dir, step, lambda folder: self.write_model(model, folder),
                                                self._state(step), tensors, self.cfg.keep_last)
            except training_state.CheckpointWriteError as exc:
                failure = exc
        dist_utils.barrier(self.dist, failure, self.device)  # a failed write stops every process, not rank 0 alone
        self.last_checkpoint = training_state.checkpoints_root(self.out_dir) / f"step-{step:07d}"
        return model

    def _plain_model(self) -> torch.nn.Module | None:
        """The trained model as a plain module: FSDP gathers its shards into a CPU copy on rank 0 (None
        elsewhere; a collective); otherwise the model itself, which DDP only wraps."""
        if self._skeleton is None:
            return self.raw_model
        return dist_utils.gather_full_model(self.model, self._skeleton)

    def _restore(self, path: Path, optimizer) -> int:
        state, tensors = training_state.read_checkpoint(path)
        check_resume_state(self.cfg, state, self.dist.world_size, path)
        _load_optimizer_state(self.model, optimizer, tensors["optimizer"], self.dist)
        self.objective.load_state_tensors(tensors)
        if "rng" in tensors:
            training_state.set_rng_state(tensors["rng"])
        self.last_checkpoint = path
        return int(state["step"])

    # ------------------------------------------------------------------ loop
    def fit(self, resume_from: Path | None = None) -> TrainResult:
        cfg = self.cfg
        self._skeleton = dist_utils.meta_copy(self.raw_model) if self.dist.mode == "fsdp" else None
        self.model = dist_utils.wrap(self.raw_model, self.dist, self.device)
        optimizer = build_optimizer(self.model, cfg, self.device)
        allocate_state(optimizer)
        self._backward_step = StepInBackward(optimizer) if cfg.step_in_backward else None
        start_step = 0
        if resume_from is not None:
            start_step = self._restore(resume_from, optimizer)
            self.metrics.truncate_after(start_step)
        else:
            self.metrics.reset()
        plans = {"train": self.train_plan}
        if self.val_plan is not None:
            plans["val"] = self.val_plan
        self.objective.prepare(self.raw_model, plans, self.device)
        dist_utils.reshard(self.raw_model)

        val_batches = self.val_plan.eval_batches(cfg.eval_batches) if self.val_plan is not None else []
        self.model.train()
        progress = _progress_bar(cfg, self.dist, self.total_steps, start_step)
        history: list[dict[str, Any]] = []
        stopped_early = False
        step = start_step
        started = time.perf_counter()
        self._progress = progress
        try:
            for step in range(start_step, self.total_steps):
                record = self._train_step(step, optimizer)
                history.append(record)
                self.metrics.write(record)
                if progress is not None:
                    progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                         lr=f"{record['lr']:.2e}")
                    progress.update(1)
                done = step + 1
                if cfg.eval_every and done % cfg.eval_every == 0 and done < self.total_steps and val_batches:
                    self._evaluate(done, val_batches)
                if cfg.save_every and done % cfg.save_every == 0 and done < self.total_steps:
                    self._save(done, optimizer)
                    self._plot()
                if cfg.stop_after_steps and done >= cfg.stop_after_steps and done < self.total_steps:
                    stopped_early = True
                    break
        except KeyboardInterrupt:
            # A Ctrl-C inside a checkpoint write leaves no folder under a step name (atomic_folder), so the
            # newest complete checkpoint is the one a resume continues from.
            found = training_state.list_checkpoints(self.out_dir)
            raise TrainingInterrupted(
                f"[{cfg.objective}] step {step + 1} of {self.total_steps}; "
                f"{training_state.intact_checkpoint(found)}", found[-1] if found else None) from None
        finally:
            self._progress = None
            if self._backward_step is not None:
                self._backward_step.close()
            if progress is not None:
                progress.close()
        final_dir = None
        if not stopped_early:
            done = self.total_steps
            if val_batches:
                self._evaluate(done, val_batches)
            saved = self._save(done, optimizer)
            failure = None
            if self.write_final is not None and self.dist.is_main:
                try:
                    final_dir = self.write_final(saved, self.out_dir / "final")
                except OSError as exc:
                    failure = training_state.write_failure(self.out_dir / "final", exc, self.out_dir)
            dist_utils.barrier(self.dist, failure, self.device)
        self._plot()
        if self.dist.is_main:
            elapsed = time.perf_counter() - started
            print(f"[{cfg.objective}] {step + 1 - start_step} steps in {elapsed:.1f}s; "
                  f"metrics: {self.metrics.path}" + (f"; model: {final_dir}" if final_dir else ""))
        return TrainResult(self.out_dir, final_dir, step + 1, self.last_checkpoint, history, stopped_early)

    def _train_step(self, step: int, optimizer) -> dict[str, Any]:
        cfg = self.cfg
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        lr = cfg.lr * lr_factor(step, self.total_steps, self.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(seed_for_step(cfg.seed, step, self.dist.rank))
        tick = time.perf_counter()
        micro_batches = self.train_plan.micro_batches(epoch, step_in_epoch, self.dist.rank)
        totals = self.train_plan.step_totals(epoch, step_in_epoch)
        scale = float(self.dist.world_size) if self.dist.mode != "none" else 1.0
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        metric_sums: dict[str, torch.Tensor] = {}
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with dist_utils.no_sync(self.model, skip=not last):
                loss, metrics = self.objective.micro_loss(self.model, batch.to(self.device), totals)
                if self._backward_step is not None:         # one micro-batch, one process (config, __init__)
                    self._backward_step.arm(torch.isfinite(loss.detach()))
                (loss * scale).backward()
            loss_sum += loss.detach().float()
            for key, value in metrics.items():
                metric_sums[key] = metric_sums[key] + value if key in metric_sums else value
        keys = sorted(metric_sums)
        # Everything stays on the device until one read-back after the optimizer step: the loss, the metrics
        # and the gradient norm (clip_grad_norm_ with inf max_norm only measures; under FSDP it is the whole
        # model's norm, a DTensor).
        reduced = dist_utils.all_reduce_sum(torch.stack([loss_sum, *(metric_sums[k] for k in keys)]).double(),
                                            self.dist)
        if self._backward_step is not None:                 # the backward already stepped and freed the grads
            grad_norm = self._backward_step.disarm()
        else:
            max_norm = cfg.max_grad_norm or float("inf")    # None / 0: no clipping
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            step_if_finite(optimizer, torch.isfinite(reduced[0]) & torch.isfinite(grad_norm))
            optimizer.zero_grad(set_to_none=True)
        # The step's one host sync: it waits for the whole step, so the timing below covers it.
        step_loss, *metric_values, grad_norm = torch.cat([reduced, grad_norm.reshape(1).to(reduced)]).tolist()
        if not math.isfinite(step_loss):
            raise TrainingDivergedError(self._diverged_message("loss", step_loss, step))
        if not math.isfinite(grad_norm):
            raise TrainingDivergedError(self._diverged_message("gradient norm", grad_norm, step))
        seconds = time.perf_counter() - tick
        record: dict[str, Any] = {
            "split": "train", "step": step + 1, "epoch": round((step + 1) / self.steps_per_epoch, 4),
            "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
            "tokens": totals["tokens"], "tokens_per_s": totals["tokens"] / max(seconds, 1e-9),
            "step_time_s": seconds,
        }
        if totals["pairs"]:
            record["pairs_per_s"] = totals["pairs"] / max(seconds, 1e-9)
        record.update(zip(keys, metric_values, strict=True))
        return record

    def _diverged_message(self, what: str, value: float, step: int) -> str:
        where = (f"the last good checkpoint is {self.last_checkpoint} (resume with --resume)"
                 if self.last_checkpoint else "no checkpoint was written before it")
        return (f"{what} became {value} at step {step + 1} ({self.cfg.objective}); training stopped and "
                f"nothing was saved for this step; {where}. Try a lower lr, clipping or fp32.")

    def _evaluate(self, step: int, val_batches) -> None:
        model = self.raw_model          # DDP's wrapper only syncs gradients; FSDP shards this module in place
        model.eval()
        metrics = self.objective.eval_metrics(model, val_batches, self.device)
        dist_utils.reshard(model)
        model.train()
        record = {"split": "val", "step": step, **metrics}
        self.metrics.write(record)
        if self.dist.is_main and self.cfg.progress:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            line = f"[{self.cfg.objective}] step {step} validation: {shown}"
            if self._progress is not None:
                self._progress.write(line)  # above the bar, not into the middle of it
            else:
                print(line, flush=True)

    def _plot(self) -> None:
        if self.dist.is_main:
            plot_losses(self.metrics.path, self.out_dir / "loss.png", title=f"{self.cfg.objective} loss")


def check_resume_state(cfg: TrainConfig, state: dict[str, Any], world_size: int, path: Path) -> None:
    """A checkpoint from another run (other config, model or process count) is refused, naming why."""
    if state.get("fingerprint") != cfg.fingerprint():
        saved = state.get("config", {})
        diff = cfg.training_diff(saved) if isinstance(saved, dict) else ["config"]
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(cfg, k)!r}" for k in diff[:5])
        raise training_state.ResumeError(f"--resume {path}: this checkpoint is from another run ({details or 'config differs'})")
    if state.get("world_size", 1) != world_size:
        raise training_state.ResumeError(
            f"--resume {path}: saved with {state.get('world_size')} processes, now {world_size}; "
            "resume with the same number of processes")


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights of a LoRA run's trainable parameters (full fine-tuning saves the whole model instead)."""
    trainable = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    total = sum(1 for _ in model.parameters())
    return trainable if len(trainable) < total else {}


def _optimizer_state(model, optimizer, dist: dist_utils.DistState) -> dict[str, Any]:
    """FSDP: the whole optimizer state gathered on rank 0 (empty elsewhere), keyed by parameter name."""
    if dist.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def _load_optimizer_state(model, optimizer, state: dict[str, Any], dist: dist_utils.DistState) -> None:
    try:
        if dist.mode == "fsdp":     # every process read the whole state; each keeps its own shards of it
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state)
    except (ValueError, KeyError) as exc:
        raise training_state.ResumeError(f"the checkpoint's optimizer state does not fit this model: {exc}") from None


def _progress_bar(cfg: TrainConfig, dist: dist_utils.DistState, total: int, initial: int):
    if not (cfg.progress and dist.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=cfg.objective, unit="step", dynamic_ncols=True,
                mininterval=0.5)


def autocast_for(cfg: TrainConfig, device: torch.device) -> Callable[[], Any]:
    """bf16 autocast over the fp32 weights where the device policy runs bf16 (precision auto) and the GPU
    supports it, or when asked (bf16); else no autocast (fp32)."""
    use_bf16 = cfg.precision == "bf16" or (
        cfg.precision == "auto" and resolve_dtype(None, device) == torch.bfloat16 and torch.cuda.is_bf16_supported())
    if not use_bf16:
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
