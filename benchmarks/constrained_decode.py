"""What a grammar costs a decode step: constrained against unconstrained tokens/s, same weights, one process.

The 124M shape with random weights (fp32, CPU unless CUDA is there) and the real GPT-2 tokenizer with the
llama3-context tokens. Rounds alternate the sides (order rotated each round), medians over `--rounds`:

  free        batch 1, no constraint
  json        batch 1, a JSON Schema constraint (the llguidance mask, its unpacking and the -inf fill)
  free+free   batch 2, both rows free: the free row's baseline when it shares a step
  free+json   batch 2, one free row beside one constrained row: what the free row pays for its neighbour

Every side decodes `--new-tokens` tokens greedily after a short prompt (the constrained row's schema keeps
its strings bounded, so it does not stop early); figures are tokens per second of one row.

    python -m benchmarks.constrained_decode --rounds 5 --new-tokens 48
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

SCHEMA = {
    "type": "object",
    "properties": {
        "items": {"type": "array", "maxItems": 64,
                  "items": {"type": "object", "properties": {"n": {"type": "string", "maxLength": 12}},
                            "required": ["n"], "additionalProperties": False}},
    },
    "required": ["items"],
    "additionalProperties": False,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="gpt2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()

    from gpt2chat.checkpoint import init_checkpoint, load_model
    from gpt2chat.engine import BatchedEngine
    from gpt2chat.grammar import Constraint
    from gpt2chat.sampling import SamplingParams
    from gpt2chat.tokenizer import Tokenizer

    folder = init_checkpoint(args.arch, tempfile.mkdtemp(), template="llama3-context", seed=0)
    model, _ = load_model(folder)
    tokenizer = Tokenizer.from_dir(folder)
    constraint = Constraint.json_schema(SCHEMA, tokenizer, model.config.vocab_size)
    # no stop token: every side decodes exactly --new-tokens tokens
    free = SamplingParams(temperature=0, max_new_tokens=args.new_tokens)
    bound = free.replace(constraint=constraint)
    prompt = tokenizer.encode("Here is the list:")
    sides = {"free": [free], "json": [bound], "free+free": [free, free], "free+json": [free, bound]}
    rates: dict[str, list[float]] = {name: [] for name in sides}
    with BatchedEngine(model, max_batch_size=2) as engine:
        engine.submit(prompt, free).wait()  # warm-up
        names = list(sides)
        for rnd in range(args.rounds):
            for name in names[rnd % len(names):] + names[: rnd % len(names)]:
                requests = [engine.submit(prompt, p) for p in sides[name]]
                for r in requests:
                    r.wait()
                first = requests[0]
                rates[name].append((first.completion_tokens - 1) / first.decode_s)
                assert all(r.completion_tokens == args.new_tokens for r in requests), name
    medians = {name: statistics.median(v) for name, v in rates.items()}
    line = {"arch": args.arch, "new_tokens": args.new_tokens, "rounds": args.rounds,
            "tokens_per_s": {k: round(v, 2) for k, v in medians.items()},
            "json_over_free": round(medians["json"] / medians["free"], 3),
            "shared_free_row_over_free_pair": round(medians["free+json"] / medians["free+free"], 3)}
    print(json.dumps(line))
    print("\n| side | tokens/s (one row, median) | ratio |")
    print("|---|---|---|")
    print(f"| free, batch 1 | {medians['free']:.1f} | 1 |")
    print(f"| json schema, batch 1 | {medians['json']:.1f} | {line['json_over_free']} |")
    print(f"| free row beside a free row | {medians['free+free']:.1f} | 1 |")
    print(f"| free row beside a json row | {medians['free+json']:.1f} | {line['shared_free_row_over_free_pair']} |")


if __name__ == "__main__":
    main()
