"""A GPT-2 checkpoint as one GGUF file that llama.cpp (and Ollama, LM Studio) loads and chats with.

Written with the `gguf` package, llama.cpp's own reader / writer library, in the layout llama.cpp's `gpt2`
architecture loads (`src/models/gpt2.cpp`):

* tensors `token_embd`, `position_embd`, `output_norm`, and per block `attn_norm`, `attn_qkv` (the fused
  Q, K, V projection: our `c_attn`), `attn_output`, `ffn_norm`, `ffn_up`, `ffn_down`, each `.weight` / `.bias`.
  Our projections are `nn.Linear` (`[out, in]`), which is exactly ggml's `{in, out}`: nothing is transposed
  (HF's Conv1D checkpoints are transposed once, on load, by `checkpoint.py`). The output head is tied to the
  token embedding, so no `output.weight` is written and llama.cpp reuses `token_embd`.
* types: `f32`; `f16` (2-D weights in half precision); `q8_0` and `q4_0` (2-D weights quantized with the
  `gguf` package's own Q8_0 code, and as Q4_0 holding the numbers of `--quantize int4`
  (`gpt2chat.kernels.blocks.quantize_int4`: each block's scale searched for the least squared error, never
  worse than llama.cpp's own max-abs rounding; `q4_0_blocks` lays them out as ggml does). Every 2-D weight, the tied head / token embedding included,
  gets the type. Norms, biases and the position embedding stay f32 in every type, as in llama.cpp's
  converter; a weight whose rows 32-blocks cannot tile stays f16.
* the tokenizer: GPT-2's byte-level BPE tokens and merges (`tokenizer.ggml.model = gpt2`, pre-tokenizer
  `gpt-2`), our added special tokens as CONTROL tokens (so text a user types that spells one stays plain
  text), bos = eos = `<|endoftext|>`, pad = `<|pad|>`, no BOS added, and the end-of-turn token of the
  checkpoint's chat template as `tokenizer.ggml.eot_token_id`, which llama.cpp adds to its end-of-generation
  set (it reads no other list of stop tokens).
* the chat template as Jinja in `tokenizer.chat_template`, without the `{% generation %}` markers our HF
  copy carries for assistant masks (`gguf_chat_template`).

GPT-Neo has no architecture in llama.cpp: exporting one is an ExportError. This module knows nothing about
training, sampling or serving.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gpt2chat.config import TANH_GELU  # llama.cpp's GPT-2 graph applies GELU in its tanh form (ggml_gelu)
from gpt2chat.errors import Gpt2ChatError
from gpt2chat.export.source import (
    ExportError,
    check_free_space,
    check_output,
    load_source,
    read_source_config,
    write_atomically,
)

if TYPE_CHECKING:
    import numpy as np

    from gpt2chat.config import ModelConfig
    from gpt2chat.model import GPT
    from gpt2chat.templates import ChatTemplate
    from gpt2chat.tokenizer import Tokenizer

__all__ = ["GGUF_TYPES", "DEFAULT_GGUF_TYPE", "export_gguf", "gguf_chat_template", "write_gguf"]

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
DEFAULT_GGUF_TYPE = "f16"
_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


@dataclass(frozen=True)
class _Tensor:
    name: str
    data: np.ndarray
    ggml_type: int | None  # None: the numpy dtype says it (f32 / f16)


def export_gguf(
    model: str | os.PathLike,
    out: str | os.PathLike,
    quant: str = DEFAULT_GGUF_TYPE,
    adapter: str | os.PathLike | None = None,
    template: str | None = None,
    force: bool = False,
    modelfile: str | os.PathLike | None = None,
) -> Path:
    """Write checkpoint `model` (+ `adapter` merged) as GGUF file `out`; returns its path.

    `quant` is one of GGUF_TYPES; `template` overrides the chat template saved with the checkpoint;
    `modelfile` also writes an Ollama Modelfile there. Existing outputs are refused unless `force`.
    Nothing is left behind when writing fails.
    """
    from gpt2chat.export.modelfile import write_modelfile

    if quant not in GGUF_TYPES:
        raise ExportError(f"unknown GGUF type {quant!r}: choose one of {', '.join(GGUF_TYPES)}")
    path = check_output(out, force)
    modelfile_path = check_output(modelfile, force) if modelfile is not None else None
    if modelfile_path is not None and modelfile_path.resolve() == path.resolve():
        raise ExportError(f"the Modelfile and the GGUF file are the same path: {path}")
    folder, config = read_source_config(model)
    _check_architecture(config, folder)
    chat = _chat_template(template)  # a bad name fails before the weights are read
    source, tokenizer = load_source(folder, adapter)
    if chat is None:
        chat = _chat_template(tokenizer.template_name)
    if chat is None and modelfile_path is not None:
        raise ExportError(f"{folder} has no chat template saved with it; name one with --template for the Modelfile")
    write_gguf(source, tokenizer, path, quant=quant, template=chat, name=folder.resolve().name)
    if modelfile_path is not None:
        write_modelfile(modelfile_path, path, chat, config.n_positions)
    return path


def _chat_template(name: str | None) -> ChatTemplate | None:
    if name is None:
        return None
    from gpt2chat.templates import get_template

    try:
        return get_template(name)
    except Gpt2ChatError as exc:
        raise ExportError(str(exc)) from exc


def _check_architecture(config: ModelConfig, folder: Path) -> None:
    if config.model_type != "gpt2":
        raise ExportError(
            f"{folder}: model_type {config.model_type!r} cannot be exported to GGUF: llama.cpp has no GPT-Neo "
            "architecture (its GPT-2 graph has no local attention and scales scores by 1/sqrt(d)); "
            "use `gpt2chat export --format hf` for transformers-based runners"
        )
    if config.activation_function not in TANH_GELU:
        raise ExportError(
            f"{folder}: activation_function {config.activation_function!r} cannot be exported to GGUF: "
            f"llama.cpp's gpt2 architecture computes tanh-GELU ({', '.join(TANH_GELU)})"
        )


def gguf_chat_template(jinja: str) -> str:
    """The HF chat template without its `{% generation %}` / `{% endgeneration %}` markers.

    They only mark the assistant's tokens for training masks; runners that do not know them (older
    llama.cpp builds, other Jinja engines) would reject the whole template.
    """
    return _GENERATION_TAG.sub("", jinja)


def write_gguf(
    model: GPT,
    tokenizer: Tokenizer,
    out: str | os.PathLike,
    quant: str = DEFAULT_GGUF_TYPE,
    template: str | ChatTemplate | None = None,
    name: str | None = None,
) -> Path:
    """Write an in-memory model and its tokenizer to GGUF file `out` (replaced if present).

    `template` defaults to the tokenizer's own (as saved with its checkpoint); without one the file has
    no chat template and no end-of-turn token.
    """
    import gguf

    if quant not in GGUF_TYPES:
        raise ExportError(f"unknown GGUF type {quant!r}: choose one of {', '.join(GGUF_TYPES)}")
    _check_architecture(model.config, Path(name or "model"))
    path = Path(out).expanduser()
    if template is None:
        template = tokenizer.template_name
    chat = _chat_template(template) if isinstance(template, str) else template
    eot = _end_of_turn_id(chat, tokenizer) if chat is not None else None
    merges = _bpe_merges(tokenizer)
    tensors = _tensors(model, quant)
    needed = sum(t.data.nbytes for t in tensors) + 64 * len(tokenizer) + 2**20  # + vocab and header
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(path, needed)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
        try:
            _add_hparams(writer, model.config, quant, name or path.stem)
            _add_tokenizer(writer, tokenizer, merges, model.config.vocab_size)
            if chat is not None:
                writer.add_eot_token_id(eot)
                writer.add_chat_template(gguf_chat_template(chat.jinja))
            for t in tensors:
                writer.add_tensor(t.name, t.data, raw_dtype=t.ggml_type)
            writer.add_size_label(gguf.size_label(*writer.get_total_parameter_count()))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=needed > 256 * 2**20)
        finally:
            writer.close()

    return write_atomically(path, write, needed_bytes=needed)


# ---------------------------------------------------------------------------------------------- weights
def _gguf_name(ours: str) -> str:
    """Our state-dict name -> llama.cpp's GGUF tensor name (from the gguf package's own name table)."""
    import gguf

    names = gguf.TENSOR_NAMES
    t = gguf.MODEL_TENSOR
    top = {"transformer.wte": names[t.TOKEN_EMBD], "transformer.wpe": names[t.POS_EMBD],
           "transformer.ln_f": names[t.OUTPUT_NORM]}  # fmt: skip
    per_block = {"ln_1": t.ATTN_NORM, "attn.c_attn": t.ATTN_QKV, "attn.c_proj": t.ATTN_OUT, "ln_2": t.FFN_NORM,
                 "mlp.c_fc": t.FFN_UP, "mlp.c_proj": t.FFN_DOWN}  # fmt: skip
    module, _, kind = ours.rpartition(".")
    if module in top:
        return f"{top[module]}.{kind}"
    match = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", module)
    if match and match[2] in per_block:
        return f"{names[per_block[match[2]]].format(bid=int(match[1]))}.{kind}"
    raise ExportError(f"no GGUF name for tensor {ours!r} (not part of a GPT-2 model)")


def _tensors(model: GPT, quant: str) -> list[_Tensor]:
    import gguf
    import numpy as np
    import torch

    from gpt2chat.kernels.blocks import quantize_int4

    quant_types = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}

    out = []
    for name, param in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the token embedding; llama.cpp falls back to token_embd
        data = param.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        gguf_name = _gguf_name(name)
        # 1-D tensors (norms, biases) and the position table stay f32 (llama.cpp's converter does the same)
        keep_f32 = quant == "f32" or data.ndim < 2 or name == "transformer.wpe.weight"
        if keep_f32:
            out.append(_Tensor(gguf_name, data, None))
        elif quant == "f16" or data.shape[-1] % gguf.GGML_QUANT_SIZES[quant_types[quant]][0]:
            out.append(_Tensor(gguf_name, data.astype(np.float16), None))  # rows the blocks cannot tile
        elif quant == "q4_0":
            q, scale = quantize_int4(torch.from_numpy(data))
            out.append(_Tensor(gguf_name, q4_0_blocks(q, scale), int(quant_types[quant])))
        else:
            q = quant_types[quant]
            out.append(_Tensor(gguf_name, gguf.quants.quantize(data, q), int(q)))
    return out


def q4_0_blocks(q, scale):
    """ggml's Q4_0 bytes of a weight's int4 numbers (q uint8 [N, K] in 0..15, scale fp16 [N, K / 32]):
    per block of 32, the fp16 scale, then 16 bytes whose byte j holds q[j] (low nibble) and q[j + 16]
    (high nibble); uint8 [N, K / 32 * 18], what `gguf.quants.quantize` returns for Q4_0."""
    import numpy as np

    rows, groups = scale.shape
    nibbles = q.view(rows, groups, 2, 16).numpy()
    packed = nibbles[:, :, 0] | (nibbles[:, :, 1] << 4)
    scales = scale.contiguous().numpy().view(np.uint8).reshape(rows, groups, 2)
    return np.concatenate([scales, packed], axis=2).reshape(rows, groups * 18)


def _file_type(quant: str) -> int:
    import gguf

    return int({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant])  # fmt: skip


def _add_hparams(writer, config: ModelConfig, quant: str, name: str) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.inner_dim)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---------------------------------------------------------------------------------------------- tokenizer
def _bpe_merges(tokenizer: Tokenizer) -> list[str]:
    """The merges of a byte-level BPE tokenizer as "left right" strings; anything else is refused."""
    data = json.loads(tokenizer.backend.to_str())
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise ExportError(
            "the checkpoint's tokenizer is not GPT-2's byte-level BPE (tokenizer.json model "
            f"{model.get('type')!r}, pre-tokenizer {pre.get('type')!r}); llama.cpp's gpt2 tokenizer cannot run it"
        )
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _end_of_turn_id(template: ChatTemplate, tokenizer: Tokenizer) -> int:
    """The id of the template's end-of-turn token; every token the template writes must be in the vocab."""
    missing = [t for t in (*template.special_tokens, template.end_of_turn) if tokenizer.token_to_id(t) is None]
    if missing:
        raise ExportError(
            f"chat template {template.name!r} needs tokens the checkpoint's tokenizer lacks: {missing}; "
            "export with the template the checkpoint was trained with (--template)"
        )
    return tokenizer.token_to_id(template.end_of_turn)


def _add_tokenizer(writer, tokenizer: Tokenizer, merges: list[str], rows: int) -> None:
    import gguf

    special = tokenizer.special_token_ids
    tokens, types = [], []
    for i in range(rows):
        token = tokenizer.id_to_token(i)
        if token is None:  # embedding rows beyond the tokenizer (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.eos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.eos_token_id)  # byte-level BPE never needs it; HF's config names it
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
