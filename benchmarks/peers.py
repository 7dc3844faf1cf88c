"""The peers the benchmarks (and the llama.cpp tests) measure us against, set up one way everywhere:
transformers (`hf_model`, `hf_greedy`), TRL's SFTTrainer / DPOTrainer (`train_trl`) and llama.cpp's
logits (`llama_cpp_logits`). Each import happens inside the function, so a missing peer costs only its rows.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch


# ---------------------------------------------------------------------- transformers
def hf_model(folder: Path | str, dtype: torch.dtype, device: torch.device | str, **config):
    """`AutoModelForCausalLM` of `folder` in `dtype` on `device` (`dtype=` since transformers 4.56)."""
    import transformers
    from transformers import AutoModelForCausalLM

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return AutoModelForCausalLM.from_pretrained(folder, **{key: dtype}, **config).to(device).eval()


def hf_greedy(model, prompts: torch.Tensor, new_tokens: int, pad_id: int) -> torch.Tensor:
    """transformers' greedy `generate`, exactly `new_tokens` per row (no end-of-text stop)."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = pad_id
    with torch.inference_mode():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return out[:, prompts.shape[1]:]


# ---------------------------------------------------------------------- TRL
class StepClock:
    """A transformers TrainerCallback's worth of step timing, and the tokens (attention-mask ones, i.e. not
    padding) the batches of each step held."""

    def __init__(self, device: torch.device | str | None = None):
        from transformers import TrainerCallback

        clock = self
        cuda = device is not None and torch.device(device).type == "cuda"

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if cuda:
                    torch.cuda.synchronize(device)
                clock.seconds.append(time.perf_counter() - clock.started)
                clock.tokens.append(clock.pending)
                clock.pending = 0

        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self.pending = 0
        self.started = 0.0
        self.callback = Callback()

    def count(self, collate):
        """`collate`, counting the tokens of every batch it makes into the current step."""

        def counting(features):
            batch = collate(features)
            mask = batch.get("attention_mask")
            self.pending += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
            return batch

        return counting


def train_trl(kind: str, model, folder: Path | str, tokenizer, examples: list, *, out: str, batch_size: int,
              grad_accum: int, steps: int, seq: int, device: torch.device | str, packed: bool = True,
              gradient_checkpointing: bool = False, max_grad_norm: float = 1.0) -> StepClock:
    """`steps` optimizer steps of TRL's SFTTrainer (`kind == "sft"`: our examples' ids and assistant masks)
    or DPOTrainer (otherwise: the rendered text of our preference examples, reference log-probs precomputed
    before training), lr 1e-5 constant, no saving, gradient checkpointing only if asked; bf16 on CUDA, fp32 on CPU
    (no bf16 units there). Returns the clock of the steps."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    device = torch.device(device)
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    hf_tokenizer.pad_token_id = tokenizer.pad_token_id
    clock = StepClock(device)
    common = dict(output_dir=out, per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
                  max_steps=steps, learning_rate=1e-5, lr_scheduler_type="constant", logging_steps=1, report_to=[],
                  save_strategy="no", use_cpu=device.type == "cpu", bf16=device.type == "cuda",
                  gradient_checkpointing=gradient_checkpointing, max_grad_norm=max_grad_norm, dataloader_num_workers=0, disable_tqdm=True, max_length=seq, seed=0)
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        dataset = Dataset.from_dict({"input_ids": [e.input_ids for e in examples],
                                     "assistant_masks": [e.assistant_mask for e in examples]})
        trainer = SFTTrainer(model=model, args=SFTConfig(**common, packing=packed), train_dataset=dataset,
                             processing_class=hf_tokenizer, callbacks=[clock.callback])
    else:
        from trl import DPOConfig, DPOTrainer

        # TRL's DPOTrainer tokenizes text itself: the rendered text of the same examples (control tokens are
        # added tokens of the saved tokenizer, so they come back as the same ids)
        dataset = Dataset.from_dict({"prompt": [tokenizer.decode(e.prompt_ids) for e in examples],
                                     "chosen": [tokenizer.decode(e.chosen_ids) for e in examples],
                                     "rejected": [tokenizer.decode(e.rejected_ids) for e in examples]})
        trainer = DPOTrainer(model=model, args=DPOConfig(**common, beta=0.1, precompute_ref_log_probs=True),
                             train_dataset=dataset, processing_class=hf_tokenizer, callbacks=[clock.callback])
    trainer.data_collator = clock.count(trainer.data_collator)
    trainer.train()
    return clock


# ---------------------------------------------------------------------- llama.cpp
def llama_cpp_logits(path: Path | str, ids: list[int], threads: int = 2, **llama_options) -> np.ndarray:
    """llama.cpp's logits ([len(ids), vocab], float32) for every position of `ids`, evaluated from an empty
    cache by llama-cpp-python on the GGUF file `path`; `llama_options` go to `llama_cpp.Llama` (e.g.
    `type_k=llama_cpp.GGML_TYPE_F32, type_v=...` for an f32 KV cache instead of llama.cpp's f16 default)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), verbose=False, n_threads=threads,
                          **{"n_ctx": len(ids), "n_batch": len(ids), "logits_all": True, **llama_options})
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
