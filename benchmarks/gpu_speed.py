"""The speed parts of the GPU check (`python -m benchmarks.gpu_check` runs them; this module is not a command).

- speed-sft: SFT trained (non-pad) tokens/s and MFU of our trainer, 124M and 355M, sequence length 1024,
  packed (FlexAttention), bf16 autocast, dropout 0; the 124M shape with and without compiled blocks; and
  the LM head's matmul with the vocabulary padded to a multiple of 64 against the plain one.
- speed-dpo: DPO pairs/s of our trainer (shared-prompt rows, reference log-probs precomputed, not timed).
- speed-trl: TRL's SFTTrainer (packed, padding-free; and its padded default) and DPOTrainer on the same
  examples, same device, bf16, dropout 0; "not installed" without trl.
- decode: greedy tok/s of our Engine against transformers' `generate` at batch 1 and at 64 rows (32-token
  prompts, 128 new tokens, no early stop), interleaved repeats, medians; batch 1 against the read-bandwidth
  bound (every weight read once per token).

MFU divides model FLOPs by the bf16 matmul peak measured in the same run (the peak part). "MFU" counts
the convention nanoGPT and llm.c use: 6 N + attention over the full sequence for every token run
(`gpt2chat.evaluate.flops.training_flops_per_token`). "MFU run" counts what the step computes: our LM
head projects only the scored (assistant) positions, so it runs fewer FLOPs than the convention assumes.

The examples are synthetic chats made of words from the packaged sample data (so that text decodes and
re-tokenizes to the same ids for TRL), built into examples by the real data path and the llama3-context
template; lengths spread like chat data, up to the sequence length.
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile

import torch

from benchmarks.gpu_table import OK, Check, need, row, verdict
from benchmarks.peers import hf_greedy, hf_model, train_trl
from benchmarks.timing import round_robin, seconds_of

TEMPLATE = "llama3-context"


# ---------------------------------------------------------------------- data
def _words() -> list[str]:
    from importlib import resources

    text = (resources.files("gpt2chat") / "resources" / "quickstart_sft.jsonl").read_text(encoding="utf-8")
    words = [w for line in text.splitlines() for m in json.loads(line).get("messages", [])
             for w in str(m.get("content", "")).split() if w.isalpha()]
    return sorted(set(words)) or ["hello", "world"]


def _text(rng: random.Random, words: list[str], low: int, high: int) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))


def synthetic_sft(check: Check, tokenizer, n: int) -> list:
    """SFT examples of synthetic chats whose lengths spread from short to nearly the sequence length."""
    from gpt2chat.data import Budgets, build_sft_examples

    rng, words = random.Random(0), _words()
    longest = check.seq // 2
    path = check.work / "speed_sft.jsonl"
    with open(path, "w") as sink:
        for _ in range(n):
            messages = [{"role": "user", "content": _text(rng, words, 8, longest // 2)},
                        {"role": "assistant", "content": _text(rng, words, 8, longest)}]
            sink.write(json.dumps({"messages": messages}) + "\n")
    train, _, _ = build_sft_examples([f"messages:{path}"], tokenizer, TEMPLATE, Budgets.sft(check.seq),
                                     val_fraction=0.0, use_cache=False)
    return train


def synthetic_pairs(check: Check, tokenizer, n: int) -> list:
    from gpt2chat.data import Budgets, build_preference_examples

    rng, words = random.Random(1), _words()
    reply = check.seq // 5
    path = check.work / "speed_pref.jsonl"
    with open(path, "w") as sink:
        for _ in range(n):
            sink.write(json.dumps({"prompt": _text(rng, words, 8, check.seq // 4),
                                   "chosen": _text(rng, words, 8, reply),
                                   "rejected": _text(rng, words, 8, reply)}) + "\n")
    train, _, _ = build_preference_examples([f"ultrafeedback:{path}"], tokenizer, TEMPLATE,
                                            Budgets(max_length=check.seq), val_fraction=0.0, use_cache=False)
    return train


# ---------------------------------------------------------------------- our trainer
def _sizes(check: Check) -> dict:
    if check.smoke:
        return {"sft_batch": 2, "dpo_batch": 2, "warmup": 1, "steps": 2}
    return {"sft_batch": 16, "dpo_batch": 8, "warmup": 3, "steps": 12}


def run_ours(check: Check, shape: str, kind: str, examples: list, compile_blocks: bool, batch_size: int,
             steps: int, warmup: int) -> dict:
    """Our Trainer for `warmup + steps` steps; the rate of the last `steps` (work over time)."""
    from gpt2chat.checkpoint import load_model
    from gpt2chat.evaluate.flops import training_flops_per_token
    from gpt2chat.train.batching import BatchPlan
    from gpt2chat.train.config import TrainConfig
    from gpt2chat.train.distributed import DistState
    from gpt2chat.train.objectives import DPOObjective, SFTObjective
    from gpt2chat.train.recipes import set_dropout
    from gpt2chat.train.trainer import Trainer, autocast_for

    model, tokenizer = load_model(check.base(shape), device="cpu", dtype=torch.float32)
    set_dropout(model, 0.0)
    model.to(check.device).train()
    if compile_blocks:
        model.compile_blocks()
    objective_name = "sft" if kind == "sft" else "dpo"
    cfg = TrainConfig(objective=objective_name, data=["gpu_check"], out=tempfile.mkdtemp(dir=check.work), lr=1e-5,
                      batch_size=batch_size, grad_accum=1, max_steps=warmup + steps, max_length=check.seq,
                      pack=True, schedule="constant", progress=False, save_every=0, dropout=0.0).validate()
    plan = BatchPlan(examples, kind, batch_size=batch_size, grad_accum=1, world_size=1, seed=0,
                     max_length=check.seq, pad_id=tokenizer.pad_token_id, pack=True,
                     vocab_size=model.config.vocab_size, context=model.config.n_positions)
    autocast = autocast_for(cfg, check.device)
    objective = SFTObjective(autocast) if kind == "sft" else DPOObjective(beta=0.1, autocast=autocast)
    trainer = Trainer(cfg, model, objective, plan, None, DistState(), check.device, write_model=lambda m, f: None)
    trainer._save = lambda *args, **kwargs: None  # no checkpoint writing in a timed run
    if check.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(check.device)
    history = trainer.fit().history
    timed = history[warmup:]
    seconds = sum(r["step_time_s"] for r in timed)
    tokens = sum(r["tokens"] for r in timed)
    per_epoch = plan.steps_per_epoch()
    scored = sum(plan.step_totals(*divmod(step, per_epoch))["targets"] for step in range(warmup, warmup + steps))
    result = {"tokens_per_s": tokens / seconds, "step_s": seconds / len(timed), "tokens_per_step": tokens / len(timed),
              "pairs_per_s": batch_size * len(timed) / seconds if kind != "sft" else None,
              "warmup_s": sum(r["step_time_s"] for r in history[:warmup]),
              "peak_memory_gb": (torch.cuda.max_memory_allocated(check.device) / 1e9
                                 if check.device.type == "cuda" else None)}
    result.update(_mfu(check, model.config, tokens, scored, seconds, training_flops_per_token))
    del trainer, model
    return result


def _mfu(check: Check, config, tokens: int, scored: int, seconds: float, training_flops_per_token) -> dict:
    """MFU by the 6N + attention convention, and by the FLOPs the step runs (the LM head on scored
    positions only), both over the measured peak."""
    if not check.peaks:
        return {"mfu": None, "mfu_run": None}
    peak = check.peaks["matmul_flops_per_s"]
    per_token = training_flops_per_token(config, check.seq)
    head = 3 * 2 * config.vocab_size * config.n_embd  # forward + backward of the LM head, per position
    convention = tokens * per_token
    run = convention - (tokens - scored) * head
    return {"mfu": convention / seconds / peak, "mfu_run": run / seconds / peak}


def _needed(batch_size: int, steps: int, per_row: float) -> int:
    return int(batch_size * steps * per_row) + 8


def part_sft(check: Check) -> list[dict]:
    from gpt2chat.checkpoint import load_model

    sizes = _sizes(check)
    total = sizes["warmup"] + sizes["steps"]
    _, tokenizer = load_model(check.base(), device="cpu")
    examples = synthetic_sft(check, tokenizer, _needed(sizes["sft_batch"], total, 3.5))
    rows = []
    if check.device.type == "cuda":  # the recipes' default there: compiled blocks; eager to show what it pays
        runs = [(check.shapes["small"], True), (check.shapes["small"], False), (check.shapes["medium"], True)]
    else:  # compiling did not pay on CPU, so the default is eager; the smoke shapes are one
        runs = [(check.shapes["small"], False)]
    for shape, compiled in runs:
        results = [run_ours(check, shape, "sft", examples, compiled, sizes["sft_batch"], sizes["steps"],
                            sizes["warmup"]) for _ in range(check.repeats)]
        result = {k: statistics.median(r[k] for r in results) if results[0][k] is not None else None
                  for k in results[0]}
        mfu = f", MFU {result['mfu']:.0%} (run {result['mfu_run']:.0%})" if result["mfu"] is not None else ""
        target = "MFU >= 50%" if shape == "gpt2" and compiled else ""
        check.measured[("sft", shape, compiled)] = result
        rows.append(row("speed", f"SFT {check.label(shape)}, ours, {'compiled' if compiled else 'eager'} blocks", OK,
                        f"{result['tokens_per_s']:,.0f} tok/s{mfu}", target,
                        f"seq {check.seq}, {sizes['sft_batch']} rows/step, {result['tokens_per_step']:.0f} tok/step, "
                        f"{result['step_s'] * 1e3:.0f} ms/step; warmup {result['warmup_s']:.0f} s"
                        + (f"; peak {result['peak_memory_gb']:.1f} GB" if result["peak_memory_gb"] else ""),
                        shape=shape, compiled=compiled, **result))
    rows.append(_head_padding(check, tokenizer))
    return rows


def _head_padding(check: Check, tokenizer) -> dict:
    """The LM head's forward + backward at the real vocabulary (GPT-2 + template tokens) against the same
    with the weight padded to a multiple of 64 rows, as the model does while training on CUDA."""
    import torch.nn.functional as F

    from gpt2chat.config import get_preset

    vocab, width = len(tokenizer), get_preset(check.shapes["small"]).n_embd
    positions, repeats = (64, 3) if check.smoke else (16384, 10)
    dtype = check.dtype
    hidden = torch.randn(positions, width, device=check.device, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, width, device=check.device, dtype=dtype, requires_grad=True)

    def step(pad: int) -> None:
        used = F.pad(weight, (0, 0, 0, pad)) if pad else weight
        F.linear(hidden, used)[..., :vocab].sum().backward()

    pad = -vocab % 64
    seconds = {}
    for name, extra in (("plain", 0), ("padded", pad)):
        step(extra)
        seconds[name] = statistics.median(seconds_of(lambda extra=extra: step(extra), check.device)
                                          for _ in range(repeats))
    speedup = seconds["plain"] / seconds["padded"]
    return row("speed", f"LM head fwd+bwd, vocab {vocab} padded to {vocab + pad}", OK, f"{speedup:.2f}x",
               "> 1 keeps the padding", f"{positions} positions: {seconds['plain'] * 1e3:.2f} ms plain, "
               f"{seconds['padded'] * 1e3:.2f} ms padded", speedup=speedup, **seconds)


def part_dpo(check: Check) -> list[dict]:
    from gpt2chat.checkpoint import load_model

    sizes = _sizes(check)
    _, tokenizer = load_model(check.base(), device="cpu")
    pairs = synthetic_pairs(check, tokenizer, sizes["dpo_batch"] * (sizes["warmup"] + sizes["steps"]))
    shape = check.shapes["small"]
    compiled = check.device.type == "cuda"
    result = run_ours(check, shape, "preference", pairs, compiled, sizes["dpo_batch"], sizes["steps"], sizes["warmup"])
    check.measured["dpo"] = result
    mfu = f", MFU {result['mfu']:.0%}" if result["mfu"] is not None else ""
    return [row("speed", f"DPO {check.label(shape)}, ours", OK, f"{result['pairs_per_s']:.1f} pairs/s{mfu}", "",
                f"{sizes['dpo_batch']} pairs/step, {result['tokens_per_step']:.0f} tok/step (prompt once), "
                f"{result['step_s'] * 1e3:.0f} ms/step", shape=shape, **result)]


# ---------------------------------------------------------------------- TRL
def run_trl(check: Check, kind: str, examples: list, batch_size: int, steps: int, warmup: int,
            packed: bool = True) -> dict:
    from gpt2chat.checkpoint import load_model
    from gpt2chat.evaluate.flops import training_flops_per_token

    folder = check.base()
    _, tokenizer = load_model(folder, device="cpu")
    model = hf_model(folder, torch.float32, check.device, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model.train()
    times = train_trl(kind, model, folder, tokenizer, examples, out=tempfile.mkdtemp(dir=check.work),
                      batch_size=batch_size, grad_accum=1, steps=warmup + steps, seq=check.seq, device=check.device,
                      packed=packed)
    seconds, tokens = sum(times.seconds[warmup:]), sum(times.tokens[warmup:])
    n = len(times.seconds[warmup:])
    result = {"tokens_per_s": tokens / seconds, "step_s": seconds / n, "tokens_per_step": tokens / n,
              "pairs_per_s": batch_size * n / seconds if kind != "sft" else None}
    if check.peaks:
        flops = training_flops_per_token(model.config, check.seq)
        result["mfu"] = result["tokens_per_s"] * flops / check.peaks["matmul_flops_per_s"]
    del model
    return result


def part_trl(check: Check) -> list[dict]:
    need("trl", "datasets")
    from gpt2chat.checkpoint import load_model

    sizes = _sizes(check)
    total = sizes["warmup"] + sizes["steps"]
    _, tokenizer = load_model(check.base(), device="cpu")
    rows = []
    ours_sft = check.measured.get(("sft", check.shapes["small"], check.device.type == "cuda"))
    examples = synthetic_sft(check, tokenizer, _needed(sizes["sft_batch"], total, 3.5))
    for packed in (True, False):
        theirs = run_trl(check, "sft", examples, sizes["sft_batch"], sizes["steps"], sizes["warmup"], packed)
        ratio = f"; ours / TRL {ours_sft['tokens_per_s'] / theirs['tokens_per_s']:.2f}x" if ours_sft else ""
        mfu = f", MFU {theirs['mfu']:.0%}" if theirs.get("mfu") is not None else ""
        rows.append(row("speed", f"SFT {check.label(check.shapes['small'])}, TRL {'packed' if packed else 'padded'}",
                        OK, f"{theirs['tokens_per_s']:,.0f} tok/s{mfu}{ratio}", "ours >= 2x" if packed else "",
                        f"{theirs['tokens_per_step']:.0f} tok/step, {theirs['step_s'] * 1e3:.0f} ms/step; "
                        + ("padding-free BFD, attention through transformers' sdpa" if packed else "one example per row"),
                        packed=packed, **theirs))
    ours_dpo = check.measured.get("dpo")
    pairs = synthetic_pairs(check, tokenizer, sizes["dpo_batch"] * total)
    theirs = run_trl(check, "preference", pairs, sizes["dpo_batch"], sizes["steps"], sizes["warmup"])
    ratio = f"; ours / TRL {ours_dpo['pairs_per_s'] / theirs['pairs_per_s']:.2f}x" if ours_dpo else ""
    rows.append(row("speed", f"DPO {check.label(check.shapes['small'])}, TRL", OK,
                    f"{theirs['pairs_per_s']:.1f} pairs/s{ratio}", "ours >= 2x",
                    f"{theirs['tokens_per_step']:.0f} tok/step, {theirs['step_s'] * 1e3:.0f} ms/step", **theirs))
    return rows


# ---------------------------------------------------------------------- decode
def part_decode(check: Check) -> list[dict]:
    """Our Engine, eager and (on CUDA) with its compiled, CUDA-graphed decode step, against transformers."""
    need("transformers")
    from gpt2chat.engine import Engine
    from gpt2chat.quantize import decode_read_bytes, load_for_inference
    from gpt2chat.sampling import SamplingParams

    folder = check.base()
    model, tokenizer = load_for_inference(folder, device=check.device, dtype=check.dtype)
    rows_wide = 4 if check.smoke else 64
    engines = {"eager": Engine(model, device=check.device, dtype=check.dtype, max_batch_size=rows_wide)}
    if check.device.type == "cuda":  # compiling the step takes minutes on a CPU; on CUDA it is the fast path
        engines["graphs"] = Engine(model, device=check.device, dtype=check.dtype, max_batch_size=rows_wide,
                                   compile=True)
    theirs = hf_model(folder, check.dtype, check.device)
    new_tokens, prompt_tokens, repeats = (8, 8, 1) if check.smoke else (128, 32, 3)
    generator = torch.Generator().manual_seed(5)
    prompts = torch.randint(0, 50257, (rows_wide, prompt_tokens), generator=generator)
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens)
    weight_bytes = decode_read_bytes(model)
    dtype = str(check.dtype).removeprefix("torch.")
    rows = []
    for batch in (1, rows_wide):
        ours_prompts, theirs_prompts = prompts[:batch].tolist(), prompts[:batch].to(check.device)
        runs = {name: (lambda e=engine, p=ours_prompts: e.generate(p, params)) for name, engine in engines.items()}
        runs["transformers"] = lambda p=theirs_prompts: hf_greedy(theirs, p, new_tokens, tokenizer.pad_token_id)
        tokens = {name: run() for name, run in runs.items()}  # warm-up (and compile), and the tokens compared
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for _, name in round_robin(list(runs), repeats):
            seconds[name].append(seconds_of(runs[name], check.device))
        rate = {name: batch * new_tokens / statistics.median(values) for name, values in seconds.items()}
        best = max(engines, key=lambda name: rate[name])
        detail = (f"{prompt_tokens}-token prompts, {new_tokens} new tokens, prefill included, median of {repeats}; "
                  + ", ".join(f"{name} {rate[name]:,.0f}" for name in engines))
        bound = None
        if batch == 1 and check.peaks:
            bound = check.peaks["read_bytes_per_s"] / weight_bytes
            detail += f"; read bound {bound:,.0f} tok/s (ours {rate[best] / bound:.0%})"
        label = f"{batch} row{'s' if batch > 1 else ''}, {dtype}"
        rows.append(row("decode", f"greedy decode, {label}", OK,
                        f"ours ({best}) {rate[best]:,.0f} tok/s, transformers {rate['transformers']:,.0f} "
                        f"({rate[best] / rate['transformers']:.2f}x)", ">= 1,000 tok/s" if batch == 1 else "", detail,
                        rows=batch, tokens_per_s=rate, bound_tokens_per_s=bound, seconds=seconds))
        if "graphs" in tokens:  # a stale position or cache slot in the graph would give other tokens from there on
            pairs = [(a, b) for x, y in zip(tokens["graphs"], tokens["eager"], strict=True)
                     for a, b in zip(x.token_ids, y.token_ids, strict=False)]
            agree = sum(a == b for a, b in pairs) / max(1, len(pairs))
            rows.append(row("decode", f"CUDA-graph step vs eager step, {label}", verdict(agree >= 0.9),
                            f"{agree:.0%} of greedy tokens agree", ">= 90%",
                            "bf16: fused kernels round differently, so near ties of random weights may flip",
                            agree=agree))
    return rows
