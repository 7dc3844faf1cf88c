"""Batch-1 decode and prefill speed: our engine against llama.cpp and transformers, same weights, one process.

We build a GPT-2 checkpoint folder (random weights, the 124M shape by default), convert that same folder to
GGUF with llama.cpp's own `convert_hf_to_gguf.py` (f32, f16 and q8_0; q4_0 through our exporter), and load it three ways: our engine (fp32,
fp32 with the compiled decode step, and fp16 / int8 weights when `gpt2chat.quantize` is there), llama.cpp
through `llama-cpp-python`, and `transformers`' `generate`. Then, for `--repeats` rounds, every side runs
in turn (the order rotates each round): a greedy decode of `--new-tokens` tokens after a 32-token prompt,
and one prefill of a 32-token and of a 512-token prompt. A side's figure is the median over the rounds.

The bound: batch-1 decode reads every weight once per token, so tokens/s <= read bandwidth / bytes of
weights read per token. The read bandwidth is the project's one measurement
(`gpt2chat.evaluate.flops.measure_peaks`: the best of several `tensor.sum()` passes over 1 GiB, a read only,
not a copy), taken before and after the runs; the better of the two is the bound.

    python -m benchmarks.decode                        # 124M, 5 rounds
    python -m benchmarks.decode --arch tiny --repeats 2 --new-tokens 32 --prefill-lengths 32,128 --skip-transformers

Prints one JSON line per side, then a markdown table. llama.cpp rows need `llama-cpp-python` and the
converter (`--convert`, default: the copy unpacked under ~/.cache/gpt2chat-ci, or $GPT2CHAT_CONVERT_HF_TO_GGUF)
with the `gguf` package; they are skipped with a note when either is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from benchmarks.timing import round_robin

DEFAULT_CONVERTER = str(Path.home() / ".cache/gpt2chat-ci/llama-cpp-python-0.3.36/src/llama_cpp_python-0.3.36/vendor/"
                        "llama.cpp/convert_hf_to_gguf.py")
PREFILL_LENGTHS = "32,512"


# ---------------------------------------------------------------------- the sides
class Ours:
    def __init__(self, name: str, engine, read_bytes: int):
        from gpt2chat.sampling import SamplingParams

        self.name, self.engine, self.read_bytes = name, engine, read_bytes
        self.params = SamplingParams(temperature=0)

    def decode(self, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
        result = self.engine.generate([prompt], self.params.replace(max_new_tokens=new_tokens + 1))[0]
        return (len(result.token_ids) - 1) / result.decode_s, result.token_ids

    def prefill(self, prompt: list[int]) -> float:
        result = self.engine.generate([prompt], self.params.replace(max_new_tokens=1))[0]
        return len(prompt) / result.ttft_s


class _FirstTokenClock:
    """A `generate` streamer that notes when the first new token arrives (its first `put` is the prompt)."""

    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


class Transformers:
    def __init__(self, folder: Path, read_bytes: int):
        from transformers import AutoModelForCausalLM

        self.name, self.read_bytes = "transformers fp32", read_bytes
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None  # never stop early

    def decode(self, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
        ids = torch.tensor([prompt])
        clock = _FirstTokenClock()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens + 1,
                                      do_sample=False, pad_token_id=0, streamer=clock)  # fmt: skip
        return new_tokens / (time.perf_counter() - clock.first), out[0, len(prompt) :].tolist()

    def prefill(self, prompt: list[int]) -> float:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            start = time.perf_counter()
            self.model(ids, logits_to_keep=1)
            return len(prompt) / (time.perf_counter() - start)


class LlamaCpp:
    def __init__(self, name: str, gguf: Path, threads: int, read_bytes: int):
        from llama_cpp import Llama

        self.name, self.read_bytes = name, read_bytes
        self.llm = Llama(model_path=str(gguf), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads,
                         n_threads_batch=threads, verbose=False)  # fmt: skip

    def decode(self, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
        tokens, first = [], None
        for token in self.llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, reset=True):
            tokens.append(token)
            if first is None:
                first = time.perf_counter()  # after the prefill and the first token
            if len(tokens) == new_tokens + 1:
                break
        return new_tokens / (time.perf_counter() - first), tokens

    def prefill(self, prompt: list[int]) -> float:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(prompt)
        return len(prompt) / (time.perf_counter() - start)

    def close(self) -> None:
        self.llm.close()


def convert_to_gguf(converter: Path, folder: Path, outtype: str, out: Path) -> Path:
    subprocess.run([sys.executable, str(converter), str(folder), "--outfile", str(out), "--outtype", outtype],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    return out


def build_sides(args, folder: Path, workdir: Path) -> tuple[list, list[str]]:
    from gpt2chat.engine import Engine
    from gpt2chat.quantize import decode_read_bytes, load_for_inference

    notes: list[str] = []
    sides: list = []
    for mode in (None, "fp16", "int8", "int4"):
        model, _ = load_for_inference(folder, quantize=mode, device="cpu")  # the layout the CLI and server use
        name = f"ours {mode or 'fp32'}"
        # one cache row: the Scheduler's decode step covers rows 0 .. the last one decoding, and each new request
        # of an 8-row engine takes the next row that never held tokens, so the k-th timed call would run a
        # k-row step (measured: 153 -> 81 tok/s over 4 calls at int4); prefill is timed cold
        engine = Engine(model, prompt_cache=False, max_batch_size=1)
        sides.append(Ours(name, engine, decode_read_bytes(model)))
        if mode is None and not args.skip_compiled:
            compiled = Engine(model, compile=True, prompt_cache=False, max_batch_size=1)
            sides.append(Ours(f"{name} compiled", compiled, decode_read_bytes(model)))
    fp32_bytes = sides[0].read_bytes
    if not args.skip_transformers:
        sides.append(Transformers(folder, fp32_bytes))
    converter = Path(args.convert)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        notes.append("llama-cpp-python is not installed: no llama.cpp rows")
        return sides, notes
    if not converter.is_file():
        notes.append(f"no convert_hf_to_gguf.py at {converter}: no llama.cpp rows")
        return sides, notes
    q8_bytes = fp32_bytes // 4 * 34 // 32  # q8_0: 32 int8 weights + one fp16 scale per block
    for outtype, name, read_bytes in (("f32", "llama.cpp f32", fp32_bytes), ("f16", "llama.cpp f16", fp32_bytes // 2),
                                      ("q8_0", "llama.cpp q8_0", q8_bytes)):
        gguf = convert_to_gguf(converter, folder, outtype, workdir / f"model-{outtype}.gguf")
        sides.append(LlamaCpp(name, gguf, args.threads, read_bytes))
    # llama.cpp's converter writes no q4_0: the same folder through our exporter (the gguf package's Q4_0)
    from gpt2chat.export import export_gguf

    q4 = export_gguf(folder, workdir / "model-q4_0.gguf", quant="q4_0")
    sides.append(LlamaCpp("llama.cpp q4_0", q4, args.threads, fp32_bytes // 4 * 18 // 32))
    return sides, notes


# ---------------------------------------------------------------------- the run
def run(args) -> tuple[list[dict], list[str]]:
    from gpt2chat.checkpoint import init_checkpoint
    from gpt2chat.evaluate.flops import best_peaks, measure_peaks

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(args.threads)
    peaks_before = measure_peaks("cpu", torch.float32, repeats=args.peak_repeats)
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="gpt2chat-decode-") as tmp:
        folder = init_checkpoint(args.arch, Path(tmp) / args.arch, seed=0)
        vocab = 50257
        lengths = args.prefill_lengths
        prompt = torch.randint(0, vocab, (32,), generator=generator).tolist()
        prefill_prompts = {n: torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths}
        sides, notes = build_sides(args, folder, Path(tmp))
        # Warm-up at the timed length: first allocations, llama.cpp's buffers, and the compiled step's graph for
        # every key-length bucket the timed decode reaches (twice: a guard may recompile once after the first).
        for side in sides:
            for _ in range(2 if side.name.endswith("compiled") else 1):
                side.decode(prompt, args.new_tokens)
            side.prefill(prefill_prompts[lengths[0]])
        decode = {side.name: [] for side in sides}
        prefill = {(side.name, n): [] for side in sides for n in lengths}
        tokens = {}
        for _, side in round_robin(sides, args.repeats):
            rate, tokens[side.name] = side.decode(prompt, args.new_tokens)
            decode[side.name].append(rate)
            for n in lengths:
                prefill[(side.name, n)].append(side.prefill(prefill_prompts[n]))
        for side in sides:
            if hasattr(side, "close"):
                side.close()
    peaks = best_peaks(peaks_before, measure_peaks("cpu", torch.float32, repeats=args.peak_repeats))
    bandwidth = peaks["read_bytes_per_s"]
    reference = tokens.get("ours fp32", [])
    rows = []
    for side in sides:
        rate = statistics.median(decode[side.name])
        bound = bandwidth / side.read_bytes
        same = sum(a == b for a, b in zip(tokens[side.name], reference, strict=False)) / max(1, len(reference))
        rows.append({
            "benchmark": "decode", "side": side.name, "arch": args.arch, "threads": args.threads,
            "repeats": args.repeats, "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
            "decode_tokens_per_s": round(rate, 2),
            **{f"prefill{n}_tokens_per_s": round(statistics.median(prefill[(side.name, n)]), 1)
               for n in lengths},
            "weight_mb_read_per_token": round(side.read_bytes / 1e6, 1),
            "read_bandwidth_gb_s": round(bandwidth / 1e9, 2),
            "bound_tokens_per_s": round(bound, 2), "fraction_of_bound": round(rate / bound, 3),
            "greedy_tokens_agree_with_ours_fp32": round(same, 3),
            "decode_runs": [round(r, 2) for r in decode[side.name]],
        })  # fmt: skip
    by_name = {row["side"]: row for row in rows}
    for row in rows:  # the ratios the targets are stated in
        peer = {"ours fp32": "llama.cpp f32", "ours fp32 compiled": "llama.cpp f32", "ours fp16": "llama.cpp f16",
                "ours int8": "llama.cpp q8_0", "ours int4": "llama.cpp q4_0"}.get(row["side"])  # fmt: skip
        if peer in by_name:
            row["vs_peer"] = peer
            row["decode_ratio"] = round(row["decode_tokens_per_s"] / by_name[peer]["decode_tokens_per_s"], 3)
            for n in lengths:
                key = f"prefill{n}_tokens_per_s"
                row[f"prefill{n}_ratio"] = round(row[key] / by_name[peer][key], 3)
    return rows, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="gpt2", help="model preset (default gpt2 = the 124M shape)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--convert", default=os.environ.get("GPT2CHAT_CONVERT_HF_TO_GGUF", DEFAULT_CONVERTER),
                        help="llama.cpp's convert_hf_to_gguf.py")  # fmt: skip
    parser.add_argument("--prefill-lengths", default=PREFILL_LENGTHS,
                        help="prompt lengths of the prefill rows, comma-separated (each below the model's context)")
    parser.add_argument("--peak-repeats", type=int, default=7, help="read passes per bandwidth measurement")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-compiled", action="store_true", help="no row for the compiled decode step")
    args = parser.parse_args()
    args.prefill_lengths = [int(n) for n in args.prefill_lengths.split(",")]
    rows, notes = run(args)
    for row in rows:
        print(json.dumps(row), flush=True)
    for note in notes:
        print(f"note: {note}")
    lengths = args.prefill_lengths
    print("\n| side | decode tok/s | vs peer | " + " | ".join(f"prefill {n} tok/s" for n in lengths)
          + f" | vs peer ({' / '.join(map(str, lengths))}) | MB read/token | % of read bound | tokens = ours fp32 |")
    print("|---" * (7 + len(lengths)) + "|")
    for r in rows:
        ratio = f"{r['decode_ratio']:.2f}x {r['vs_peer']}" if "decode_ratio" in r else ""
        prefill = " | ".join(f"{r[f'prefill{n}_tokens_per_s']:.0f}" for n in lengths)
        prefill_ratio = " / ".join(f"{r[f'prefill{n}_ratio']:.2f}x" for n in lengths) if "decode_ratio" in r else ""
        print(f"| {r['side']} | {r['decode_tokens_per_s']:.1f} | {ratio} | {prefill} | {prefill_ratio} | "
              f"{r['weight_mb_read_per_token']:.0f} | {100 * r['fraction_of_bound']:.0f}% | "
              f"{100 * r['greedy_tokens_agree_with_ours_fp32']:.0f}% |")
    print(f"\nread bandwidth (best 1 GiB sum): {rows[0]['read_bandwidth_gb_s']} GB/s" if rows else "")


if __name__ == "__main__":
    main()
