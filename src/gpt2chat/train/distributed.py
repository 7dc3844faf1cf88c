"""Processes: start / stop `torch.distributed` when launched by torchrun, wrap the model (DDP or FSDP).

`torchrun --nproc-per-node N -m gpt2chat sft ...` sets RANK / WORLD_SIZE / LOCAL_RANK; we join the group
(nccl on CUDA, gloo on CPU), each process takes its share of every step (see `batching.BatchPlan`), and
DDP or FSDP averages gradients. Objectives pre-divide their losses by the whole step's normaliser, so the
trainer multiplies by the world size to undo that averaging: the result is the gradient of the global batch.

FSDP is FSDP2 (`fully_shard`): each transformer block is one shard group, the root (embeddings, tied head,
final LayerNorm) another. It shards the module in place, so the model object stays the model (no
`.module`), its parameters become DTensors, and a plain copy for saving is rebuilt from a meta-device
skeleton taken before sharding (`meta_copy`, `gather_full_model`).

`distributed = "auto"` (the default) means DDP, except full fine-tuning of a model of `FSDP_AUTO_PARAMS`
or more (gpt2-large, gpt2-xl, gpt-neo-1.3b), where a whole replica plus AdamW's two moments per process
(16 bytes a parameter in fp32) is what FSDP exists to avoid. LoRA runs stay on DDP: their optimizer state
is small and the frozen base needs no gradients.

This module knows processes and wrappers, not losses or data.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt2chat.device import resolve_device
from gpt2chat.errors import Gpt2ChatError

FSDP_AUTO_PARAMS = 700_000_000


@dataclass
class DistState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "none"          # none | ddp | fsdp
    started_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup(mode: str, device_hint: str | None) -> tuple[DistState, torch.device]:
    """Join the process group if torchrun started us; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_hint or None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    state = DistState(rank=rank, world_size=world_size, local_rank=local_rank)
    if world_size > 1 and mode != "none":
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
            state.started_here = True
        state.mode = "fsdp" if mode == "fsdp" else "ddp"
    elif world_size > 1:
        state = DistState()   # distributed = "none": every process trains alone
    return state, device


def settle_auto(state: DistState, requested: str, n_params: int, lora: bool) -> None:
    """`distributed = "auto"` under torchrun: switch DDP to FSDP for full fine-tuning of large models."""
    if requested == "auto" and state.mode == "ddp" and not lora and n_params >= FSDP_AUTO_PARAMS:
        state.mode = "fsdp"


def teardown(state: DistState) -> None:
    if state.started_here and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, state: DistState, device: torch.device) -> torch.nn.Module:
    if state.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if state.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # FSDP1 (`FullyShardedDataParallel`) refuses CPU ("FSDP needs a non-CPU accelerator device");
        # FSDP2 runs on gloo as well as nccl.
        mesh = init_device_mesh(device.type, (state.world_size,))
        for block in _blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)   # the rest: embeddings, tied head, final LayerNorm
    return model


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    transformer = getattr(model, "transformer", None)
    blocks = getattr(transformer, "h", None)
    return list(blocks) if blocks is not None else []


@contextmanager
def no_sync(model: torch.nn.Module, skip: bool) -> Iterator[None]:
    """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP) on all but the last micro-batch of a step."""
    if not skip:
        yield
    elif hasattr(model, "set_requires_gradient_sync"):     # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):                          # DDP
        with model.no_sync():
            yield
    else:
        yield


def reshard(model: torch.nn.Module) -> None:
    """FSDP: put the root's shards back after a forward without a backward (evaluation, DPO's reference pass).

    FSDP2 keeps the root's parameters gathered after its forward, expecting the backward to follow; until
    they are resharded, the module's parameters are not the sharded ones the optimizer holds, and saving
    the optimizer state fails (`KeyError` in `get_optimizer_state_dict`).
    """
    if hasattr(model, "reshard"):
        model.reshard()


def all_reduce_sum(values: torch.Tensor, state: DistState) -> torch.Tensor:
    """The sum of `values` over every process (a device tensor; nothing is read back to the host)."""
    if not state.active or state.mode == "none":
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values


def barrier(state: DistState, failure: Exception | None = None, device: torch.device | None = None) -> None:
    """Every process waits here for the others. With `failure` (what this process hit before it, e.g. rank 0's
    failed checkpoint write) the wait carries it: when any process brings one, every process raises (that
    one its own error, the others a Gpt2ChatError saying so), so none waits forever at the next collective
    for a process that stopped. `device`: where the flag lives (CUDA for nccl)."""
    if state.active and state.mode != "none" and dist.is_initialized():
        failed = torch.tensor([0 if failure is None else 1], device=device or torch.device("cpu"))
        dist.all_reduce(failed)
        if failure is None and int(failed.item()):
            raise Gpt2ChatError(f"process {state.rank}: stopping because another process failed "
                                "(its own message says why)")
    if failure is not None:
        raise failure


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model's structure (LoRA layers and tied weights included) with parameters on the meta device.

    Taken before `wrap` shards the model, so that `gather_full_model` can rebuild a plain module later
    without a second full copy of the weights in memory. Of a `torch.compile`d model it copies the module
    inside, whose parameter names are those of the gathered state dict (no `_orig_mod.`).
    """
    model = getattr(model, "_orig_mod", model)
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    skeleton = copy.deepcopy(model, memo)
    for module in skeleton.modules():      # GPT.compile_blocks' compiled calls belong to the original blocks
        module._compiled_call_impl = None
    return skeleton


def gather_full_model(model: torch.nn.Module, skeleton: torch.nn.Module) -> torch.nn.Module | None:
    """FSDP: the full weights gathered on rank 0 into a plain CPU copy of `skeleton`; None on other ranks.

    A collective: every process must call it. Parameters shared in the skeleton (the tied head) stay shared.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:        # cpu_offload leaves the gathered weights on rank 0 only
        return None
    memo = {id(p): torch.nn.Parameter(full[name], requires_grad=p.requires_grad)
            for name, p in skeleton.named_parameters()}
    return copy.deepcopy(skeleton, memo)
