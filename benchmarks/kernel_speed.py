"""Linear kernels on the GPT-2 124M shapes: our fp32 / fp16 / int8 ops against `F.linear` on fp32 weights.

For each weight shape [N, K] of the 124M model (768x768 attention out, 2304x768 qkv, 3072x768 MLP up,
768x3072 MLP down, 50257x768 tied head) and each number of input rows M (1 = batch-1 decode, 16 / 64 =
batched decode of many streams, 512 = prefill), it times y = x W^T + b for:

- `F.linear row-major`: nn.Linear's own fp32 weight (MKL's "NT" GEMV / GEMM);
- `F.linear col-major`: the same values stored column-major (the layout engine.use_decode_layout made);
- `ours fp32` / `ours fp16` / `ours int8`: torch.ops.gpt2chat.linear_{f32,f16,i8} (gpt2chat.kernels);
- `ours int8 q8` / `ours int4 q8`: linear_i8_q8 / linear_i4_q8, the integer products with the activations
  rounded to int8 blocks (what `--quantize int8` / `int4` run).

Every candidate cycles through enough distinct copies of its weight (>= --working-set MB) that each call
reads its weight from memory, not from the 32 MB L3, as a decode step does; `--working-set 0` keeps two
copies (from cache for all but the head: the compute rate of the kernel, what "% of the matmul bound" means). The candidates are interleaved
within every repeat; the table gives medians over repeats. Rates: GB/s of weight bytes read (in the stored
format: 4, 2 or 1 byte a weight, + int8's scales) and GFLOP/s (2 M N K per call). The read bound is the
best of several `tensor.sum()` passes over 1 GiB; the matmul bound the best of several 1024^3 sgemms.

    python -m benchmarks.kernel_speed                         # all shapes, M = 1, 16, 64, 512
    python -m benchmarks.kernel_speed --rows 1 --repeats 15   # decode only
    python -m benchmarks.kernel_speed --crossover             # M = 2..512: one-pass kernel vs sgemm paths
    python -m benchmarks.kernel_speed --threads 1 --clock thread   # CPU time of one core: steadier under load
    python -m benchmarks.kernel_speed --shapes mlp.c_fc --rows 1,2,4,8,16,32,64 --threads 1 --clock thread \
        --working-set 0 --candidates "ours fp32,ours fp16,ours int8 q8,ours int4 q8"   # small-M compute rates

Prints markdown tables, then one JSON line per (shape, M, candidate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from gpt2chat.kernels import pack_int4, pack_rows
from gpt2chat.quantize import quantize_int4, quantize_int8

SHAPES = {"attn.c_proj": (768, 768), "attn.c_attn": (2304, 768), "mlp.c_fc": (3072, 768),
          "mlp.c_proj": (768, 3072), "lm_head": (50257, 768)}  # fmt: skip
CANDIDATES = ("F.linear row-major", "F.linear col-major", "ours fp32", "ours fp16", "ours int8", "ours int8 q8",
              "ours int4 q8")


def read_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    """Bytes read per second by a read-only pass (`tensor.sum()`) over `gib` GiB: the best of `repeats`."""
    data = torch.ones(int(gib * 2**30) // 4)
    data.sum()
    best = min(_seconds(data.sum) for _ in range(repeats))
    return data.numel() * 4 / best


def matmul_peak(size: int = 1024, repeats: int = 7) -> float:
    """fp32 FLOP/s of the best of `repeats` size^3 matmuls (this shared machine swings by 30%)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    return 2 * size**3 / min(_seconds(lambda: torch.mm(a, b)) for _ in range(repeats))


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _weights(candidate: str, n: int, k: int, copies: int, generator: torch.Generator) -> list[tuple]:
    """`copies` distinct argument tuples (weight forms after x) for one candidate."""
    out = []
    for _ in range(copies):
        dense = torch.randn(n, k, generator=generator) * 0.02
        if candidate == "F.linear col-major":
            out.append((dense.t().contiguous().t(),))
        elif candidate == "ours fp16":
            out.append((pack_rows(dense.half()).view(torch.int16), n))
        elif candidate in ("ours int8", "ours int8 q8"):
            quantized, scale = quantize_int8(dense)
            out.append((pack_rows(quantized), scale))
        elif candidate == "ours int4 q8":
            out.append((*pack_int4(*quantize_int4(dense)), n))
        else:
            out.append((dense,))
    return out


def _call(candidate: str, small_m_max: int):
    if candidate.startswith("F.linear"):
        return lambda x, weight, bias: F.linear(x, weight, bias)
    if candidate == "ours fp32":
        return lambda x, weight, bias: torch.ops.gpt2chat.linear_f32(x, weight, bias, small_m_max)
    if candidate == "ours fp16":
        return lambda x, weight, n, bias: torch.ops.gpt2chat.linear_f16(x, weight, n, bias, small_m_max)
    if candidate == "ours int8 q8":
        return lambda x, weight, scale, bias: torch.ops.gpt2chat.linear_i8_q8(x, weight, scale, bias, small_m_max)
    if candidate == "ours int4 q8":
        return lambda x, weight, scale, n, bias: torch.ops.gpt2chat.linear_i4_q8(x, weight, scale, n, bias, small_m_max)
    return lambda x, weight, scale, bias: torch.ops.gpt2chat.linear_i8(x, weight, scale, bias, small_m_max)


