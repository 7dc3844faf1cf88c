"""`gpt2chat export`: a checkpoint as one GGUF file (llama.cpp, Ollama, LM Studio) or a clean HF folder.

Heavy imports happen inside the handler. Bad input raises `Gpt2ChatError`; the dispatcher prints it as one
line and exits 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2chat.cli.model import TEMPLATES
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.export.gguf_file import DEFAULT_GGUF_TYPE, GGUF_TYPES  # light: numpy and gguf load on use

FORMATS = ("gguf", "hf")


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export",
        help="write a checkpoint as a GGUF file (llama.cpp, Ollama, LM Studio) or a merged HF folder",
        description="Export a checkpoint folder. --format gguf writes one GGUF file with the weights, the "
        "tokenizer (special tokens as control tokens) and the chat template; --format hf writes a clean "
        "Hugging Face folder. A LoRA adapter (--adapter) is merged into the weights first.",
    )
    export.add_argument("--model", required=True, help="checkpoint folder (or hub id when the hub is reachable)")
    export.add_argument("--format", required=True, choices=FORMATS, help="gguf: one .gguf file; hf: a folder")
    export.add_argument("--out", required=True, help="the .gguf file (gguf) or folder (hf) to write")
    export.add_argument("--type", default=None, choices=GGUF_TYPES, dest="quant",
                        help=f"GGUF weight type (default {DEFAULT_GGUF_TYPE}); norms, biases and the "
                        "position table stay f32")  # fmt: skip
    export.add_argument("--adapter", default=None, help="LoRA adapter folder (PEFT layout) to merge first")
    export.add_argument("--template", default=None, choices=TEMPLATES,
                        help="chat template to embed (default: the one saved with the checkpoint)")  # fmt: skip
    export.add_argument("--modelfile", nargs="?", const="", default=None, metavar="PATH",
                        help="gguf: also write an Ollama Modelfile (default PATH: the --out name with "
                        "the suffix .Modelfile)")  # fmt: skip
    export.add_argument("--force", action="store_true", help="replace an existing output")
    export.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    if args.format == "hf":
        for flag, value in (("--modelfile", args.modelfile), ("--type", args.quant)):
            if value is not None:
                raise Gpt2ChatError(f"{flag} goes with --format gguf, not --format hf")
        from gpt2chat.export import export_hf

        out = export_hf(args.model, args.out, adapter=args.adapter, template=args.template, force=args.force)
        print(f"wrote {out}")
        return 0

    from gpt2chat.export import export_gguf

    quant = args.quant or DEFAULT_GGUF_TYPE
    modelfile = None
    if args.modelfile is not None:
        modelfile = args.modelfile or str(Path(args.out).with_suffix(".Modelfile"))
    out = export_gguf(args.model, args.out, quant=quant, adapter=args.adapter, template=args.template,
                      force=args.force, modelfile=modelfile)  # fmt: skip
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({quant}, {size:.1f} MiB); run it with: llama-server -m {out}")
    if modelfile is not None:
        print(f"wrote {modelfile}; load it with: ollama create NAME -f {modelfile}")
    return 0
