"""The GPU check: one command that proves the CUDA path works and measures it, on one device, in minutes.

    python -m benchmarks.gpu_check [--out runs/gpu_check] [--budget-s 470] [--parts NAME,...] [--repeats 1]
    python -m benchmarks.gpu_check --smoke          # the same code on CPU, tiny shape, small counts (CI)

Parts, in order (each guarded: a failure, a missing package or a time-out is a row of the table, and the
next part still runs; each has a time budget, cut to what is left of `--budget-s`):

- env: device, torch / CUDA versions, which optional packages are importable.
- peak: the bf16 matmul peak (8192^3, best of several) and the read bandwidth, measured in this run.
- parity: our logits and greedy tokens against `transformers` on the device, fp32 and bf16.
- losses: DPO / ORPO losses and gradients on the device against their CPU values (FlexAttention on CUDA
  against SDPA with a dense mask on CPU), and packed SFT with FlexAttention against the dense mask.
- training: a few SFT / DPO / ORPO / LoRA steps of the small shape through the recipes; the losses fall.
- roundtrip: save + load gives the same logits; transformers loads the folder; the vocabulary is not padded.
- generate / chat / serve: `Engine.generate`, a `ChatSession` turn, a request to `gpt2chat serve`.
- speed (benchmarks/gpu_speed.py): SFT trained tokens/s and MFU (124M and 355M, sequence length 1024,
  packed, bf16) with and without compile, the padded LM head, DPO pairs/s, the same for TRL where it is
  installed, decode tok/s at batch 1 and 64 rows against `transformers` `generate`.

Writes OUT/gpu_check.md (the table) and OUT/gpu_check.jsonl (one JSON object per row), rewritten after
every part so a run cut short still leaves its rows; prints the table at the end. Exits 1 when a
correctness row failed, 0 otherwise. Optional packages (trl, fastapi, uvicorn) are imported only by the
parts that need them, which report "not installed" without them (benchmarks/README.md says how to bring
them as wheels). The speed parts live in benchmarks/gpu_speed.py, the rows and state both use in
benchmarks/gpu_table.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import sysconfig
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import gpu_speed
from benchmarks.gpu_table import (
    FAIL,
    MISSING,
    OK,
    SKIPPED,
    TIMEOUT,
    Check,
    NotInstalled,
    PartTimeout,
    need,
    row,
    verdict,
)
from benchmarks.peers import hf_greedy, hf_model
from benchmarks.serve_process import ServeProcess


# ---------------------------------------------------------------------- correctness parts
def part_env(check: Check) -> list[dict]:
    versions = {}
    for name in ("transformers", "peft", "trl", "fastapi", "uvicorn", "telegram", "datasets"):
        spec = importlib.util.find_spec(name)
        if spec is None:
            versions[name] = None
            continue
        from importlib import metadata

        dist = {"telegram": "python-telegram-bot"}.get(name, name)
        try:
            versions[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[name] = "?"
    if check.device.type == "cuda":
        props = torch.cuda.get_device_properties(check.device)
        device = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"
        detail = f"torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}"
    else:
        device, detail = "CPU (smoke run)", f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    packages = ", ".join(f"{k} {v or 'not installed'}" for k, v in versions.items())
    return [row("env", "device", OK, device, detail=detail, torch=torch.__version__, cuda=torch.version.cuda),
            row("env", "packages", OK, packages, versions=versions)]


def part_peak(check: Check) -> list[dict]:
    from gpt2chat.evaluate.flops import measure_peaks

    size = 256 if check.smoke else 8192
    read_bytes = (64 << 20) if check.smoke else None  # None: 1 GiB
    peaks = [measure_peaks(check.device, check.dtype, matmul_size=size, read_bytes=read_bytes,
                           repeats=3 if check.smoke else 10) for _ in range(1 if check.smoke else 2)]
    best = max(peaks, key=lambda p: p["matmul_flops_per_s"])
    check.peaks = best
    dtype = str(check.dtype).removeprefix("torch.")
    flops = best["matmul_flops_per_s"]
    shown = f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"
    rows = [row("peak", f"matmul {dtype} {size}^3", OK, shown,
                detail="best of the timings; MFU below divides by it", **best)]
    rows.append(row("peak", "read bandwidth", OK, f"{best['read_bytes_per_s'] / 1e9:.0f} GB/s",
                    detail=f"float32 sum() over {best['read_bytes'] / 2**20:.0f} MiB, best of the timings"))
    return rows


def part_parity(check: Check) -> list[dict]:
    need("transformers")
    from gpt2chat.checkpoint import load_model
    from gpt2chat.engine import Engine
    from gpt2chat.sampling import SamplingParams

    folder = check.base()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (4, 16 if check.smoke else 64), generator=generator).to(check.device)
    new_tokens = 8 if check.smoke else 32
    rows, reference = [], {}
    for dtype in dict.fromkeys((torch.float32, check.dtype if check.device.type == "cuda" else torch.bfloat16)):
        name = str(dtype).removeprefix("torch.")
        ours, tokenizer = load_model(folder, device=check.device, dtype=dtype)
        theirs = hf_model(folder, dtype, check.device)
        with torch.inference_mode():
            logits = {"ours": ours.eval()(ids).float(), "theirs": theirs(ids).logits.float()}
        if dtype == torch.float32:
            reference = logits
            diff = (logits["ours"] - logits["theirs"]).abs().max().item()
            rows.append(row("parity", f"logits {name} vs transformers", verdict(diff < 1e-3), f"max |diff| {diff:.2e}",
                            "< 1e-3", max_abs_diff=diff))
        else:
            errors = {side: (logits[side] - reference[side]).abs().max().item() for side in logits}
            passed = errors["ours"] <= 1.5 * errors["theirs"] + 1e-3
            rows.append(row("parity", f"logits {name} vs fp32", verdict(passed),
                            f"ours {errors['ours']:.3f}, transformers {errors['theirs']:.3f}",
                            "ours <= 1.5x theirs", detail="max |logit - own fp32 logit|", **errors))
        engine = Engine(ours, device=check.device, dtype=dtype)
        params = SamplingParams(temperature=0, max_new_tokens=new_tokens)
        prompts = ids[:2]
        mine = [r.token_ids for r in engine.generate(prompts.tolist(), params)]
        peer = hf_greedy(theirs, prompts, new_tokens, tokenizer.pad_token_id).tolist()
        agree = sum(a == b for x, y in zip(mine, peer, strict=True) for a, b in zip(x, y, strict=True))
        fraction = agree / (len(mine) * new_tokens)
        exact = dtype == torch.float32
        rows.append(row("parity", f"greedy tokens {name} (Engine vs generate)",
                        verdict(fraction == 1.0) if exact else OK, f"{fraction:.0%} agree",
                        "100%" if exact else "", "" if exact else "random weights: bf16 rounding flips near ties",
                        agree=fraction))
        del ours, theirs, engine
    return rows


@dataclass
class _Pair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str = "gpu_check"


@dataclass
class _Example:
    input_ids: list[int]
    assistant_mask: list[int]
    source: str = "gpu_check"


def _random_pairs(n: int, vocab: int, seed: int, longest: int) -> list[_Pair]:
    generator = torch.Generator().manual_seed(seed)

    def ids(low, high):
        length = int(torch.randint(low, high, (1,), generator=generator))
        return torch.randint(0, vocab, (length,), generator=generator).tolist()

    return [_Pair(ids(8, longest // 2), ids(4, longest // 4), ids(4, longest // 4)) for _ in range(n)]


def _loss_and_grads(model, objective, batch, totals) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, _ = objective.micro_loss(model, batch, totals)
    loss.backward()
    return loss.item(), {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}


def _grad_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |difference| of two gradient sets over the largest |gradient| (relative to the whole model)."""
    scale = max(g.abs().max().item() for g in a.values())
    return max((a[n] - b[n]).abs().max().item() for n in a) / max(scale, 1e-30)


