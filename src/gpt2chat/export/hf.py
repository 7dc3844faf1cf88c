"""A checkpoint (with a LoRA adapter merged in) as a clean Hugging Face folder for transformers-based runners.

The folder is what `checkpoint.save_pretrained` writes (config, float32 safetensors, tokenizer files with the
chat template as Jinja), built beside the output and renamed into place, so a failure leaves no partial
folder. GPT-2 and GPT-Neo both work. This module knows nothing about GGUF.
"""

from __future__ import annotations

import os
from pathlib import Path

from gpt2chat.export.source import check_output, load_source, read_source_config, replace_folder

__all__ = ["export_hf"]


def export_hf(
    model: str | os.PathLike,
    out: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    template: str | None = None,
    force: bool = False,
) -> Path:
    """Write checkpoint `model` (+ `adapter` merged) as an HF folder `out`; returns its path.

    `template` overrides the chat template saved with the checkpoint. A non-empty `out` is refused unless
    `force`.
    """
    from gpt2chat.checkpoint import save_pretrained

    path = check_output(out, force, folder=True)
    folder, _ = read_source_config(model)
    source, tokenizer = load_source(folder, adapter)
    return replace_folder(path, lambda tmp: save_pretrained(source, tokenizer, tmp, template=template))
