"""Processes: start / stop `torch.distributed` when launched by torchrun, wrap the model (DDP or FSDP).

`torchrun --nproc-per-node N -m gpt2chat sft ...` sets RANK / WORLD_SIZE / LOCAL_RANK; we join the group
(nccl on CUDA, gloo on CPU), each process takes its share of every step (see `batching.BatchPlan`), and
DDP averages gradients. Objectives pre-divide their losses by the whole step's normaliser, so the wrapper
multiplies by the world size to undo DDP's averaging: the result is the gradient of the global batch.

This module knows processes and wrappers, not losses or data.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
    if device_hint:
        device = torch.device(device_hint)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
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


def teardown(state: DistState) -> None:
    if state.started_here and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, state: DistState, device: torch.device) -> torch.nn.Module:
    if state.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if state.mode == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        block_types = {type(block) for block in _blocks(model)}
        return FullyShardedDataParallel(
            model,
            auto_wrap_policy=ModuleWrapPolicy(block_types) if block_types else None,
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            device_id=device if device.type == "cuda" else None,
            use_orig_params=True,
        )
    return model


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    transformer = getattr(model, "transformer", None)
    blocks = getattr(transformer, "h", None)
    return list(blocks) if blocks is not None else []


def no_sync(model: torch.nn.Module, skip: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return nullcontext()


def all_reduce_sum(values: list[float], state: DistState, device: torch.device) -> list[float]:
    if not state.active or state.mode == "none":
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_flag(flag: bool, state: DistState, device: torch.device) -> bool:
    """True on every process if it is True on any (used to stop all processes together)."""
    if not state.active or state.mode == "none":
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def barrier(state: DistState) -> None:
    if state.active and state.mode != "none" and dist.is_initialized():
        dist.barrier()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def full_state_dict(model: torch.nn.Module, state: DistState) -> dict[str, torch.Tensor] | None:
    """FSDP: gather the full (unsharded) weights on rank 0; others get None. DDP / single: the module's."""
    if state.mode != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