def part_losses(check: Check) -> list[dict]:
    import copy

    from gpt2chat.attention_plan import AttentionPlan
    from gpt2chat.config import get_preset
    from gpt2chat.losses import sft_loss
    from gpt2chat.model import GPT
    from gpt2chat.train.batching import BatchPlan
    from gpt2chat.train.objectives import DPOObjective, ORPOObjective

    torch.manual_seed(0)
    config = get_preset(check.shapes["small"]).replace(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cpu_model = GPT(config).train()
    device_model = copy.deepcopy(cpu_model).to(check.device)
    pairs = _random_pairs(4, config.vocab_size, seed=1, longest=min(check.seq, 256))
    plan = BatchPlan(pairs, "preference", batch_size=4, grad_accum=1, world_size=1, seed=0, max_length=check.seq,
                     pad_id=0, vocab_size=config.vocab_size, context=config.n_positions)
    batch, totals = plan.micro_batches(0, 0, 0)[0], plan.step_totals(0, 0)
    rows = []
    reference = torch.randn(len(pairs), 2, generator=torch.Generator().manual_seed(2)) * 5 - 300
    for name, objective in (("DPO", DPOObjective(beta=0.1)), ("ORPO", ORPOObjective(beta=0.1))):
        if isinstance(objective, DPOObjective):
            objective.ref_logps["train"] = reference
        cpu_loss, cpu_grads = _loss_and_grads(cpu_model, objective, batch, totals)
        device_loss, device_grads = _loss_and_grads(device_model, objective, batch.to(check.device), totals)
        loss_error = abs(device_loss - cpu_loss) / max(1.0, abs(cpu_loss))
        grad_error = _grad_error(cpu_grads, device_grads)
        rows.append(row("losses", f"{name} loss + gradients, {check.device.type} vs CPU",
                        verdict(loss_error < 1e-4 and grad_error < 1e-3),
                        f"loss {device_loss:.5f} vs {cpu_loss:.5f}; grads rel {grad_error:.1e}",
                        "loss 1e-4, grads 1e-3", "fp32; shared-prompt rows; FlexAttention on CUDA, dense mask on CPU",
                        loss=device_loss, cpu_loss=cpu_loss, loss_error=loss_error, grad_error=grad_error))
        if check.device.type == "cuda":
            objective.autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
            bf16_loss, _ = _loss_and_grads(device_model, objective, batch.to(check.device), totals)
            relative = abs(bf16_loss - cpu_loss) / max(1.0, abs(cpu_loss))
            rows.append(row("losses", f"{name} loss, bf16 autocast vs CPU fp32", verdict(relative < 2e-2),
                            f"{bf16_loss:.5f} vs {cpu_loss:.5f}", "2e-2 relative", relative_error=relative))
    # Packed SFT: FlexAttention against the dense mask on the same device.
    examples = [_Example(p.prompt_ids + p.chosen_ids, [0] * len(p.prompt_ids) + [1] * len(p.chosen_ids))
                for p in _random_pairs(12, config.vocab_size, seed=3, longest=min(check.seq, 256))]
    sft_plan = BatchPlan(examples, "sft", batch_size=2, grad_accum=1, world_size=1, seed=0, max_length=check.seq,
                         pad_id=0, pack=True)
    packed = sft_plan.micro_batches(0, 0, 0)[0].to(check.device)
    results = {}
    for kernel in ("dense", "flex"):
        with torch.set_grad_enabled(check.device.type == "cuda"):  # CPU FlexAttention has no backward
            device_model.zero_grad(set_to_none=True)
            attention = AttentionPlan.packed(config, packed.segment_ids, packed.position_ids, kernel=kernel)
            logits = device_model(packed.input_ids, attention, select=packed.scored.index)
            loss, _ = sft_loss(logits, packed.scored.targets)
            grads = {}
            if loss.requires_grad:
                loss.backward()
                grads = {n: p.grad.float().cpu() for n, p in device_model.named_parameters() if p.grad is not None}
        results[kernel] = (loss.item(), grads)
    (dense_loss, dense_grads), (flex_loss, flex_grads) = results["dense"], results["flex"]
    loss_error = abs(flex_loss - dense_loss) / max(1.0, abs(dense_loss))
    grad_error = _grad_error(dense_grads, flex_grads) if dense_grads else 0.0
    rows.append(row("losses", "packed SFT: FlexAttention vs dense mask", verdict(loss_error < 1e-4 and grad_error < 1e-3),
                    f"loss {flex_loss:.5f} vs {dense_loss:.5f}; grads rel {grad_error:.1e}", "loss 1e-4, grads 1e-3",
                    "" if dense_grads else "CPU: forward only (FlexAttention has no CPU backward)",
                    loss_error=loss_error, grad_error=grad_error))
    return rows


def _falls(losses: list[float]) -> bool:
    half = max(1, len(losses) // 2)
    return sum(losses[-half:]) / half < sum(losses[:half]) / half


def part_training(check: Check) -> list[dict]:
    from gpt2chat.train.recipes import run_dpo, run_orpo, run_sft

    steps, batch_size = (4, 2) if check.smoke else (8, 8)
    # two batches' worth of examples, seen again and again: the loss of a working trainer falls fast
    common = {"data": ["sample"], "max_steps": steps, "batch_size": batch_size,
              "max_length": check.seq if check.smoke else 512, "schedule": "constant", "progress": False,
              "save_every": 0, "dropout": 0.0, "device": str(check.device), "seed": 0,
              "max_examples": 2 * batch_size}
    stages: list[tuple[str, Callable, dict]] = [
        ("SFT", run_sft, {"model": str(check.base()), "lr": 1e-3 if check.smoke else 3e-4}),
        ("DPO", run_dpo, {"lr": 1e-3 if check.smoke else 1e-4}),
        ("ORPO", run_orpo, {"lr": 1e-3 if check.smoke else 1e-4}),
        ("LoRA SFT", run_sft, {"model": str(check.base()), "lr": 3e-3, "lora_r": 8}),
    ]
    rows = []
    for name, run, options in stages:
        if name in ("DPO", "ORPO"):
            if check.trained is None:
                rows.append(row("training", f"{name} steps", SKIPPED, detail="needs the SFT model"))
                continue
            options = {**options, "model": str(check.trained)}
        out = check.work / name.lower().replace(" ", "-")
        started = time.perf_counter()
        try:
            result = run(out=str(out), **common, **options)
        except Exception as exc:  # one stage failing must not hide the others
            rows.append(row("training", f"{name} steps", FAIL, detail=_short_error(exc)))
            continue
        losses = [r["loss"] for r in result.history]
        if name == "SFT":
            check.trained = result.final_dir
        rows.append(row("training", f"{name}: {steps} steps, {check.label(check.shapes['small'])}",
                        verdict(_falls(losses) and result.final_dir is not None),
                        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}", "falls",
                        f"{time.perf_counter() - started:.0f} s with data, compile and saving", losses=losses))
    return rows


def part_roundtrip(check: Check) -> list[dict]:
    need("transformers")
    from safetensors import safe_open

    from gpt2chat.checkpoint import load_model, save_pretrained

    folder = check.trained or check.base()
    model, tokenizer = load_model(folder, device=check.device, dtype=torch.float32)
    again_dir = check.work / "roundtrip"
    save_pretrained(model, tokenizer, again_dir, template=tokenizer.template_name or "llama3-context")
    again, _ = load_model(again_dir, device=check.device, dtype=torch.float32)
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(4)).to(check.device)
    with torch.inference_mode():
        first, second = model.eval()(ids), again.eval()(ids)
        theirs = hf_model(again_dir, torch.float32, check.device)(ids).logits
    with safe_open(str(again_dir / "model.safetensors"), "pt") as f:
        rows_saved = f.get_slice("transformer.wte.weight").get_shape()[0]
    peer_diff = (theirs - first).abs().max().item()
    return [
        row("roundtrip", "save + load: same logits", verdict(torch.equal(first, second)), "bit-identical"
            if torch.equal(first, second) else f"max |diff| {(first - second).abs().max().item():.2e}"),
        row("roundtrip", "transformers loads the saved folder", verdict(peer_diff < 1e-3), f"max |diff| {peer_diff:.2e}",
            "< 1e-3"),
        row("roundtrip", "saved vocabulary = tokenizer (not padded)", verdict(rows_saved == len(tokenizer)),
            f"{rows_saved} rows, {len(tokenizer)} tokens"),
    ]


