"""How closely llama.cpp's logits on our exported GGUF files follow our PyTorch model (docs/EXPORT.md's table).

For each model and GGUF type: the max abs logit difference and the teacher-forced top-1 agreement over the
same 256 positions of OASST1 validation text, llama.cpp (llama-cpp-python) against our fp32 forward. One
JSON line per row. Accuracy, not speed: nothing here is timed.

    .venv/bin/python -m benchmarks.export_agreement [--models tiny,tiny-std0.05,gpt2] [--shared ../shared]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.peers import llama_cpp_logits
from gpt2chat.checkpoint import init_checkpoint, load_model
from gpt2chat.export import write_gguf

CASES = [("f32", "f32"), ("f32", "f16"), ("f16", "f16"), ("q8_0", "f16")]  # (GGUF type, KV-cache type)


def main() -> None:
    import llama_cpp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,tiny-std0.05,gpt2")
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    parser.add_argument("--positions", type=int, default=256)
    args = parser.parse_args()
    rows = [json.loads(line)["text"] for line in (Path(args.shared) / "data/oasst1/en-validation.jsonl").open()]
    kv_types = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.models.split(","):
            arch, _, scale = label.partition("-std")
            folder = init_checkpoint(arch, Path(tmp) / label, seed=1 if scale else 0, std=float(scale) if scale else None)
            model, tok = load_model(folder, device="cpu", dtype=torch.float32)
            ids = tok.encode("\n\n".join(rows[:400]))[: args.positions]
            with torch.no_grad():
                ours = model(torch.tensor([ids]))[0].numpy()
            for quant, kv in CASES:
                path = write_gguf(model, tok, Path(tmp) / f"{label}-{quant}.gguf", quant=quant)
                theirs = llama_cpp_logits(path, ids, type_k=kv_types[kv], type_v=kv_types[kv])
                print(json.dumps({"model": label, "gguf": quant, "kv_cache": kv, "positions": len(ids),
                                  "logit_absmax": round(float(np.abs(ours).max()), 3),
                                  "max_abs_diff": float(f"{np.abs(theirs - ours).max():.3g}"),
                                  "top1_agreement": round(float((theirs.argmax(-1) == ours.argmax(-1)).mean()), 4)}),
                      flush=True)  # fmt: skip
                path.unlink()


if __name__ == "__main__":
    main()
