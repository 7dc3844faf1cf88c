"""Where the memory of one training step goes: our SFT and DPO step on the GPT-2 124M shape, by item.

    python -m benchmarks.train_profile [--shared ../shared] [--kinds sft,dpo] [--seq 1024] [--checkpointing]
                                       [--step-in-backward]

RSS before training, by what was loaded (libraries, weights, data, DPO's reference log-probs), then two steps
(the second has the AdamW state: a run's peak) of the real trainer's pieces (`BatchPlan`, the objective, fused
AdamW or `StepInBackward`, no clipping, the dropout `gpt2chat train`
sets: the checkpoint's for SFT, 0 for DPO) on one packed row / the longest of 64 pairs of real data. The tensors autograd
saves for the backward are counted through `torch.autograd.graph.saved_tensors_hooks`, once per storage,
filed under the module that saved them (attention `[B, H, T, T]` probabilities and dropout masks apart);
parameters, gradients and AdamW state are counted from the tensors; RSS is read after each phase
(before the forward, after it, after the backward, after the optimizer step) with the process's peak.
Memory only: nothing here is timed. Prints a markdown table per kind and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.train import REPO, load_examples, rss_mb, shared_specs

MIB = 2**20


class SavedTensorLedger:
    """Bytes of the tensors autograd saves for the backward, per storage (views of one tensor count once),
    filed by the innermost module running when they were saved."""

    def __init__(self, model, seq: int):
        self.seq = seq
        self.weights = {param.untyped_storage().data_ptr() for param in model.parameters()}  # not new memory
        self.stack: list[str] = ["outside the model"]
        self.seen: dict[int, tuple[str, int]] = {}
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name, module)))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, name: str, module):
        label = type(module).__name__
        parts = name.split(".")
        where = "block" if "h" in parts else ("model" if name == "" else name)

        def hook(*_):
            self.stack.append(f"{where}: {label}" if where == "block" else where)

        return hook

    def _leave(self, *_):
        self.stack.pop()

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key and key not in self.seen and key not in self.weights:
            label = self.stack[-1]
            if tensor.dtype == torch.bool:
                label = f"{label} (bool: dropout masks, the plan's attention mask)"
            elif tensor.dim() >= 3 and tensor.shape[-1] == tensor.shape[-2] >= self.seq // 2:
                label = "block: attention [B, H, T, T] (probabilities, float masks)"   # or [B * H, T, T]
            self.seen[key] = (label, storage.nbytes())
        return tensor

    def by_label(self) -> dict[str, float]:
        totals: dict[str, float] = defaultdict(float)
        for label, nbytes in self.seen.values():
            totals[label] += nbytes / MIB
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    def close(self):
        for handle in self.handles:
            handle.remove()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def profile(kind: str, ckpt: str, specs: list[str], seq: int, checkpointing: bool, step_in_backward: bool) -> dict:
    import torch

    from gpt2chat.checkpoint import load_model
    from gpt2chat.train.batching import BatchPlan
    from gpt2chat.train.config import TrainConfig
    from gpt2chat.train.objectives import DPOObjective, SFTObjective
    from gpt2chat.train.recipes import set_dropout
    from gpt2chat.train.step_in_backward import StepInBackward
    from gpt2chat.train.trainer import allocate_state, build_optimizer

    setup = {"libraries (torch, gpt2chat)": rss_mb()}
    model, tokenizer = load_model(ckpt, device="cpu")
    setup["+ weights and tokenizer (load_model)"] = rss_mb()
    if kind == "dpo":
        set_dropout(model, 0.0)                          # as `gpt2chat train` does for preference objectives
    model.gradient_checkpointing = checkpointing
    examples = load_examples(kind, specs, tokenizer, 64, seq)
    if kind == "dpo":                                    # the longest pair of the first 64: near --seq tokens
        examples = [max(examples, key=lambda e: len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids))]
    setup["+ tokenized data (all of it built, 64 kept)"] = rss_mb()
    plan = BatchPlan(examples, "sft" if kind == "sft" else "preference", batch_size=1, grad_accum=1, world_size=1,
                     seed=0, max_length=seq, pad_id=tokenizer.pad_token_id, pack=True)
    objective = SFTObjective() if kind == "sft" else DPOObjective(beta=0.1)
    objective.prepare(model, {"train": plan}, torch.device("cpu"))
    setup["+ reference log-probs (DPO; no-grad forwards)"] = rss_mb()
    cfg = TrainConfig(objective=kind, data=["bench"], out=tempfile.mkdtemp(), lr=1e-5, max_grad_norm=0.0,
                      step_in_backward=step_in_backward).validate()
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    allocate_state(optimizer)                            # as Trainer.fit does
    hooks = StepInBackward(optimizer) if step_in_backward else None
    batch, totals = plan.micro_batches(0, 0, 0)[0], plan.step_totals(0, 0)
    model.train()
    phases: dict[str, float] = {}
    peaks: dict[str, float] = {}
    saved: dict[str, float] = {}
    for step in (1, 2):                                  # step 2: the AdamW state exists (the run's peak)
        phases[f"step {step}: before the forward"] = rss_mb()
        ledger = SavedTensorLedger(model, batch.input_ids.shape[-1])
        with torch.autograd.graph.saved_tensors_hooks(ledger.pack, lambda tensor: tensor):
            loss, _ = objective.micro_loss(model, batch, totals)
        ledger.close()
        saved = ledger.by_label()
        phases[f"step {step}: after the forward (graph held)"] = rss_mb()
        peaks[f"step {step}: forward"] = peak_rss_mb()
        if hooks is not None:
            hooks.arm(torch.isfinite(loss.detach()))
        loss.backward()
        del loss
        phases[f"step {step}: after the backward"] = rss_mb()
        peaks[f"step {step}: backward" + (" (with the updates)" if hooks else "")] = peak_rss_mb()
        if hooks is not None:
            hooks.disarm()
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            phases[f"step {step}: after the optimizer step"] = rss_mb()
            peaks[f"step {step}: optimizer step"] = peak_rss_mb()
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / MIB
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t)) / MIB
    return {"kind": kind, "tokens": int(batch.input_ids.numel()), "layers": model.config.n_layer,
            "checkpointing": checkpointing, "step_in_backward": step_in_backward,
            "dropout": model.transformer.h[0].attn.dropout_p, "setup_rss_mb": setup,
            "saved_mb": saved, "saved_total_mb": sum(saved.values()), "params_mb": params, "grads_mb": params,
            "adamw_state_mb": state, "rss_mb": phases, "peak_rss_mb_by_phase": peaks}


def print_table(result: dict) -> None:
    layers = result["layers"]
    print(f"\n{result['kind'].upper()} step, {result['tokens']} tokens (1 row), dropout {result['dropout']}, "
          f"checkpointing {result['checkpointing']}, step in backward {result['step_in_backward']}\n")
    print("| item | MiB | per layer |\n|---|---|---|")
    for phase, mb in result["setup_rss_mb"].items():
        print(f"| RSS before training: {phase} | {mb:.0f} | |")
    for label, mb in result["saved_mb"].items():
        per_layer = f"{mb / layers:.1f}" if label.startswith("block") else ""
        print(f"| saved for backward: {label} | {mb:.0f} | {per_layer} |")
    print(f"| saved for backward, total | {result['saved_total_mb']:.0f} | |")
    for key, label in (("params_mb", "weights"), ("grads_mb", "gradients (all at once without step in backward)"),
                       ("adamw_state_mb", "AdamW state")):
        print(f"| {label} | {result[key]:.0f} | |")
    for phase, mb in result["rss_mb"].items():
        print(f"| RSS {phase} | {mb:.0f} | |")
    for phase, mb in result["peak_rss_mb_by_phase"].items():
        print(f"| peak RSS up to the end of the {phase} | {mb:.0f} | |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--kinds", default="sft,dpo")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help="the model's gradient checkpointing on")
    parser.add_argument("--step-in-backward", action="store_true", help="the optimizer step inside the backward")
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    specs = shared_specs(Path(args.shared))
    if specs is None:
        print(f"skipped: shared data not found under {args.shared}/data")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.kind:                                        # a child: one kind, its own peak RSS
        print("RESULT " + json.dumps(profile(args.kind, args.ckpt, specs[args.kind], args.seq, args.checkpointing,
                                             args.step_in_backward)))
        return 0
    import subprocess
    import sys

    from gpt2chat.checkpoint import init_checkpoint

    ckpt = init_checkpoint("gpt2", Path(tempfile.mkdtemp(prefix="bench-profile-")) / "gpt2", template="llama3-context",
                           seed=0)
    results = []
    for kind in args.kinds.split(","):
        command = [sys.executable, "-m", "benchmarks.train_profile", "--kind", kind, "--ckpt", str(ckpt),
                   "--shared", args.shared, "--seq", str(args.seq), "--threads", str(args.threads)]
        command += ["--checkpointing"] if args.checkpointing else []
        command += ["--step-in-backward"] if args.step_in_backward else []
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{kind} profile failed")
        results.append(json.loads(line.removeprefix("RESULT ")))
        print_table(results[-1])
    print(json.dumps({"benchmark": "train-profile", "seq": args.seq, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