def part_generate(check: Check) -> list[dict]:
    from gpt2chat.chat import ChatSession
    from gpt2chat.engine import Engine
    from gpt2chat.quantize import load_for_inference
    from gpt2chat.sampling import SamplingParams
    from gpt2chat.templates import render_chat

    folder = check.trained or check.base()
    model, tokenizer = load_for_inference(folder, device=check.device, dtype=check.dtype)
    engine = Engine(model, device=check.device, dtype=check.dtype)
    template = tokenizer.template_name or "llama3-context"
    ids, _ = render_chat(tokenizer, [{"role": "user", "content": "Hello! Who are you?"}], template=template,
                         add_generation_prompt=True)
    result = engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=16))[0]
    text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    session = ChatSession(engine, tokenizer, template, params=SamplingParams(temperature=0.8, max_new_tokens=24,
                                                                              seed=0))
    reply = "".join(session.send("What is the capital of France?"))
    return [
        row("generate", f"Engine.generate on {check.device.type} ({str(check.dtype).removeprefix('torch.')})",
            verdict(len(result.token_ids) > 0 and result.finish_reason in ("stop", "length")),
            f"{len(result.token_ids)} tokens, {result.finish_reason}", detail=repr(text[:60])),
        row("generate", "ChatSession turn", verdict(len(session.history) == 2), f"{len(reply)} characters",
            detail=repr(reply[:60])),
    ]


