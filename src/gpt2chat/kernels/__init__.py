"""y = x W^T + b for weights stored as fp32, fp16, int8 or int4, as torch custom ops that torch.compile traces.

The ops (namespace `gpt2chat`; x is [..., K] float, y is [..., N]):

    torch.ops.gpt2chat.linear_f32(x, weight, bias=None, small_m_max=-1)
        weight: float32 [N, K], row-major (nn.Linear's own tensor)
    torch.ops.gpt2chat.linear_f16(x, weight, out_features, bias=None, small_m_max=-1)
        weight: int16 holding IEEE half bit patterns, packed 4x8 (`pack_rows`: [ceil(N/4), ceil(K/8), 4, 8])
    torch.ops.gpt2chat.linear_i8(x, weight, scale, bias=None, small_m_max=-1)
        weight: int8, packed 4x8; scale: float32 [N, ceil(K/32)]; W[n, k] = weight[n, k] * scale[n, k // 32]
    torch.ops.gpt2chat.linear_i8_q8(x, weight, scale, bias=None, small_m_max=-1)
        as linear_i8, of x rounded to int8 per block of 32 columns (`portable.quantize_activations`, like
        llama.cpp's q8_0): integer products, so about 2x the rate of the widening linear_i8
    torch.ops.gpt2chat.linear_i4_q8(x, weight, scale, out_features, bias=None, small_m_max=-1)
        weight: uint8 [ceil(N/4), ceil(K/32), 64], two int4 a byte (`pack_int4`); scale: fp16 bits, int16
        [ceil(N/4), ceil(K/32), 4]; W = (q - 8) * scale, one scale per 32 weights of a row (llama.cpp's
        q4_0 blocks); x rounded to int8 blocks as for linear_i8_q8

    torch.ops.gpt2chat.decode_step(...)
        a whole GPT-2 decode step (one new token per row: the blocks and ln_f) in one native call, see
        csrc/decode.cpp and gpt2chat/fused_decode.py: a native CPU kernel and a fake one, no portable one

Every linear op has three kernels:
- a fake (meta) kernel, so `torch.compile(fullgraph=True)` traces a model that calls it;
- the native CPU kernel (csrc/linear.cpp and csrc/quantized.cpp: AVX2 + FMA + F16C, threaded over torch's own threads), compiled
  by g++ on first use (`load()`, see build.py) and used for fp32 activations on the CPU;
- the portable kernel (portable.py: plain torch), used on every other device and on the CPU when the native
  one cannot be had: no compiler, a CPU without AVX2, or `GPT2CHAT_KERNELS=portable` (which also skips the
  build). Then `load()` logs one warning line that says why, and everything still works, only slower.
`small_m_max` (-1 = the built-in default) is for benchmarks: up to that many input rows the native kernel
makes one pass over the weight, past it it hands the product to sgemm (widening fp16 / int8 / int4 by
tiles). The portable kernels compute the same numbers (up to the order of fp32 additions) on every path.

This package knows nothing about models; `gpt2chat.quantize` builds the modules that call these ops.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

from gpt2chat.kernels import portable
from gpt2chat.kernels.build import KernelBuildError, library_path, unsupported_reason
from gpt2chat.kernels.packing import (
    INT4_ZERO,
    INT8_GROUP,
    gather_int4_rows,
    gather_rows,
    pack_int4,
    pack_rows,
    unpack_int4,
    unpack_int4_scales,
    unpack_rows,
)

__all__ = ["load", "backend", "KernelBuildError", "pack_rows", "unpack_rows", "gather_rows", "INT8_GROUP",
           "pack_int4", "unpack_int4", "unpack_int4_scales", "gather_int4_rows", "INT4_ZERO"]  # fmt: skip

_log = logging.getLogger(__name__)
_LIB = torch.library.Library("gpt2chat", "DEF")
_SCHEMAS = {
    "linear_f32": "linear_f32(Tensor x, Tensor weight, Tensor? bias=None, int small_m_max=-1) -> Tensor",
    "linear_f16": "linear_f16(Tensor x, Tensor weight, int out_features, Tensor? bias=None, int small_m_max=-1) "
                  "-> Tensor",
    "linear_i8": "linear_i8(Tensor x, Tensor weight, Tensor scale, Tensor? bias=None, int small_m_max=-1) -> Tensor",
    "linear_i8_q8": "linear_i8_q8(Tensor x, Tensor weight, Tensor scale, Tensor? bias=None, int small_m_max=-1) "
                    "-> Tensor",
    "linear_i4_q8": "linear_i4_q8(Tensor x, Tensor weight, Tensor scale, int out_features, Tensor? bias=None, "
                    "int small_m_max=-1) -> Tensor",
}
_FAKES = {  # the output's shape: x's with the last dimension replaced by N
    "linear_f32": lambda x, weight, bias=None, small_m_max=-1: x.new_empty((*x.shape[:-1], weight.shape[0])),
    "linear_f16": lambda x, weight, out_features, bias=None, small_m_max=-1: x.new_empty((*x.shape[:-1], out_features)),
    "linear_i8": lambda x, weight, scale, bias=None, small_m_max=-1: x.new_empty((*x.shape[:-1], scale.shape[0])),
    "linear_i8_q8": lambda x, weight, scale, bias=None, small_m_max=-1: x.new_empty((*x.shape[:-1], scale.shape[0])),
    "linear_i4_q8": lambda x, weight, scale, out_features, bias=None, small_m_max=-1:
        x.new_empty((*x.shape[:-1], out_features)),
}  # fmt: skip

for _name, _schema in _SCHEMAS.items():
    _LIB.define(_schema)
    _LIB.impl(_name, getattr(portable, _name), "CompositeExplicitAutograd")
    torch.library.register_fake(f"gpt2chat::{_name}", _FAKES[_name], lib=_LIB)

# The GPT-2 decode step as one call (csrc/decode.cpp; gpt2chat/fused_decode.py builds its arguments and takes
# it only where the native kernels are loaded: it has no portable kernel, the module path is the fallback).
_LIB.define(
    "decode_step(Tensor ids, Tensor[] wte, int wte_format, int vocab, Tensor wpe, Tensor positions, Tensor? rows, "
    "int first_row, Tensor(a!)[] keys, Tensor(b!)[] values, Tensor[] weights, int[] formats, int n_head, int inner, "
    "float eps) -> Tensor"
)
torch.library.register_fake(
    "gpt2chat::decode_step", lambda ids, wte, wte_format, vocab, wpe, *args: wpe.new_empty((ids.numel(), 1, wpe.shape[1])),
    lib=_LIB,
)

_lock = threading.Lock()
_backend: str | None = None


def load() -> str:
    """Make the native CPU kernels available if this machine can have them; return the CPU backend in use.

    "native" (built or found in the cache, loaded) or "portable" (with one warning line saying why, unless
    `GPT2CHAT_KERNELS=portable` asked for it). Safe to call often and from several threads: the work happens
    once per process.
    """
    global _backend
    with _lock:
        if _backend is None:
            _backend = _load_native()
        return _backend


def backend() -> str:
    """The CPU backend of the ops: "native" or "portable" (loads first, see `load`)."""
    return load()


def _load_native() -> str:
    if os.environ.get("GPT2CHAT_KERNELS", "").strip().lower() == "portable":
        return "portable"
    reason = unsupported_reason()
    if reason is None:
        try:
            torch.ops.load_library(str(library_path()))
            return "native"
        except KernelBuildError as exc:
            reason = str(exc)
        except OSError as exc:  # a library that will not load (a foreign or damaged file)
            reason = f"cannot load the built library ({exc})"
    _log.warning("gpt2chat: native CPU kernels unavailable (%s); using the portable torch kernels (slower "
                 "decode; set GPT2CHAT_KERNELS=portable to skip this check)", reason)  # fmt: skip
    return "portable"

