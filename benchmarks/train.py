"""Training speed and memory: our trainer against TRL's SFTTrainer and DPOTrainer on the GPT-2 124M shape.

    python -m benchmarks.train [--shared ../shared] [--kinds sft,dpo] [--steps 3] [--repeats 1] [--seq 1024]
    python -m benchmarks.train --budget-gib 8 [--budget-batches 1,2]      # the largest batch in a budget

Same random weights (one checkpoint folder both load), same tokenized real data (OASST1 validation +
Alpaca subset for SFT, UltraFeedback train-1k for DPO, from ../shared/data; skipped cleanly without it),
sequence length `--seq` (1,024: GPT-2's context), same effective batch (batch_size x grad_accum rows or
pairs per step), same threads. Each measurement is one child process, so its peak memory is its own: peak
RSS on the CPU, `torch.cuda.max_memory_allocated` with `--device cuda`; "training" is the peak minus what
the process held just before training (weights, data, libraries). Children alternate (`round_robin`). A
run's rate is its total work over its total time, first step dropped (warmup); medians over repeats.

Runners: `ours` (the chunked head, `gpt2chat.chunked_head`), `ours-unchunked` (the same trainer with the
`[scored positions, vocab]` logits of before issue 24: the speed and memory it replaces, in the same run),
and TRL 1.16 with its memory options: its fused, chunked LM head is always on in 1.16 (`add_fused_lm_head`;
on a CPU it scores every position, on CUDA only the labelled ones), SFT with `packing=True` (best-fit
decreasing into padding-free rows), DPO with `precompute_ref_log_probs=True` (its `padding_free` is
disabled in 1.16: "temporarily unavailable after a refactor"). `--runners ...,trl` adds TRL SFT unpacked.
Opt-in runners: `ours-sib` (the optimizer step inside the backward, `step_in_backward`: no clipping, so give
`--max-grad-norm 0` for the others to compare like with like) and `ours-old` (`ours` of the checkout
`--old-tree`, e.g. `git worktree add /tmp/old COMMIT`, interleaved with today's: a speed A/B in one run).

- SFT: trained (non-pad) tokens / s, assistant-only loss from the same masks; ours packs into `--seq` rows.
- DPO: pairs / s, reference log-probs precomputed before training in both (not timed).
- Precision: fp32 on the CPU (no bf16 units; TRL's `bf16=True` default would make matmuls ~100x slower),
  bf16 autocast on CUDA on both sides; gradient checkpointing off on both sides, or with `--checkpointing`
  on both (ours: `gradient_checkpointing = true`; TRL: `gradient_checkpointing=True`), reported as its own rows.
- Dropout: what each trainer uses by default: the checkpoint's 0.1 for SFT on both sides; 0 for DPO on both
  (ours as `gpt2chat train` sets it, TRL's `disable_dropout=True`).
- MFU: model FLOPs (6 N per token run + attention, `gpt2chat.evaluate.flops`) / the best fp32 matmul rate
  measured before and after the runs (1024^3, the best of 5 x 5 timings).
- `--budget-gib G`: each runner's peak at two batch sizes (2 steps each, so the optimizer state is in it),
  memory as an affine function of the batch, then runs where that line crosses G until the largest batch
  measured under G and the next one measured over it are adjacent (or `--budget-runs` runs): the table
  gives both, measured, never an extrapolation.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.peers import train_trl
from benchmarks.timing import round_robin

REPO = Path(__file__).resolve().parents[1]
RUNNERS = {"sft": ("ours", "ours-unchunked", "trl-packed"), "dpo": ("ours", "ours-unchunked", "trl")}
EXTRA = ("ours-sib", "ours-old")       # opt-in runners: step_in_backward; `ours` of another tree (--old-tree)
ALL_RUNNERS = {"sft": (*RUNNERS["sft"], "trl", *EXTRA), "dpo": (*RUNNERS["dpo"], *EXTRA)}


def shared_specs(shared: Path) -> dict[str, list[str]] | None:
    data = shared / "data"
    sft = [f"oasst1:{data / 'oasst1/en-validation.jsonl'}", f"alpaca:{data / 'alpaca/alpaca-subset-5k.json'}"]
    dpo = [f"ultrafeedback:{data / 'ultrafeedback/train-1k.jsonl'}"]
    if not all(Path(s.split(":", 1)[1]).is_file() for s in sft + dpo):
        return None
    return {"sft": sft, "dpo": dpo}


def load_examples(kind: str, specs: list[str], tokenizer, n: int, seq: int):
    from gpt2chat.data import Budgets, build_preference_examples, build_sft_examples

    if kind == "sft":
        train, _, _ = build_sft_examples(specs, tokenizer, "llama3-context", Budgets.sft(seq), val_fraction=0.0)
    else:
        budgets = Budgets(max_prompt_length=seq // 2, max_response_length=seq // 2, max_length=seq)
        train, _, _ = build_preference_examples(specs, tokenizer, "llama3-context", budgets, val_fraction=0.0)
    return train[:n]


# ---------------------------------------------------------------------- children
def unchunked_head(model, batch, autocast, loss):
    """The head before issue 24: `[N, vocab]` logits of the scored positions, scored by `token_logps`."""
    from gpt2chat.chunked_head import chunked_nll_sum
    from gpt2chat.losses import token_logps
    from gpt2chat.train.objectives import attention_plan

    with autocast():
        logits = model(batch.input_ids, attention_plan(model, batch), select=batch.scored.index)
    logps = token_logps(logits, batch.scored.targets)
    return -logps.sum() if loss is chunked_nll_sum else logps


def run_ours(kind: str, ckpt: str, specs: list[str], args, chunked: bool = True, step_in_backward: bool = False) -> dict:
    import torch

    from gpt2chat.checkpoint import load_model
    from gpt2chat.train import objectives
    from gpt2chat.train.batching import BatchPlan
    from gpt2chat.train.config import TrainConfig
    from gpt2chat.train.distributed import DistState
    from gpt2chat.train.objectives import DPOObjective, SFTObjective
    from gpt2chat.train.recipes import set_dropout
    from gpt2chat.train.trainer import Trainer, autocast_for

    if not chunked:
        objectives.through_head = unchunked_head
    device = torch.device(args.device)
    model, tokenizer = load_model(ckpt, device=device)
    if kind == "dpo":
        set_dropout(model, 0.0)          # as `gpt2chat train` does for DPO (and TRL's disable_dropout default)
    rows = args.batch_size * args.grad_accum * args.steps
    examples = load_examples(kind, specs, tokenizer, rows * (8 if kind == "sft" else 1), args.seq)
    cfg = TrainConfig(objective="sft" if kind == "sft" else "dpo", data=["bench"], out=tempfile.mkdtemp(),
                      lr=1e-5, batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.steps,
                      max_length=args.seq, pack=True, schedule="constant", progress=False, save_every=0,
                      max_grad_norm=0.0 if step_in_backward else args.max_grad_norm,
                      step_in_backward=step_in_backward, gradient_checkpointing=args.checkpointing).validate()
    plan = BatchPlan(examples, "sft" if kind == "sft" else "preference", batch_size=cfg.batch_size,
                     grad_accum=cfg.grad_accum, world_size=1, seed=0, max_length=args.seq,
                     pad_id=tokenizer.pad_token_id, pack=True)
    autocast = autocast_for(cfg, device)             # bf16 on CUDA, none on the CPU (as TRL's runs)
    objective = SFTObjective(autocast) if kind == "sft" else DPOObjective(beta=0.1, autocast=autocast)
    model.train()
    trainer = Trainer(cfg, model, objective, plan, None, DistState(), device, write_model=lambda m, f: None)
    trainer._save = lambda *a, **k: None          # no checkpoint writing inside the timed loop
    start_memory(device)
    result = trainer.fit()
    steps = result.history[1:]
    return rates(kind, [r["step_time_s"] for r in steps], [r["tokens"] for r in steps], args)


def rates(kind: str, times: list[float], tokens: list[int], args) -> dict:
    """Throughput over the timed steps (all but the first): total work / total time, since the two trainers
    shuffle differently and a single step's length varies with the examples it drew."""
    seconds = sum(times)
    pairs = args.batch_size * args.grad_accum * len(times)
    return {"step_s": seconds / len(times), "tokens_per_step": sum(tokens) / len(tokens),
            "tokens_per_s": sum(tokens) / seconds, "pairs_per_s": pairs / seconds if kind == "dpo" else None}