def part_serve(check: Check) -> list[dict]:
    need("fastapi", "uvicorn")
    folder = check.trained or check.base()
    options = ["--model-name", "gpt2chat"] + (["--device", "cpu"] if check.smoke else [])
    with ServeProcess(folder, check.work / "serve.log", *options) as server:
        started = time.perf_counter()
        server.wait_ready(timeout=120)
        ready = time.perf_counter() - started
        body = json.dumps({"model": "gpt2chat", "max_tokens": 16, "temperature": 0,
                           "messages": [{"role": "user", "content": "Hi there!"}]}).encode()
        request = urllib.request.Request(f"{server.url}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        tick = time.perf_counter()
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        seconds = time.perf_counter() - tick
    content = answer["choices"][0]["message"]["content"]
    tokens = answer["usage"]["completion_tokens"]
    return [row("serve", "POST /v1/chat/completions to `gpt2chat serve`",
                verdict(isinstance(content, str) and tokens >= 1), f"{tokens} tokens in {seconds:.2f} s",
                detail=f"server ready in {ready:.0f} s; {content[:50]!r}", completion_tokens=tokens)]


# ---------------------------------------------------------------------- the driver
def _short_error(exc: BaseException) -> str:
    """The error in one line, with the innermost line of our code (not a library's) that led to it."""
    library = (sysconfig.get_paths()["stdlib"], "site-packages", "dist-packages")
    frames = traceback.extract_tb(exc.__traceback__)
    where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames)
                  if not any(part in f.filename for part in library)), "")
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return f"{text[:300]}{' at ' + where if where else ''}"


