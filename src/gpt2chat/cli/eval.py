"""`gpt2chat eval`: the report card of one or more checkpoints (a thin front over `evaluate_models`).

Heavy imports (torch, the evaluation package) happen inside the handler.
"""

from __future__ import annotations

import argparse

from gpt2chat.weight_formats import QUANTIZE_MODES


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value

    return parse


_positive_int = _int_at_least(1)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate checkpoints: perplexity, preference accuracy, BLEU, FLOPs, speed, replies",
        description="Evaluate checkpoints and write report.md, report.json and PNG plots into --out: "
                    "perplexity on held-out conversations (assistant tokens through each checkpoint's "
                    "template, and plain text), preference accuracy and reward margin, BLEU / reward / "
                    "repetition penalty / distinct-n of generated replies, parameters, FLOPs per token, "
                    "prefill and decode tokens/s with MFU / memory-bandwidth utilisation, side-by-side "
                    "replies, and optionally lm-evaluation-harness scores.")
    parser.add_argument("--model", action="append", required=True, metavar="PATH",
                        help="checkpoint folder or hub id; repeat for several (side by side)")
    parser.add_argument("--label", action="append", default=None, help="display name per --model (in order)")
    parser.add_argument("--ref", default=None, help="reference checkpoint: DPO implicit reward instead of "
                                                    "reference-free average log-prob")
    parser.add_argument("--data", default=None, metavar="SPEC",
                        help="held-out conversations: FORMAT:PATH, or 'heldout' for the validation split the "
                             "training run saved (default: that split when the models come from a run, else "
                             "oasst1 validation from ../shared)")
    parser.add_argument("--pref-data", default=None, metavar="SPEC",
                        help="held-out preference pairs: FORMAT:PATH or 'heldout' (default: the run's split, "
                             "else ultrafeedback heldout-200 from ../shared)")
    parser.add_argument("--strict", action="store_true",
                        help="stop with an error when evaluation rows are training rows of a model (default: a "
                             "warning in the summary)")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="side-by-side prompts, one per line or a JSON list (default: seed 000's three)")
    parser.add_argument("--heldout-prompts", type=_int_at_least(0), default=3, metavar="N",
                        help="side-by-side also answers the first N held-out conversations (default 3)")
    parser.add_argument("--max-rows", type=_positive_int, default=None,
                        help="use the first N conversations and the first N pairs")
    parser.add_argument("--gen-rows", type=_positive_int, default=16,
                        help="conversations whose last reply is generated for BLEU / reward (default 16)")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=64, help="tokens per reply (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 seeded sampling")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.1, help="DPO implicit-reward beta (with --ref)")
    parser.add_argument("--harness", default=None, metavar="TASKS",
                        help="lm-evaluation-harness tasks, comma-separated: local task files (task.yaml, run "
                             "offline), lm-eval task names (need the hub, or their datasets in the cache) such "
                             "as arc_easy or winogrande:5, or leaderboard (ARC 25-shot, HellaSwag 10, MMLU 5, "
                             "TruthfulQA 0); needs the harness extra")
    parser.add_argument("--harness-limit", type=_positive_int, default=None,
                        help="examples per harness task (quick runs; not leaderboard-comparable)")
    parser.add_argument("--skip", default="", help="comma list of sections to skip: ppl,pref,gen,speed,side")
    parser.add_argument("--out", required=True, help="folder for report.md, report.json and plots")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                        help="time the speed rows with compact weights (as `gpt2chat generate --quantize`)")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--batch-tokens", type=_positive_int, default=2048, help="tokens per scoring forward")
    parser.add_argument("--speed-prompt-tokens", type=_positive_int, default=128)
    parser.add_argument("--speed-decode-steps", type=_positive_int, default=128,
                        help="decode steps per timed run (>= 64; default 128)")
    parser.add_argument("--speed-repeats", type=_positive_int, default=5,
                        help="timed runs per checkpoint, round-robin (>= 3; median and range; default 5)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from gpt2chat.evaluate.report_card import evaluate_models

    skip = tuple(part.strip() for part in args.skip.split(",") if part.strip())
    report = evaluate_models(
        args.model, args.out, ref=args.ref, data=args.data, pref_data=args.pref_data, strict=args.strict,
        prompts=args.prompts, heldout_prompts=args.heldout_prompts, quantize=args.quantize,
        max_rows=args.max_rows, gen_rows=args.gen_rows, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, beta=args.beta, harness=args.harness,
        harness_limit=args.harness_limit, skip=skip, seed=args.seed, device=args.device, dtype=args.dtype,
        threads=args.threads, batch_tokens=args.batch_tokens, speed_prompt_tokens=args.speed_prompt_tokens,
        speed_decode_steps=args.speed_decode_steps, speed_repeats=args.speed_repeats, labels=args.label,
        progress=not args.no_progress)
    for entry in report["models"]:
        ppl = ((entry.get("perplexity") or {}).get("assistant") or {}).get("ppl")
        pref = (entry.get("preference") or {}).get("accuracy")
        bleu = (entry.get("generation") or {}).get("bleu")
        speed = (entry.get("speed") or {}).get("decode_tokens_per_s")
        busy = "decode_tokens_per_s" in ((entry.get("speed") or {}).get("busy_machine") or {})
        print(f"{entry['label']}: params {entry['parameters']:,}"
              + (f", ppl {ppl:.3f}" if ppl is not None else "")
              + (f", preference accuracy {pref:.3f}" if pref is not None else "")
              + (f", BLEU {bleu:.2f}" if bleu is not None else "")
              + (", decode: not a result, the machine was busy (see the report)" if busy
                 else f", decode {speed:.1f} tok/s" if speed is not None else ""))
    for warning in report.get("warnings") or []:
        print(f"warning: {warning}")
    print(f"report: {args.out}/report.md, {args.out}/report.json")
    return 0
