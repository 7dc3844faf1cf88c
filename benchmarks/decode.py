"""Batch-1 greedy decode speed: our Engine vs transformers' `generate`, same weights, same process.

The 124M GPT-2 shape with random weights: we build our model, save it as a checkpoint folder, load the
same folder with `AutoModelForCausalLM`, then time a 32-token prompt + 128 new tokens (greedy, no early
stop) for ours and theirs, interleaved, several repeats, medians, `torch.set_num_threads(2)`, in fp32 and
bf16. Also measures memory copy bandwidth and reports the bandwidth bound of decode (every weight read once
per token) and the fraction of it each side reaches.

    python benchmarks/decode.py                   # fp32 and bf16, 5 repeats
    python benchmarks/decode.py --dtypes float32 --repeats 3 --arch tiny   # quick check

Prints a markdown table, then one JSON line per dtype.
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py would shadow the standard library's tokenize module when run as a script
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def copy_bandwidth(size_mb: int = 256, repeats: int = 7) -> float:
    """Bytes moved per second (read + write) copying a large tensor; the median of several copies."""
    src = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter once (tied head once), one wpe row."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    wpe = model.transformer.wpe.weight
    return total - wpe.numel() * wpe.element_size() + wpe.shape[1] * wpe.element_size()


def time_ours(engine, prompt, params) -> tuple[float, list[int]]:
    start = time.perf_counter()
    tokens = engine.generate([prompt], params)[0].token_ids
    return time.perf_counter() - start, tokens


def time_theirs(hf_model, prompt, new_tokens) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    elapsed = time.perf_counter() - start
    return elapsed, out[0, len(prompt) :].tolist()


def run(args) -> list[dict]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from gpt2chat.checkpoint import init_checkpoint, load_model
    from gpt2chat.engine import Engine
    from gpt2chat.sampling import SamplingParams

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    bandwidth = copy_bandwidth()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        init_checkpoint(args.arch, folder, seed=0)
        generator = torch.Generator().manual_seed(0)
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            model, tokenizer = load_model(folder, device="cpu", dtype=dtype)
            engine = Engine(model, device="cpu", dtype=dtype)
            hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
            hf_model.generation_config.eos_token_id = None  # never stop early: exactly new_tokens each
            hf_model.generation_config.pad_token_id = tokenizer.pad_token_id
            prompt = torch.randint(0, 50257, (args.prompt_tokens,), generator=generator).tolist()
            params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens)

            time_ours(engine, prompt, params.replace(max_new_tokens=8))  # warm-up both
            time_theirs(hf_model, prompt, 8)
            ours_times, theirs_times = [], []
            same = None
            for repeat in range(args.repeats):
                first, second = ("ours", "theirs") if repeat % 2 == 0 else ("theirs", "ours")
                for side in (first, second):
                    if side == "ours":
                        elapsed, ours_tokens = time_ours(engine, prompt, params)
                        ours_times.append(elapsed)
                    else:
                        elapsed, theirs_tokens = time_theirs(hf_model, prompt, args.new_tokens)
                        theirs_times.append(elapsed)
                if same is None:
                    agree = sum(a == b for a, b in zip(ours_tokens, theirs_tokens, strict=True))
                    same = agree / args.new_tokens
            ours_tps = args.new_tokens / statistics.median(ours_times)
            theirs_tps = args.new_tokens / statistics.median(theirs_times)
            per_token = weight_bytes_per_token(model)
            bound = bandwidth / per_token
            rows.append({
                "benchmark": "decode", "arch": args.arch, "dtype": dtype_name, "threads": args.threads,
                "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
                "ours_tokens_per_s": round(ours_tps, 2), "theirs_tokens_per_s": round(theirs_tps, 2),
                "ratio": round(ours_tps / theirs_tps, 3),
                "greedy_tokens_agree": round(same, 3),
                "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),
                "weight_mb_per_token": round(per_token / 1e6, 1),
                "bandwidth_bound_tokens_per_s": round(bound, 2),
                "ours_fraction_of_bound": round(ours_tps / bound, 3),
                "theirs_fraction_of_bound": round(theirs_tps / bound, 3),
                "ours_runs_s": [round(t, 3) for t in ours_times],
                "theirs_runs_s": [round(t, 3) for t in theirs_times],
            })  # fmt: skip
            del model, engine, hf_model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="gpt2", help="model preset (default gpt2 = the 124M shape)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = run(args)
    print(
        "| dtype | ours tok/s | transformers tok/s | ratio | bound tok/s (copy GB/s) | ours % of bound | greedy agree |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['ours_tokens_per_s']:.1f} | {r['theirs_tokens_per_s']:.1f} | "
              f"{r['ratio']:.2f}x | {r['bandwidth_bound_tokens_per_s']:.1f} ({r['copy_bandwidth_gb_s']:.1f}) | "
              f"{100 * r['ours_fraction_of_bound']:.0f}% | {100 * r['greedy_tokens_agree']:.0f}% |")  # fmt: skip
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
