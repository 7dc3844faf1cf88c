"""Command-line front: `gpt2chat <command> ...`.

Each area registers its subcommands from its own file (`model`, `data`, `train`, `eval`, `serve`, `export`).
Area files keep heavy imports inside their handlers, so `gpt2chat --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gpt2chat import __version__
from gpt2chat.errors import Gpt2ChatError

AREAS = ("model", "data", "train", "eval", "serve", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt2chat",
        description="Turn GPT-2 into a chat assistant: data, SFT / LoRA / DPO / ORPO, evaluation, serving.",
    )
    parser.add_argument("--version", action="version", version=f"gpt2chat {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for area in AREAS:
        try:
            module = importlib.import_module(f"gpt2chat.cli.{area}")
        except ModuleNotFoundError as exc:  # an area not built yet must not break the others
            if exc.name == f"gpt2chat.cli.{area}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed: a command can say how to run it again
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        result = handler(args)
    except Gpt2ChatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
