"""`gpt2chat init`, `gpt2chat generate` and `gpt2chat chat`: make a checkpoint, continue a text, chat.

Heavy imports (torch, the model, the tokenizer) happen inside the handlers so `gpt2chat --help` stays fast.
Bad input raises `Gpt2ChatError`; the dispatcher prints it as one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from gpt2chat.device import model_device_dtype
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.weight_formats import QUANTIZE_HELP, QUANTIZE_MODES

ARCHS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt-neo-125m", "gpt-neo-1.3b", "tiny", "tiny-neo")
TEMPLATES = ("llama3-context", "user-assistant", "plain", "guanaco")
CHAT_HELP = "commands: /reset (forget the conversation), /system TEXT (set the system message), /exit"


def register(subparsers: argparse._SubParsersAction) -> None:
    init = subparsers.add_parser(
        "init",
        help="write a randomly initialised checkpoint folder (offline, for from-scratch work and tests)",
        description="Write a checkpoint folder with random weights, the GPT-2 tokenizer and a chat template; "
        "transformers loads it with AutoModelForCausalLM / AutoTokenizer.",
    )
    init.add_argument("--arch", required=True, choices=ARCHS, help="model shape")
    init.add_argument("--out", required=True, help="folder to write")
    init.add_argument("--template", default="llama3-context", choices=TEMPLATES, help="chat template")
    init.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    init.add_argument("--force", action="store_true", help="replace an existing folder at --out")
    init.set_defaults(handler=run_init)

    generate = subparsers.add_parser(
        "generate",
        help="continue a text with a model (raw continuation, no chat template)",
        description="Print the model's continuation of --prompt, streamed. --temperature 0 is greedy.",
    )
    add_model_args(generate)
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    generate.add_argument("--json-schema", default=None, metavar="FILE",
                          help="constrain the continuation to one JSON value matching the JSON Schema in FILE")
    _add_sampling_args(generate, default_new_tokens=64)
    generate.set_defaults(handler=run_generate)

    chat = subparsers.add_parser(
        "chat",
        help="chat with a model in the terminal (streamed, multi-turn)",
        description=f"Multi-turn chat in the terminal; history is carried as context. {CHAT_HELP}.",
    )
    add_model_args(chat)
    chat.add_argument("--template", default=None, choices=TEMPLATES,
                      help="chat template (default: the one saved with the checkpoint)")  # fmt: skip
    chat.add_argument("--system", default=None, help="system message")
    _add_sampling_args(chat, default_new_tokens=256, default_preset="chat")
    chat.set_defaults(handler=run_chat)


def add_model_args(parser: argparse.ArgumentParser, model: bool = True) -> None:
    """The options that say which model to load and how: generate, chat, serve and telegram share them
    (`model=False` when the caller declares --model itself)."""
    if model:
        parser.add_argument(
            "--model", required=True, help="checkpoint folder (or hub id when the hub is reachable)"
        )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="default: bfloat16 on CUDA, float32 on CPU")  # fmt: skip
    parser.add_argument("--quantize", default=None, choices=QUANTIZE_MODES, help=QUANTIZE_HELP)


def load_inference_model(args: argparse.Namespace):
    """(folder, model, tokenizer, device, dtype) for the model options of `add_model_args`: the one way
    the front-end commands load a model to generate with (`gpt2chat.quantize.load_for_inference`, which
    refuses a --quantize the device cannot do before reading any weight)."""
    from gpt2chat.checkpoint import resolve_checkpoint
    from gpt2chat.quantize import load_for_inference

    folder = resolve_checkpoint(args.model)
    try:
        model, tokenizer = load_for_inference(folder, quantize=args.quantize, device=args.device, dtype=args.dtype)
    except RuntimeError as exc:  # e.g. a device that is not there
        raise Gpt2ChatError(f"cannot load {folder} on {args.device or 'the default device'}: {exc}") from exc
    return folder, model, tokenizer, *model_device_dtype(model)


def _add_sampling_args(parser: argparse.ArgumentParser, default_new_tokens: int, default_preset=None) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--preset", default=default_preset, choices=("greedy", "chat", "focused"),
                       help=f"sampling preset; the flags below override it (default: {default_preset or 'none'})")  # fmt: skip
    group.add_argument("--max-new-tokens", type=int, default=default_new_tokens,
                       help=f"most tokens to generate (default {default_new_tokens})")  # fmt: skip
    group.add_argument(
        "--temperature", type=float, default=None, help="0 = greedy (default 1.0 or the preset's)"
    )
    group.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    group.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (1 = off)")
    group.add_argument(
        "--repetition-penalty", type=float, default=None, help="> 1 discourages repeats (1 = off)"
    )
    group.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")


def sampling_params(args: argparse.Namespace):
    """SamplingParams from a preset plus the flags given (no stop ids: the text pipeline adds them);
    bad values raise Gpt2ChatError naming the field."""
    from gpt2chat.sampling import SamplingParams, get_preset

    base = get_preset(args.preset) if args.preset else SamplingParams()
    changes = {"max_new_tokens": args.max_new_tokens}
    for name in ("temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    return base.replace(**changes)


def _load(args: argparse.Namespace):
    from gpt2chat.engine import Engine

    folder, model, tokenizer, device, dtype = load_inference_model(args)
    return folder, Engine(model, device=device, dtype=dtype), tokenizer


# ---------------------------------------------------------------------- init
def run_init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gpt2chat.checkpoint import init_checkpoint

    if Path(args.out).exists() and any(Path(args.out).iterdir()) and not args.force:
        raise Gpt2ChatError(f"{args.out} already exists and is not empty; pass --force to replace it")
    out = init_checkpoint(args.arch, args.out, template=args.template, seed=args.seed)
    print(f"wrote a random {args.arch} checkpoint ({args.template} template) to {out}")
    return 0


# ---------------------------------------------------------------------- generate
def run_generate(args: argparse.Namespace) -> int:
    from gpt2chat.pipeline import TextPipeline

    sampling_params(args)  # check the flags before loading anything
    if not args.prompt:
        raise Gpt2ChatError("--prompt is empty: give some text to continue")
    schema = _read_json_schema(args.json_schema) if args.json_schema else None
    _, engine, tokenizer = _load(args)
    # a raw continuation: no template; the checkpoint's stop ids are what its generation_config.json lists,
    # so transformers' generate agrees
    pipeline = TextPipeline.for_model(engine.model, tokenizer, chat=False)
    prompt = pipeline.encode(args.prompt)
    params = pipeline.params(sampling_params(args), len(prompt), stop=not args.ignore_eos)
    if schema is not None:
        from gpt2chat.grammar import Constraint

        width = int(getattr(engine.model.config, "vocab_size", len(tokenizer)))
        params = params.replace(constraint=Constraint.json_schema(schema, tokenizer, width,
                                                                  what=f"--json-schema {args.json_schema}"))
    out = sys.stdout
    # a raw continuation shows control tokens as text, as `tokenizer.decode` does
    reply = pipeline.reply(chat=False, show_control_tokens=True)
    request = engine.submit(prompt, params)
    for piece in reply.pieces(request):
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    if schema is not None and reply.finish_reason(request.finish_reason) == "length":
        # the grammar held every token, but the reply ended before the JSON did: say so, and fail a script
        print(f"error: the reply reached --max-new-tokens ({args.max_new_tokens}) before the JSON was complete; "
              "it does not parse: raise --max-new-tokens", file=sys.stderr)
        return 1
    return 0


def _read_json_schema(path: str):
    """The JSON Schema in `path`; a missing file or bad JSON is a `Gpt2ChatError` naming it."""
    import json
    from pathlib import Path

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Gpt2ChatError(f"--json-schema {path}: cannot read it ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise Gpt2ChatError(f"--json-schema {path}: not valid JSON ({exc.msg} at line {exc.lineno}, "
                            f"column {exc.colno})") from None


# ---------------------------------------------------------------------- chat
def run_chat(args: argparse.Namespace) -> int:
    sampling_params(args)
    folder, engine, tokenizer = _load(args)
    from gpt2chat.chat import ChatSession

    session = ChatSession(engine, tokenizer, args.template, system=args.system, params=sampling_params(args))
    out = sys.stdout
    print(f"gpt2chat: {folder} ({session.template.name} template, {engine.device.type}). {CHAT_HELP}.")
    out.flush()
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                session.reset()
                print("(conversation cleared)")
                continue
            if command == "/system":
                session.set_system(rest.strip() or None)
                print(f"(system message {'set' if rest.strip() else 'cleared'})")
                continue
            if command == "/help":
                print(CHAT_HELP)
                continue
            print(f"unknown command {command}; {CHAT_HELP}")
            continue
        try:
            pieces = session.send(text)
        except Gpt2ChatError as exc:  # e.g. a message too long for the context: say so, keep chatting
            print(f"error: {exc}")
            continue
        if session.last_dropped_turns:
            turns = session.last_dropped_turns
            print(f"(the {turns} oldest turn{'s' if turns != 1 else ''} no longer fit the model's context of "
                  f"{session.context} tokens and {'were' if turns != 1 else 'was'} dropped; /reset starts afresh)")
        out.write("assistant> ")
        out.flush()
        try:
            for piece in pieces:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            pieces.close()
            out.write(" [interrupted]")
        out.write("\n")
        out.flush()