def _on_alarm(signum, frame):
    raise PartTimeout()


def run_part(check: Check, name: str, budget_s: float, function: Callable[[Check], list[dict]]) -> list[dict]:
    """One part under its time budget (sized for the GPU run; a CPU smoke run on a shared machine gets four
    times as long, since there the point is that the code runs); whatever happens, rows come back."""
    budget = int(max(1, min(budget_s * (4 if check.smoke else 1), check.seconds_left())))
    if check.seconds_left() < 5:
        return [row(name, name, SKIPPED, detail="no time left in --budget-s")]
    started = time.perf_counter()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(budget)
    try:
        rows = function(check)
    except NotInstalled as exc:
        rows = [row(name, name, MISSING, detail=f"needs {exc} (see benchmarks/README.md: wheels)")]
    except PartTimeout:
        rows = [row(name, name, TIMEOUT, detail=f"over its budget of {budget} s")]
    except Exception as exc:
        rows = [row(name, name, FAIL, detail=_short_error(exc))]
    finally:
        signal.alarm(0)
        if check.device.type == "cuda":
            torch.cuda.empty_cache()
    seconds = time.perf_counter() - started
    for r in rows:
        r["seconds"] = round(seconds, 1)
    return rows


def markdown(check: Check) -> str:
    head = "| part | check | status | result | target | detail |\n|---|---|---|---|---|---|\n"
    lines = [f"| {r['part']} | {r['check']} | {r['status']} | {r['result']} | {r['target']} | "
             f"{r['detail'].replace('|', '/')} |" for r in check.rows]
    return head + "\n".join(lines) + "\n"


