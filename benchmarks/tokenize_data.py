"""Tokenizing real data into SFT examples: wall time, examples/s, tokens/s, cold vs cached, ours vs naive.

    python -m benchmarks.tokenize_data [--shared ../shared] [--repeats 3] [--template llama3-context]

Data: the 5k Alpaca subset plus the OASST1 validation file from ../shared/data (one example per assistant
turn, budgets 512). Rows, same process, interleaved, medians of `--repeats`:
  naive   every example rendered with the plain tokenizer (one BPE call per template segment per render)
  cold    build_sft_examples without cache (segment table filled by one encode_batch)
  cached  build_sft_examples a second time with the cache (no tokenization)
Prints a table and one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--template", default="llama3-context")
    args = parser.parse_args()

    from gpt2chat.data import Budgets, build_sft_examples, load_conversations
    from gpt2chat.templates import get_template
    from gpt2chat.tokenizer import Tokenizer

    data = Path(args.shared) / "data"
    specs = [f"alpaca:{data / 'alpaca/alpaca-subset-5k.json'}", f"oasst1:{data / 'oasst1/en-validation.jsonl'}"]
    if not all(Path(s.split(":", 1)[1]).is_file() for s in specs):
        print(f"shared data not found under {data}", file=sys.stderr)
        return 1
    tokenizer = Tokenizer.gpt2()
    get_template(args.template).ensure_tokens(tokenizer)
    conversations = [c for spec in specs for c in load_conversations(spec)[0]]

    class Plain:  # the tokenizer as is, hidden from build_sft's prefetch
        def __init__(self, tok):
            self._tok = tok

        def __getattr__(self, name):
            return getattr(self._tok, name)

        def __len__(self):
            return len(self._tok)

    def naive():
        from gpt2chat.data.examples import sft_example, sft_turn_targets

        out, drops = [], Counter()
        plain = Plain(tokenizer)
        for c in conversations:
            for messages in sft_turn_targets(c, True):
                example, reason = sft_example(plain, messages, args.template, Budgets.sft(), c.source)
                if example is None:
                    drops[reason] += 1
                else:
                    out.append(example)
        return out

    def cold():
        return build_sft_examples(specs, tokenizer, args.template, val_fraction=0.0, dedup=False,
                                  use_cache=False)[0]

    cache_dir = Path(tempfile.mkdtemp(prefix="gpt2chat-bench-"))
    cached_examples = build_sft_examples(specs, tokenizer, args.template, val_fraction=0.0, dedup=False,
                                         cache_dir=cache_dir)[0]

    def cached():
        train, _, stats = build_sft_examples(specs, tokenizer, args.template, val_fraction=0.0, dedup=False,
                                             cache_dir=cache_dir)
        assert stats["cache"] == "hit"
        return train

    runs = {"naive": naive, "cold": cold, "cached": cached}
    times: dict[str, list[float]] = {name: [] for name in runs}
    results = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            started = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - started)
    same = sorted(e.input_ids for e in results["naive"]) == sorted(e.input_ids for e in results["cold"])
    n_examples = len(results["cold"])
    n_tokens = sum(len(e.input_ids) for e in results["cold"])
    rows = []
    for name in runs:
        wall = statistics.median(times[name])
        rows.append({"run": name, "wall_s": round(wall, 3), "examples_per_s": round(n_examples / wall),
                     "tokens_per_s": round(n_tokens / wall)})
    print(f"data: alpaca 5k + oasst1 validation -> {n_examples} examples, {n_tokens} tokens "
          f"(template {args.template}, {os.cpu_count()} CPUs, median of {args.repeats}; naive == cold ids: {same})")
    print(f"{'run':<8} {'wall s':>8} {'examples/s':>11} {'tokens/s':>10}")
    for row in rows:
        print(f"{row['run']:<8} {row['wall_s']:>8.3f} {row['examples_per_s']:>11} {row['tokens_per_s']:>10}")
    print(json.dumps({"benchmark": "tokenize", "examples": n_examples, "tokens": n_tokens, "same_ids": same,
                      "rows": rows, "speedup_cold_vs_naive": round(rows[0]["wall_s"] / rows[1]["wall_s"], 2),
                      "cached_examples": len(cached_examples)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
