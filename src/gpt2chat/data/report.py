"""Seeing the data: statistics of tokenized examples and rendered examples with the trained tokens marked.

`example_stats` / `preference_stats` make JSON-friendly dicts (counts, token-length percentiles, fraction of
tokens carrying loss); `format_stats` prints them with the per-source load reports; `mark_trained` shows an
example's text with the trained spans in colour (terminal) or `[[...]]` brackets (pipe). No I/O of its own.
"""

from __future__ import annotations

import numpy as np

from gpt2chat.data.types import PreferenceExample, SFTExample

PERCENTILES = (50, 90, 99)
GREEN, DIM, RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"


def length_summary(lengths: list[int]) -> dict:
    if not lengths:
        return {"count": 0}
    values = np.asarray(lengths)
    out = {"count": int(values.size), "mean": round(float(values.mean()), 1), "min": int(values.min())}
    for p in PERCENTILES:
        out[f"p{p}"] = int(np.percentile(values, p, method="nearest"))
    out["max"] = int(values.max())
    return out


def example_stats(train: list[SFTExample], val: list[SFTExample]) -> dict:
    every = train + val
    total = sum(len(e.input_ids) for e in every)
    trained = sum(sum(e.assistant_mask) for e in every)
    return {
        "train_examples": len(train),
        "val_examples": len(val),
        "tokens": total,
        "loss_tokens": trained,
        "loss_fraction": round(trained / total, 4) if total else 0.0,
        "length": length_summary([len(e.input_ids) for e in every]),
        "reply_length": length_summary([sum(e.assistant_mask) for e in every]),
    }


def preference_stats(train: list[PreferenceExample], val: list[PreferenceExample]) -> dict:
    every = train + val
    prompt = sum(len(e.prompt_ids) for e in every)
    replies = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in every)
    return {
        "train_examples": len(train),
        "val_examples": len(val),
        "tokens": prompt * 2 + replies,  # each pair is two sequences: prompt + chosen, prompt + rejected
        "loss_tokens": replies,
        "loss_fraction": round(replies / (prompt * 2 + replies), 4) if every else 0.0,
        "prompt_length": length_summary([len(e.prompt_ids) for e in every]),
        "chosen_length": length_summary([len(e.chosen_ids) for e in every]),
        "rejected_length": length_summary([len(e.rejected_ids) for e in every]),
    }


def _length_line(name: str, summary: dict) -> str:
    if not summary.get("count"):
        return f"  {name:<16} (none)"
    cells = "  ".join(f"{key} {summary[key]}" for key in ("min", "p50", "p90", "p99", "max"))
    return f"  {name:<16} {cells}  mean {summary['mean']}"


def format_kept(stats: dict) -> list[str]:
    """What a build kept, and the rows and examples it skipped, dropped and cut, by reason (for `data stats`
    and for every training run, which prints and records them)."""
    skipped: dict[str, int] = {}
    for source in stats.get("sources", []):
        for reason, count in source.get("dropped", {}).items():
            skipped[reason] = skipped.get(reason, 0) + count
    lines = [f"examples: {stats['train_examples']} train, {stats['val_examples']} val"]
    for verb, table in (("skipped", skipped), ("dropped", stats.get("dropped", {}))):
        for reason, count in sorted(table.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {verb} {count:>6}  {reason}")
    for reason, count in sorted(stats.get("truncated", {}).items()):
        why = " (to the response budget)" if reason.endswith("reply cut") else ""
        lines.append(f"  cut     {count:>6}  {reason}{why}")
    return lines


def format_stats(stats: dict) -> str:
    lines = [f"kind: {stats['kind']}   template: {stats['template']}   cache: {stats.get('cache', '-')}"]
    lines.append("sources:")
    for source in stats["sources"]:
        info = "".join(f", {value} {name}" for name, value in source.get("info", {}).items())
        items = source.get("conversations", source.get("pairs", 0))
        unit = "conversations" if "conversations" in source else "pairs"
        lines.append(f"  {source['source']}  (weight {source['weight']:g})")
        lines.append(f"    {source['rows']} rows{info} -> {items} {unit} -> "
                     f"{source['train_examples']} train / {source['val_examples']} val examples")
        for reason, count in sorted(source["dropped"].items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    skipped {count:>6}  {reason}")
        for reason, count in sorted(source.get("example_drops", {}).items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    dropped {count:>6}  {reason} (examples)")
        for message in source.get("problems", [])[:5]:
            lines.append(f"      e.g. {message}")
    lines += format_kept(stats)
    lines.append(f"tokens: {stats['tokens']}, carrying loss: {stats['loss_tokens']} "
                 f"({100 * stats['loss_fraction']:.1f}%)")
    lines.append("token lengths:")
    for name in ("length", "reply_length", "prompt_length", "chosen_length", "rejected_length"):
        if name in stats:
            lines.append(_length_line(name.replace("_", " "), stats[name]))
    return "\n".join(lines)


def _runs(ids: list[int], mask: list[int]):
    start = 0
    for index in range(1, len(ids) + 1):
        if index == len(ids) or mask[index] != mask[start]:
            yield ids[start:index], mask[start]
            start = index


def mark_trained(tokenizer, ids: list[int], mask: list[int], colour: bool) -> str:
    """Decode `ids`, trained spans shown green (colour) or as [[...]] (plain)."""
    parts = []
    for run, trained in _runs(ids, mask):
        text = tokenizer.decode(run)
        if trained:
            parts.append(f"{GREEN}{text}{RESET}" if colour else f"[[{text}]]")
        else:
            parts.append(f"{DIM}{text}{RESET}" if colour else text)
    return "".join(parts)


def format_sft_example(tokenizer, example: SFTExample, number: int, colour: bool) -> str:
    trained = sum(example.assistant_mask)
    header = (f"=== example {number}  source {example.source}  ({len(example.input_ids)} tokens, "
              f"{trained} trained) ===")
    return header + "\n" + mark_trained(tokenizer, example.input_ids, example.assistant_mask, colour)


def format_preference_example(tokenizer, example: PreferenceExample, number: int, colour: bool) -> str:
    prompt = mark_trained(tokenizer, example.prompt_ids, [0] * len(example.prompt_ids), colour)
    lines = [f"=== pair {number}  source {example.source}  (prompt {len(example.prompt_ids)}, chosen "
             f"{len(example.chosen_ids)}, rejected {len(example.rejected_ids)} tokens) ===", prompt]
    for name, ids in (("chosen", example.chosen_ids), ("rejected", example.rejected_ids)):
        lines.append(f"--- {name} ---")
        lines.append(mark_trained(tokenizer, ids, [1] * len(ids), colour))
    return "\n".join(lines)