def write(check: Check) -> None:
    check.out.mkdir(parents=True, exist_ok=True)
    (check.out / "gpu_check.md").write_text(markdown(check))
    with open(check.out / "gpu_check.jsonl", "w") as sink:
        for r in check.rows:
            sink.write(json.dumps(r, default=str) + "\n")


def parts() -> list[tuple[str, float, Callable[[Check], list[dict]]]]:
    return [
        ("env", 15, part_env),
        ("peak", 30, part_peak),
        ("parity", 60, part_parity),
        ("losses", 75, part_losses),
        ("speed-sft", 150, gpu_speed.part_sft),
        ("decode", 120, gpu_speed.part_decode),
        ("training", 150, part_training),
        ("roundtrip", 30, part_roundtrip),
        ("generate", 45, part_generate),
        ("serve", 75, part_serve),
        ("speed-dpo", 75, gpu_speed.part_dpo),
        ("speed-trl", 90, gpu_speed.part_trl),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shape, small counts (the CI run)")
    parser.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.md / gpu_check.jsonl")
    parser.add_argument("--budget-s", type=float, default=470, help="wall-clock budget of the whole check")
    parser.add_argument("--parts", default=None, help="comma-separated part names to run (default: all)")
    parser.add_argument("--repeats", type=int, default=1, help="repeats of each training speed run")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA device; run with --smoke for the CPU version", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        check = Check(smoke=args.smoke, out=Path(args.out), work=Path(work), repeats=args.repeats,
                      deadline=started + args.budget_s)
        chosen = set(args.parts.split(",")) if args.parts else None
        for name, budget, function in parts():
            if chosen is not None and name not in chosen:
                continue
            rows = run_part(check, name, budget, function)
            check.rows.extend(rows)
            write(check)
            for r in rows:
                print(f"[{name}] {r['check']}: {r['status']} {r['result']} {r['detail']}", file=sys.stderr, flush=True)
    print(markdown(check))
    print(f"{time.monotonic() - started:.0f} s; table and JSON lines in {check.out}")
    return 1 if any(r["status"] in (FAIL, TIMEOUT) for r in check.rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
