"""The weight formats `--quantize` can ask for: the one list every command's flag offers, kept free of torch
so that argument parsers can name them without importing it. `gpt2chat.quantize` builds them."""

from __future__ import annotations

QUANTIZE_MODES = ("fp16", "int8", "int4")
CPU_ONLY_MODES = ("int8", "int4")  # AVX2 integer kernels (portable torch ones elsewhere on the CPU)
QUANTIZE_HELP = (
    "store the weights compactly: fp16; int8 with one fp32 scale per 32 weights of a row; or int4 (llama.cpp's "
    "Q4_0 numbers: one fp16 scale per 32). int8 / int4 are CPU-only and round the activations to int8 blocks "
    "of 32 as llama.cpp does. Default: the checkpoint's weights as they are"
)