def _bytes(args: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in args if isinstance(t, torch.Tensor))


def bench_shape(name: str, n: int, k: int, rows: list[int], candidates: list[tuple[str, int]], repeats: int,
                working_set_mb: float, generator: torch.Generator, clock=time.perf_counter) -> list[dict]:
    """Rows of results for one weight shape: every (M, candidate), candidates interleaved per repeat."""
    weights, calls = {}, {}
    for label, small_m_max in candidates:
        base = label.split(" (")[0]
        bytes_one = _bytes(_weights(base, 4, k, 1, generator)[0]) * n / 4
        copies = max(2, int(working_set_mb * 2**20 / bytes_one) + 1) if working_set_mb > 0 else 2
        weights[label] = _weights(base, n, k, copies, generator)
        calls[label] = _call(base, small_m_max)
    bias = torch.randn(n, generator=generator) * 0.02
    results = []
    for m in rows:
        x = torch.randn(m, k, generator=generator)
        times: dict[str, list[float]] = {label: [] for label, _ in candidates}
        for label, _ in candidates:  # warm-up: first touch of every copy, kernel caches
            for args in weights[label][:2]:
                calls[label](x, *args, bias)
        for _ in range(repeats):
            for label, _ in candidates:
                fn, copies = calls[label], weights[label]
                start = clock()
                for args in copies:
                    fn(x, *args, bias)
                times[label].append((clock() - start) / len(copies))
        for label, _ in candidates:
            seconds = statistics.median(times[label])
            read = _bytes(weights[label][0])
            results.append({"shape": name, "n": n, "k": k, "m": m, "candidate": label,
                            "seconds": seconds, "best_seconds": min(times[label]),
                            "gb_per_s": read / seconds / 1e9, "gflop_per_s": 2 * m * n * k / seconds / 1e9})  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of " + ", ".join(SHAPES))
    parser.add_argument("--rows", default="1,16,64,512", help="numbers of input rows M")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--working-set", type=float, default=192.0, help="MB of distinct weights per candidate")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="thread: this thread's CPU time (with --threads 1), steadier on a loaded machine")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated, of " + ", ".join(CANDIDATES))
    parser.add_argument("--crossover", action="store_true",
                        help="time both paths of our kernels per M: one pass, or sgemm (fp16 / int8 widened by tiles)")  # fmt: skip
    args = parser.parse_args()
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread: use it with --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter

    from gpt2chat import kernels

    torch.set_num_threads(args.threads)
    backend = kernels.load()
    rows = [int(r) for r in args.rows.split(",")]
    if args.crossover:
        chosen = [c for c in args.candidates.split(",") if c.startswith("ours")]
        candidates = [(f"{c} ({path})", limit) for c in chosen
                      for path, limit in (("one pass", 1 << 20), ("sgemm", 0))]  # fmt: skip
        if args.rows == parser.get_default("rows"):
            rows = [2, 8, 16, 32, 64, 128, 256, 512]
    else:
        candidates = [(c, -1) for c in args.candidates.split(",")]
    unknown = [c for c, _ in candidates if c.split(" (")[0] not in CANDIDATES]
    if unknown:
        parser.error(f"unknown candidates {unknown}; choose from {', '.join(CANDIDATES)}")
    bandwidth, peak = read_bandwidth(), matmul_peak()
    generator = torch.Generator().manual_seed(0)
    results = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        results += bench_shape(name, n, k, rows, candidates, args.repeats, args.working_set, generator, clock)
        print(f"... {name} done", flush=True)

    print(f"\nbackend {backend}, {args.threads} threads, {args.clock} clock, read bound {bandwidth / 1e9:.1f} GB/s "
          f"(best sum over 1 GiB), matmul bound {peak / 1e9:.0f} GFLOP/s (best 1024^3 sgemm)\n")  # fmt: skip
    labels = [label for label, _ in candidates]
    for m in rows:
        unit = "GB/s read (% of read bound)" if m == 1 else "GFLOP/s (% of the matmul bound; GB/s read)"
        print(f"M = {m}: {unit}\n")
        print("| shape | " + " | ".join(labels) + " |")
        print("|---|" + "---|" * len(labels))
        for name in args.shapes.split(","):
            cells = []
            for label in labels:
                row = next(r for r in results if r["shape"] == name and r["m"] == m and r["candidate"] == label)
                if m == 1:
                    cells.append(f"{row['gb_per_s']:.1f} ({100 * row['gb_per_s'] * 1e9 / bandwidth:.0f}%)")
                else:
                    share = 100 * row["gflop_per_s"] * 1e9 / peak
                    cells.append(f"{row['gflop_per_s']:.0f} ({share:.0f}%; {row['gb_per_s']:.1f})")
            print(f"| {name} {SHAPES[name][0]}x{SHAPES[name][1]} | " + " | ".join(cells) + " |")
        print()
    for row in results:
        print(json.dumps({**row, "backend": backend, "threads": args.threads, "clock": args.clock,
                          "read_bound_gb_per_s": bandwidth / 1e9, "matmul_bound_gflop_per_s": peak / 1e9}))  # fmt: skip


if __name__ == "__main__":
    main()
