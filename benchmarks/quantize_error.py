"""int8's relative logit error on the GPT-2 124M shape against fp32: ours per projection kind and in all,
and llama.cpp's own q8_0 on the SAME weights with the SAME metric (benchmarks/README.md, kernels section).

Metric: ||logits - logits_fp32|| / ||logits_fp32|| over a [2, 24] batch of random token ids (the one
tests/test_quantize.py bounds). The model is `init_checkpoint("gpt2")` (random weights of the real shapes,
seed 0). Rows:

- ours, one projection kind at a time: that kind's weights replaced by their int8 dequantization
  (`Int8Linear.rows`, exactly what the kernels compute with), everything else fp32: which kinds dominate;
- ours int8, all: the real `convert_for_inference(model, "int8")` (native kernels);
- llama.cpp f32 / q8_0: llama-cpp-python on `write_gguf(model, tok, quant=...)`, f32 KV cache, each row of
  ids evaluated from an empty cache. f32 shows the pipeline itself adds ~nothing.

    .venv/bin/python -m benchmarks.quantize_error              # needs llama-cpp-python for its last rows

Accuracy only, nothing timed. One JSON line per row after the table.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from benchmarks.peers import llama_cpp_logits
from gpt2chat.checkpoint import init_checkpoint, load_model
from gpt2chat.quantize import Int8Linear, convert_for_inference

KINDS = {"attn.c_attn (qkv)": "attn.c_attn", "attn.c_proj": "attn.c_proj", "mlp.c_fc": "mlp.c_fc",
         "mlp.c_proj": "mlp.c_proj", "lm_head = wte (tied)": "lm_head"}  # fmt: skip


def _relative(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.double() - reference).norm() / reference.norm()).item()


def _one_kind_error(model: nn.Module, suffix: str, ids: torch.Tensor, reference: torch.Tensor) -> float:
    saved = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.endswith(suffix):
                saved[name] = module.weight.detach().clone()
                int8 = Int8Linear(module.weight, None)
                module.weight.copy_(int8.rows(torch.arange(module.out_features)))
        with torch.inference_mode():
            error = _relative(model(ids), reference)
        for name, module in model.named_modules():
            if name in saved:
                module.weight.copy_(saved[name])
    return error


def _llama_cpp_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """Each row of `ids` from an empty cache, f32 KV cache."""
    import llama_cpp

    f32 = llama_cpp.GGML_TYPE_F32
    return torch.stack([torch.from_numpy(llama_cpp_logits(path, row, n_ctx=64, n_batch=64, type_k=f32, type_v=f32))
                        for row in ids.tolist()]).double()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = load_model(init_checkpoint("gpt2", Path(tmp) / "m"), device="cpu", dtype=torch.float32)
        model.eval()
        ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            reference = model(ids).double()
        rows = [(f"ours int8, only {label}", _one_kind_error(model, suffix, ids, reference))
                for label, suffix in KINDS.items()]  # fmt: skip
        with torch.inference_mode():
            int8 = convert_for_inference(model, "int8")
            rows.append(("ours int8, all (int8 activation blocks, native kernels)", _relative(int8(ids), reference)))
            for module in int8.modules():
                if isinstance(module, Int8Linear):
                    module.exact_activations = True
            rows.append(("ours int8, all (fp32 activations, exact_activations)", _relative(int8(ids), reference)))
            rows.append(("ours int4, all (Q4_0 format, searched scales, int8 activation blocks)",
                         _relative(convert_for_inference(model, "int4")(ids), reference)))
            rows.append(("ours fp16, all", _relative(convert_for_inference(model, "fp16")(ids), reference)))
        try:
            from gpt2chat.export import write_gguf

            for quant in ("f32", "f16", "q8_0", "q4_0"):
                path = write_gguf(model, tokenizer, Path(tmp) / f"{quant}.gguf", quant=quant)
                rows.append((f"llama.cpp {quant}, all", _relative(_llama_cpp_logits(path, ids), reference)))
        except ImportError as error:
            print(f"llama.cpp rows skipped: {error}")
    print("| weights | relative logit error vs fp32 |\n|---|---|")
    for label, error in rows:
        print(f"| {label} | {100 * error:.2f}% |")
    for label, error in rows:
        print(json.dumps({"row": label, "relative_logit_error": error}))


if __name__ == "__main__":
    main()
