"""The one device / dtype policy: where a model runs, and in which precision, when the caller does not say.

Default: CUDA when present (this process's device under torchrun: `LOCAL_RANK`), in bfloat16; otherwise the
CPU in float32. Loading (`checkpoint.load_model`), generation (`Engine`), training (`train/distributed.py`,
whose fp32 master weights take bf16 autocast where this policy says bf16) and evaluation all ask here.
Explicit arguments win; a name we do not know, or CUDA asked for where there is none, is a `DeviceError`.

`model_device_dtype(model)` is the one way to read where a loaded model runs and in which dtype it
computes (its position table: plain floating point in every inference layout, fp16 / int8 included).

Knows torch only: no model classes, files or flags.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from gpt2chat.errors import Gpt2ChatError

if TYPE_CHECKING:
    import torch

__all__ = ["DeviceError", "DTYPE_NAMES", "resolve_device", "resolve_dtype", "device_and_dtype", "model_device_dtype"]

# accepted spellings -> torch attribute
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16",
               "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16"}  # fmt: skip


class DeviceError(Gpt2ChatError):
    """A device or dtype that cannot be used here (unknown name, CUDA without a GPU)."""


def resolve_device(device: Any = None) -> torch.device:
    """`device` as a torch.device; None: CUDA (the local rank's GPU) when available, else the CPU."""
    import torch

    if device is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"unknown device {device!r} ({exc}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device}: CUDA is not available on this machine; use cpu")
    return device


def resolve_dtype(dtype: Any = None, device: Any = None) -> torch.dtype:
    """`dtype` as a torch.dtype (a name from DTYPE_NAMES or a torch.dtype); None: bf16 on CUDA, fp32 elsewhere."""
    import torch

    if dtype is None:
        return torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = DTYPE_NAMES.get(str(dtype).removeprefix("torch.").lower())
    if name is None:
        raise DeviceError(f"unsupported dtype {dtype!r}: use float32, bfloat16 or float16")
    return getattr(torch, name)


def device_and_dtype(device: Any = None, dtype: Any = None) -> tuple[torch.device, torch.dtype]:
    """Both at once: the dtype default follows the device chosen."""
    resolved = resolve_device(device)
    return resolved, resolve_dtype(dtype, resolved)


def model_device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    """The device and compute dtype of a loaded model: those of its position-embedding table
    (`transformer.wpe`, never quantized), else of its first floating-point parameter."""
    wpe = getattr(getattr(model, "transformer", None), "wpe", None)
    weight = getattr(wpe, "weight", None)
    if weight is None:
        weight = next(p for p in model.parameters() if p.dtype.is_floating_point)
    return weight.device, weight.dtype
