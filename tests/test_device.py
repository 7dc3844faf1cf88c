"""The one device / dtype policy: CUDA in bf16 when present, else CPU in fp32; explicit choices win."""

from __future__ import annotations

import pytest
import torch

from gpt2chat.device import DeviceError, device_and_dtype, resolve_device, resolve_dtype


def test_cpu_machine_defaults_to_cpu_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_and_dtype() == (torch.device("cpu"), torch.float32)
    assert resolve_dtype(None, "cpu") == torch.float32


def test_cuda_machine_defaults_to_the_local_rank_gpu_in_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device() == torch.device("cuda", 1)
    assert resolve_dtype() == torch.bfloat16
    assert device_and_dtype("cpu") == (torch.device("cpu"), torch.float32)  # the dtype follows the device
    assert device_and_dtype("cuda", "fp32") == (torch.device("cuda"), torch.float32)


@pytest.mark.parametrize(("name", "dtype"), [("bf16", torch.bfloat16), ("float16", torch.float16),
                                             ("torch.float32", torch.float32), (torch.float16, torch.float16)])
def test_dtype_names(name, dtype):
    assert resolve_dtype(name, "cpu") == dtype


def test_bad_choices_are_clear_errors(monkeypatch):
    with pytest.raises(DeviceError, match="unsupported dtype 'int8'"):
        resolve_dtype("int8", "cpu")
    with pytest.raises(DeviceError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        device_and_dtype("cuda")


def test_a_models_device_and_dtype_are_read_one_way_in_every_layout():
    import torch

    from gpt2chat.config import get_preset
    from gpt2chat.device import model_device_dtype
    from gpt2chat.model import GPT
    from gpt2chat.quantize import convert_for_inference

    model = GPT(get_preset("tiny")).eval()
    assert model_device_dtype(model) == (torch.device("cpu"), torch.float32)
    for mode in ("fp16", "int8"):  # compact weights, fp32 compute: the position table says so
        assert model_device_dtype(convert_for_inference(model, mode)) == (torch.device("cpu"), torch.float32)
    assert model_device_dtype(model.to(torch.bfloat16))[1] == torch.bfloat16
    # a module without a position table (a peer's): its first floating-point parameter
    peer = torch.nn.Sequential(torch.nn.Embedding(3, 2).to(torch.float16))
    assert model_device_dtype(peer) == (torch.device("cpu"), torch.float16)
