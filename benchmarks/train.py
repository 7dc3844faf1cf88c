"""Training throughput: our trainer against TRL's SFTTrainer and DPOTrainer on the GPT-2 124M shape.

    python -m benchmarks.train [--shared ../shared] [--steps 3] [--repeats 2] [--batch-size 1] [--grad-accum 2]

Same random weights (one checkpoint folder both load), same tokenized real data (OASST1 validation +
Alpaca subset for SFT, UltraFeedback train-1k for DPO, from ../shared/data; skipped cleanly without it),
sequence length 512, same effective batch (batch_size x grad_accum rows or pairs per step), same threads.
Each measurement is one child process (so peak RSS belongs to one trainer); ours and TRL's children
alternate. A run's rate is its total work over its total time, first step dropped (warmup); the table gives
the median over repeats.

- SFT: trained (non-pad) tokens / s. Ours packs short examples into 512-token rows. TRL runs twice: packed
  (`packing=True`, its best-fit-decreasing packing into 512-token padding-free rows: the like-for-like
  figure) and with its default (one example per row, padded). Both use assistant-only loss from the same masks.
- Precision: fp32 on both sides. TRL's configs default to `bf16=True` and `gradient_checkpointing=True`; on
  this CPU (no bf16 matmul units), bf16 autocast makes matmuls ~100x slower, and our trainer neither autocasts on CPU nor
  recomputes activations, so both are switched off for TRL (otherwise the comparison measures those).
- DPO: pairs / s, reference log-probs precomputed before training in both (not timed).
- MFU: model FLOPs (6 N per token run + attention, `gpt2chat.evaluate.flops`) / the best fp32 matmul rate
  measured before and after the runs (1024^3, the best of 5 x 5 timings).
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
SEQ = 512
RUNNERS = {"sft": ("ours", "trl-packed", "trl"), "dpo": ("ours", "trl")}


def shared_specs(shared: Path) -> dict[str, list[str]] | None:
    data = shared / "data"
    sft = [f"oasst1:{data / 'oasst1/en-validation.jsonl'}", f"alpaca:{data / 'alpaca/alpaca-subset-5k.json'}"]
    dpo = [f"ultrafeedback:{data / 'ultrafeedback/train-1k.jsonl'}"]
    if not all(Path(s.split(":", 1)[1]).is_file() for s in sft + dpo):
        return None
    return {"sft": sft, "dpo": dpo}


def load_examples(kind: str, specs: list[str], tokenizer, n: int):
    from gpt2chat.data import Budgets, build_preference_examples, build_sft_examples

    if kind == "sft":
        train, _, _ = build_sft_examples(specs, tokenizer, "llama3-context", Budgets.sft(SEQ), val_fraction=0.0)
    else:
        budgets = Budgets(max_prompt_length=256, max_response_length=256, max_length=SEQ)
        train, _, _ = build_preference_examples(specs, tokenizer, "llama3-context", budgets, val_fraction=0.0)
    return train[:n]


# ---------------------------------------------------------------------- children
def run_ours(kind: str, ckpt: str, specs: list[str], args) -> dict:
    import torch

    from gpt2chat.checkpoint import load_model
    from gpt2chat.train.batching import BatchPlan
    from gpt2chat.train.config import TrainConfig
    from gpt2chat.train.distributed import DistState
    from gpt2chat.train.objectives import DPOObjective, SFTObjective
    from gpt2chat.train.trainer import Trainer

    model, tokenizer = load_model(ckpt, device="cpu")
    rows = args.batch_size * args.grad_accum * args.steps
    examples = load_examples(kind, specs, tokenizer, rows * (8 if kind == "sft" else 1))
    cfg = TrainConfig(objective="sft" if kind == "sft" else "dpo", data=["bench"], out=tempfile.mkdtemp(),
                      lr=1e-5, batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.steps,
                      max_length=SEQ, pack=True, schedule="constant", progress=False, save_every=0).validate()
    plan = BatchPlan(examples, "sft" if kind == "sft" else "preference", batch_size=cfg.batch_size,
                     grad_accum=cfg.grad_accum, world_size=1, seed=0, max_length=SEQ,
                     pad_id=tokenizer.pad_token_id, pack=True)
    objective = SFTObjective() if kind == "sft" else DPOObjective(beta=0.1)
    model.train()
    trainer = Trainer(cfg, model, objective, plan, None, DistState(), torch.device("cpu"),
                      write_model=lambda m, f: None)
    trainer._save = lambda *a, **k: None          # no checkpoint writing inside the timed loop
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
    examples = load_examples(kind, specs, tokenizer, rows * (8 if kind == "sft" else 1))  # the same pool as ours
    clock = train_trl(kind, model, ckpt, tokenizer, examples, out=tempfile.mkdtemp(), batch_size=args.batch_size,
                      grad_accum=args.grad_accum, steps=args.steps, seq=SEQ, device="cpu", packed=packed)
    return rates(kind, clock.seconds[1:], clock.tokens[1:], args)


def child(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    specs = json.loads(args.specs)
    if args.who == "ours":
        result = run_ours(args.kind, args.ckpt, specs[args.kind], args)
    else:
        result = run_trl(args.kind, args.ckpt, specs[args.kind], args, packed=args.who == "trl-packed")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------- driver
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", default=str(REPO.parent / "shared"))
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is warmup)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--kinds", default="sft,dpo")
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

    def best_peak() -> float:
        # one 1024^3 matmul timing swings 80-135 GFLOP/s on a shared 2-core VM: keep the best of several
        return max(measure_peaks("cpu", torch.float32, repeats=5)["matmul_flops_per_s"] for _ in range(5))

    peak = best_peak()
    flops_per_token = training_flops_per_token(get_preset("gpt2"), SEQ)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, dict[str, list[dict]]] = {}
    for kind in args.kinds.split(","):
        runners = RUNNERS[kind]
        results[kind] = {who: [] for who in runners}
        for repeat, who in round_robin(runners, args.repeats):
            command = [sys.executable, "-m", "benchmarks.train", "--child", "--who", who, "--kind", kind, "--ckpt", str(ckpt),
                       "--specs", json.dumps(specs), "--steps", str(args.steps), "--batch-size",
                       str(args.batch_size), "--grad-accum", str(args.grad_accum), "--threads", str(args.threads)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if done.returncode != 0 or line is None:
                print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{who} {kind} run failed")
            results[kind][who].append(json.loads(line.removeprefix("RESULT ")))
            print(f"  {kind} {who} repeat {repeat}: {results[kind][who][-1]}", file=sys.stderr, flush=True)

    peak = max(peak, best_peak())        # before and after the runs
    summary: dict[str, object] = {"benchmark": "train", "shape": "gpt2 124M random", "seq_len": SEQ,
                                  "batch_size": args.batch_size, "grad_accum": args.grad_accum, "steps": args.steps,
                                  "repeats": args.repeats, "threads": args.threads,
                                  "matmul_peak_gflops": peak / 1e9, "torch": torch.__version__}
    print(f"\nGPT-2 124M (random), seq {SEQ}, {args.batch_size} x {args.grad_accum} per step, "
          f"{args.threads} threads, matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'':14}{'run':>12}{'value':>10}{'ours / it':>10}{'MFU':>8}{'tokens/step':>13}{'s/step':>8}{'peak RSS':>10}")
    for kind, by in results.items():
        metric = "tokens_per_s" if kind == "sft" else "pairs_per_s"
        label = "SFT tokens/s" if kind == "sft" else "DPO pairs/s"
        ours = statistics.median(r[metric] for r in by["ours"])
        summary[kind] = {"metric": metric, "runs": by}
        for who, runs in by.items():
            value = statistics.median(r[metric] for r in runs)
            row = {"value": value, "ours_over_this": ours / value,
                   "mfu": statistics.median(r["tokens_per_s"] for r in runs) * flops_per_token / peak,
                   "tokens_per_step": statistics.median(r["tokens_per_step"] for r in runs),
                   "step_s": statistics.median(r["step_s"] for r in runs),
                   "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
            summary[kind][who] = row
            print(f"{label:14}{who:>12}{value:10.2f}{row['ours_over_this']:10.2f}{row['mfu']:8.1%}"
                  f"{row['tokens_per_step']:13.0f}{row['step_s']:8.2f}{row['peak_rss_mb']:9.0f}M")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