def run_trl(kind: str, ckpt: str, specs: list[str], args, packed: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from gpt2chat.checkpoint import load_model

    _, tokenizer = load_model(ckpt, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa", dtype=torch.float32)
    rows = args.batch_size * args.grad_accum * args.steps
    examples = load_examples(kind, specs, tokenizer, rows * (8 if kind == "sft" else 1), args.seq)  # ours' pool
    start_memory(torch.device(args.device))
    clock = train_trl(kind, model, ckpt, tokenizer, examples, out=tempfile.mkdtemp(), batch_size=args.batch_size,
                      grad_accum=args.grad_accum, steps=args.steps, seq=args.seq, device=args.device, packed=packed,
                      gradient_checkpointing=args.checkpointing, max_grad_norm=args.max_grad_norm)
    return rates(kind, clock.seconds[1:], clock.tokens[1:], args)


_SETUP_MB: list[float] = []


def rss_mb() -> float:
    """This process's resident memory now (MiB), from /proc (Linux)."""
    with open("/proc/self/status") as status:
        line = next(ln for ln in status if ln.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def start_memory(device) -> None:
    """The memory a run has before training (weights, data, libraries), so that peak - setup is training's own."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        _SETUP_MB.append(torch.cuda.memory_allocated(device) / 2**20)
    else:
        _SETUP_MB.append(rss_mb())


def peak_memory(device) -> dict:
    """Peak memory of the run: `max_memory_allocated` on CUDA, the process's peak RSS on the CPU (MiB)."""
    import torch

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    setup = _SETUP_MB[-1] if _SETUP_MB else 0.0
    return {"peak_mb": peak, "setup_mb": setup, "training_mb": peak - setup}


def child(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    specs = json.loads(args.specs)
    if args.who.startswith("ours"):
        result = run_ours(args.kind, args.ckpt, specs[args.kind], args, chunked=args.who != "ours-unchunked",
                          step_in_backward=args.who == "ours-sib")
    else:
        result = run_trl(args.kind, args.ckpt, specs[args.kind], args, packed=args.who == "trl-packed")
    result.update(peak_memory(torch.device(args.device)))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------- driver
def run_child(who: str, kind: str, ckpt: Path, specs: dict, args, batch_size: int, steps: int, env: dict) -> dict:
    """One measurement in its own process (its peak RSS is its own)."""
    tree = REPO
    command = [sys.executable, "-m", "benchmarks.train", "--child", "--who", who, "--kind", kind, "--ckpt", str(ckpt),
               "--specs", json.dumps(specs), "--steps", str(steps), "--batch-size", str(batch_size),
               "--grad-accum", str(args.grad_accum), "--threads", str(args.threads), "--seq", str(args.seq),
               "--device", args.device]
    if who == "ours-old":            # `ours` of the other tree, with the flags every version of this script knows
        tree = Path(args.old_tree).resolve()
        command[command.index("--who") + 1] = "ours"
        env = {**env, "PYTHONPATH": f"{tree / 'src'}{os.pathsep}{tree}"}
    else:
        command += (["--checkpointing"] if args.checkpointing else []) + ["--max-grad-norm", str(args.max_grad_norm)]
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, cwd=tree)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{who} {kind} run failed")
    result = json.loads(line.removeprefix("RESULT "))
    print(f"  {kind} {who} batch {batch_size}: {result}", file=sys.stderr, flush=True)
    return result


def budget_fit(points: dict[int, float], budget_mb: float) -> dict:
    """The largest batch (rows of `--seq` tokens) whose peak fits `budget_mb`, from peaks measured at two or
    more batch sizes: memory is an affine function of the batch (weights + optimizer + per-row activations)."""
    sizes = sorted(points)
    (b0, m0), (b1, m1) = (sizes[0], points[sizes[0]]), (sizes[-1], points[sizes[-1]])
    per_row = (m1 - m0) / (b1 - b0)
    fixed = m0 - per_row * b0
    return {"measured": {str(b): round(m) for b, m in points.items()}, "fixed_mb": fixed, "per_row_mb": per_row,
            "max_batch": int((budget_mb - fixed) // per_row) if per_row > 0 else None}


def verify_budget(peak_at, budget_mb: float, measured: dict[int, float], max_runs: int = 4) -> dict:
    """Bracket the largest batch under `budget_mb` by measurement: `fits`, the largest batch measured under
    it, and `over`, the smallest larger batch measured over it (None: not reached). Each next batch to run
    is where the line through the two measured points nearest the budget crosses it (memory is close to
    affine in the batch, but not exactly: per-row costs bend), inside the bracket; it stops when the two
    are adjacent or after `max_runs` runs (a row of a big batch takes minutes). `measured` ({batch: peak
    MiB}, at least two batches) gains every run."""
    for run in range(max_runs + 1):
        fits = max((b for b, p in measured.items() if p <= budget_mb), default=None)
        over = min((b for b, p in measured.items() if p > budget_mb and b > (fits or 0)), default=None)
        if run == max_runs or over == (fits or 0) + 1:     # adjacent (or nothing fits: batch 1 is over)
            break
        near = sorted(measured, key=lambda b: abs(measured[b] - budget_mb))[:2]
        (b0, p0), (b1, p1) = sorted((b, measured[b]) for b in near)
        slope = (p1 - p0) / (b1 - b0) if b1 != b0 and p1 != p0 else float("inf")
        guess = b0 + int((budget_mb - p0) // slope) if slope > 0 else (over or 2 * (fits or 1))
        batch = max(guess, (fits or 0) + 1)                   # inside the bracket
        if over is not None:
            batch = min(batch, over - 1)
        measured[batch] = peak_at(batch)
    return {"fits": fits, "over": over}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is warmup)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seq", type=int, default=1024, help="sequence length (GPT-2's context at most)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--device", default="cpu", help="cpu (peak RSS) or cuda (max_memory_allocated)")
    parser.add_argument("--kinds", default="sft,dpo")
    parser.add_argument("--runners", default=None, help="comma list (default: ours, ours-unchunked and TRL's "
                        "memory-saving setup; 'trl' for SFT adds TRL unpacked)")
    parser.add_argument("--budget-gib", type=float, default=0.0,
                        help="instead of the speed table: the largest batch of --seq tokens that trains in this "
                             "much memory, for each runner, from peaks at --budget-batches (2 steps each)")
    parser.add_argument("--budget-batches", default="1,2")
    parser.add_argument("--budget-runs", type=int, default=4, help="--budget-gib: at most this many runs past "
                        "the first two batches to bracket the answer")
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient checkpointing on both sides (its own rows: never compare with a run without)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping on both sides (0: none, as "
                        "runner ours-sib, the optimizer step in the backward, always runs)")
    parser.add_argument("--old-tree", default=None, help="runner ours-old: `ours` from this checkout (a `git worktree` "
                        "of an older commit), interleaved with today's, for speed A/Bs")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--who", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--specs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    specs = shared_specs(Path(args.shared))
    if specs is None:
        print(f"skipped: shared data not found under {args.shared}/data", file=sys.stderr)
        return 0
    import torch

    from gpt2chat.checkpoint import init_checkpoint
    from gpt2chat.config import get_preset
    from gpt2chat.evaluate.flops import measure_peaks, training_flops_per_token

    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="bench-train-"))
    ckpt = init_checkpoint("gpt2", workdir / "gpt2-random", template="llama3-context", seed=0)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    kinds = args.kinds.split(",")

    def runners_of(kind: str) -> list[str]:
        chosen = args.runners.split(",") if args.runners else list(RUNNERS[kind])
        return [who for who in chosen if who in ALL_RUNNERS[kind]]

    if args.budget_gib:
        batches = [int(b) for b in args.budget_batches.split(",")]
        fits: dict[str, dict] = {}
        for kind in kinds:
            points: dict[str, dict[int, float]] = {who: {} for who in runners_of(kind)}
            for batch in batches:
                for _, who in round_robin(runners_of(kind), 1):
                    points[who][batch] = run_child(who, kind, ckpt, specs, args, batch, 2, env)["peak_mb"]
            fits[kind] = {who: budget_fit(p, args.budget_gib * 1024) for who, p in points.items()}
            for who, fit in fits[kind].items():
                print(f"{kind} {who:>15}: peaks {fit['measured']} MiB, {fit['per_row_mb']:.0f} MiB per "
                      f"{args.seq}-token row -> {fit['max_batch']} x {args.seq} in {args.budget_gib:g} GiB "
                      "(predicted)", file=sys.stderr, flush=True)
                fit.update(verify_budget(
                    lambda batch, who=who, kind=kind: run_child(who, kind, ckpt, specs, args, batch, 2, env)["peak_mb"],
                    args.budget_gib * 1024, points[who], args.budget_runs))
                fit["measured"] = {str(b): round(m) for b, m in sorted(points[who].items())}
                print(f"{kind} {who:>15}: {fit['fits']} x {args.seq} measured under {args.budget_gib:g} GiB, "
                      f"{fit['over']} x {args.seq} over; peaks {fit['measured']} MiB")
        print(json.dumps({"benchmark": "train-budget", "seq_len": args.seq, "budget_gib": args.budget_gib,
                          "device": args.device, "checkpointing": args.checkpointing, **fits}))
        return 0

    def best_peak() -> float:
        # one 1024^3 matmul timing swings 80-135 GFLOP/s on a shared 2-core VM: keep the best of several
        return max(measure_peaks(args.device, torch.float32, repeats=5)["matmul_flops_per_s"] for _ in range(5))

    peak = best_peak()
    flops_per_token = training_flops_per_token(get_preset("gpt2"), args.seq)
    results: dict[str, dict[str, list[dict]]] = {}
    for kind in kinds:
        results[kind] = {who: [] for who in runners_of(kind)}
        for _, who in round_robin(runners_of(kind), args.repeats):
            results[kind][who].append(run_child(who, kind, ckpt, specs, args, args.batch_size, args.steps, env))

    peak = max(peak, best_peak())        # before and after the runs
    memory = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
    summary: dict[str, object] = {"benchmark": "train", "shape": "gpt2 124M random", "seq_len": args.seq,
                                  "batch_size": args.batch_size, "grad_accum": args.grad_accum, "steps": args.steps,
                                  "repeats": args.repeats, "threads": args.threads, "device": args.device,
                                  "checkpointing": args.checkpointing,
                                  "memory": memory, "matmul_peak_gflops": peak / 1e9, "torch": torch.__version__}
    print(f"\nGPT-2 124M (random), seq {args.seq}, {args.batch_size} x {args.grad_accum} per step, {args.device}, "
          f"gradient checkpointing {'on' if args.checkpointing else 'off'}, "
          f"{args.threads} threads, matmul peak {peak / 1e9:.1f} GFLOP/s; memory = {memory}")
    print(f"{'':14}{'run':>15}{'value':>9}{'ours/it':>8}{'MFU':>7}{'tok/step':>9}{'s/step':>7}"
          f"{'peak':>8}{'ours/it':>8}{'training':>9}{'ours/it':>8}")
    for kind, by in results.items():
        metric = "tokens_per_s" if kind == "sft" else "pairs_per_s"
        label = "SFT tokens/s" if kind == "sft" else "DPO pairs/s"
        ours = {key: statistics.median(r[key] for r in by["ours"]) for key in (metric, "peak_mb", "training_mb")}
        summary[kind] = {"metric": metric, "runs": by}
        for who, runs in by.items():
            row = {key: statistics.median(r[key] for r in runs) for key in (metric, "peak_mb", "training_mb",
                                                                               "tokens_per_step", "step_s")}
            row["mfu"] = statistics.median(r["tokens_per_s"] for r in runs) * flops_per_token / peak
            for key in (metric, "peak_mb", "training_mb"):
                row[f"ours_over_this_{key}"] = ours[key] / row[key]
            summary[kind][who] = row
            print(f"{label:14}{who:>15}{row[metric]:9.2f}{row[f'ours_over_this_{metric}']:8.2f}{row['mfu']:7.1%}"
                  f"{row['tokens_per_step']:9.0f}{row['step_s']:7.1f}{row['peak_mb']:7.0f}M"
                  f"{row['ours_over_this_peak_mb']:8.2f}{row['training_mb']:8.0f}M{row['ours_over_this_training_mb']:8.2f}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
