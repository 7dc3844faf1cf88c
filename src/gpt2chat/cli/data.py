"""`gpt2chat data inspect|stats`: see what a data mix turns into before training on it.

inspect: rendered examples with the trained tokens marked (colour on a terminal, `[[...]]` when piped).
stats:   counts per source, skipped rows / dropped examples by reason, token-length percentiles, loss fraction.
Heavy imports (tokenizer, templates) happen inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys

from gpt2chat.data.types import VAL_FRACTION  # a plain module: no heavy import


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="inspect datasets and their tokenized examples")
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(handler=lambda args: (data.print_help(), 2)[1])

    inspect = commands.add_parser("inspect", help="print rendered examples with the trained tokens marked")
    _common(inspect)
    inspect.add_argument("-n", "--num", type=int, default=3, help="how many examples to print (default 3)")
    inspect.add_argument("--skip", type=int, default=0, help="start after this many examples")
    inspect.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                         help="mark trained tokens in colour (default: on a terminal) or with [[...]]")
    inspect.set_defaults(handler=run_inspect)

    stats = commands.add_parser("stats", help="counts, skips by reason, token lengths, loss fraction")
    _common(stats)
    stats.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                       help="validation share (default %(default)s, as training's)")
    stats.add_argument("--seed", type=int, default=0)
    stats.add_argument("--no-dedup", action="store_true", help="keep exact duplicate conversations")
    stats.add_argument("--no-cache", action="store_true", help="tokenize again even when cached")
    stats.add_argument("--cache-dir", default=None, help="cache folder (default ~/.cache/gpt2chat/data)")
    stats.add_argument("--json", action="store_true", help="print the statistics as JSON")
    stats.set_defaults(handler=run_stats)


def _common(parser: argparse.ArgumentParser) -> None:
    from gpt2chat.data.types import PROMPT_TRUNCATIONS

    parser.add_argument("--data", action="append", required=True, metavar="FORMAT:LOCATION[@WEIGHT]",
                        help="a data source (repeatable); formats: oasst1 oasst2 alpaca guanaco openorca "
                             "ultrafeedback sharegpt messages")
    parser.add_argument("--template", default="llama3-context", help="chat template (default llama3-context)")
    parser.add_argument("--tokenizer", default="gpt2", help="checkpoint folder with a tokenizer, or gpt2 (default)")
    parser.add_argument("--kind", choices=("auto", "sft", "preference"), default="auto",
                        help="SFT examples or preference pairs (auto: pairs when every source has them)")
    parser.add_argument("--strict", action="store_true", help="stop at the first malformed row")
    parser.add_argument("--max-length", type=int, default=None, help="total tokens (SFT 512, preference 160)")
    parser.add_argument("--max-prompt-length", type=int, default=None, help="(preference default 96)")
    parser.add_argument("--max-response-length", type=int, default=None, help="(preference default 64)")
    parser.add_argument("--prompt-truncation", choices=PROMPT_TRUNCATIONS, default="keep_end",
                        help="a last user turn over budget: keep its end (default, as TRL's DPO did), its start, or drop")
    parser.add_argument("--last-turn-only", action="store_true",
                        help="one example per conversation (its last reply) instead of one per assistant turn")
    parser.add_argument("--all-paths", action="store_true", help="oasst: every tree path, not the best-ranked")
    parser.add_argument("--lang", default="en", help="oasst: keep this language ('all' keeps every one)")


def _setup(args):
    from gpt2chat.data import Budgets, FormatOptions, is_preference_source, sample_specs
    from gpt2chat.data.load import as_spec
    from gpt2chat.templates import get_template
    from gpt2chat.tokenizer import Tokenizer

    specs = [as_spec(text) for text in sample_specs(args.data, preference=args.kind == "preference")]
    template = get_template(args.template)
    tokenizer = Tokenizer.gpt2() if args.tokenizer == "gpt2" else Tokenizer.from_dir(args.tokenizer)
    template.ensure_tokens(tokenizer)
    kind = args.kind
    if kind == "auto":
        kind = "preference" if all(is_preference_source(spec) for spec in specs) else "sft"
    base = Budgets.preference() if kind == "preference" else Budgets.sft()
    budgets = Budgets(
        max_prompt_length=args.max_prompt_length if args.max_prompt_length is not None else base.max_prompt_length,
        max_response_length=(args.max_response_length if args.max_response_length is not None
                             else base.max_response_length),
        max_length=args.max_length if args.max_length is not None else base.max_length,
        prompt_truncation=args.prompt_truncation,
    )
    options = FormatOptions(lang=None if args.lang == "all" else args.lang, all_paths=args.all_paths)
    return specs, template, tokenizer, kind, budgets, options


def run_inspect(args) -> int:
    from collections import Counter

    from gpt2chat.data import load_conversations, load_preferences
    from gpt2chat.data.examples import preference_example, sft_example, sft_turn_targets
    from gpt2chat.data.report import format_preference_example, format_sft_example

    specs, template, tokenizer, kind, budgets, options = _setup(args)
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    wanted, skip, shown, drops, reports = max(args.num, 0), max(args.skip, 0), 0, Counter(), []
    for spec in specs:
        if shown >= wanted:
            break
        if kind == "preference":
            items, report = load_preferences(spec, strict=args.strict, options=options)
        else:
            items, report = load_conversations(spec, strict=args.strict, options=options)
        reports.append(report)
        for item in items:
            if kind == "preference":
                candidates = [(item, None)]
            else:
                candidates = [(t, item.source) for t in sft_turn_targets(item, not args.last_turn_only)]
            for target, source in candidates:
                if shown >= wanted:
                    break
                if kind == "preference":
                    example, reason = preference_example(tokenizer, target, template, budgets)
                else:
                    example, reason = sft_example(tokenizer, target, template, budgets, source)
                if example is None:
                    drops[reason] += 1
                    continue
                if skip:
                    skip -= 1
                    continue
                shown += 1
                render = format_preference_example if kind == "preference" else format_sft_example
                print(render(tokenizer, example, shown, colour))
                print()
    for report in reports:
        print(report.summary())
    for reason, count in drops.items():
        print(f"dropped {count} example(s) while looking: {reason}")
    if shown == 0:
        print("no example to show", file=sys.stderr)
        return 1
    return 0


def run_stats(args) -> int:
    from gpt2chat.data import build_preference_examples, build_sft_examples
    from gpt2chat.data.report import format_stats

    specs, template, tokenizer, kind, budgets, options = _setup(args)
    common = dict(val_fraction=args.val_fraction, seed=args.seed, dedup=not args.no_dedup, strict=args.strict,
                  options=options, cache_dir=args.cache_dir, use_cache=not args.no_cache)
    if kind == "preference":
        _, _, stats = build_preference_examples(specs, tokenizer, template, budgets, **common)
    else:
        _, _, stats = build_sft_examples(specs, tokenizer, template, budgets,
                                         per_turn=not args.last_turn_only, **common)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0
