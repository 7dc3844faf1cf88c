"""The optimizer step inside the backward (`step_in_backward`): each parameter is updated, and its gradient freed,
the moment autograd has finished accumulating that gradient.

A plain step holds every gradient at once (as large as the weights: 475 MiB for GPT-2 124M in fp32) from the
middle of the backward until the optimizer has run. Here `Tensor.register_post_accumulate_grad_hook` runs AdamW
on one parameter as soon as its gradient is complete and then drops the gradient, so the gradients alive at
any time are those of the layers whose backward is running. The arithmetic is the same as one AdamW step over
all parameters (fused / foreach AdamW is elementwise per tensor; `tests/test_train_memory.py` checks equality
to the bit), and so is the checkpoint: the per-parameter optimizers share the one AdamW's `state` and read its
param groups (learning rate, weight decay), so `state_dict()` / `load_state_dict()` of that AdamW are unchanged
and a run may be resumed with the option switched either way.

What needs every gradient before any update cannot be done here, and the config refuses it: clipping by the
global norm (`max_grad_norm`), accumulation over micro-batches (`grad_accum`), and DDP / FSDP's reduction of
the gradients across processes. A non-finite loss or gradient leaves the parameters it reaches unchanged (the
step count too, as a skipped fused step); the trainer then stops with `TrainingDivergedError` and saves nothing,
as without the option. The gradient norm it logs is the same norm, summed per parameter as they arrive.
"""

from __future__ import annotations

import torch


class StepInBackward:
    """Hooks that apply `optimizer` one parameter at a time during `backward()` while armed (`arm`)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        if not isinstance(optimizer, torch.optim.AdamW):
            raise TypeError(f"step_in_backward: expected the trainer's AdamW, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self._singles: dict[torch.Tensor, tuple[torch.optim.Optimizer, int]] = {}
        self._handles = []
        self._finite_loss: torch.Tensor | None = None
        self._squares: torch.Tensor | None = None
        fused, foreach = optimizer.defaults.get("fused"), optimizer.defaults.get("foreach")
        for index, group in enumerate(optimizer.param_groups):
            for param in group["params"]:
                single = torch.optim.AdamW([{"params": [param]}], lr=group["lr"], fused=fused, foreach=foreach)
                self._singles[param] = (single, index)
                self._handles.append(param.register_post_accumulate_grad_hook(self._apply))

    def arm(self, finite_loss: torch.Tensor) -> None:
        """Before a training backward: its loss's finiteness (a device bool) gates every update."""
        self._finite_loss = finite_loss
        self._squares = torch.zeros((), device=finite_loss.device, dtype=torch.float32)

    def disarm(self) -> torch.Tensor:
        """After the backward: the L2 norm of the gradients it applied (what `clip_grad_norm_` measures)."""
        squares, self._finite_loss, self._squares = self._squares, None, None
        if squares is None:
            raise RuntimeError("step_in_backward: disarm() without arm()")
        return squares.sqrt()

    def _apply(self, param: torch.Tensor) -> None:
        if self._finite_loss is None or param.grad is None:     # not a training backward: plain accumulation
            return
        single, index = self._singles[param]
        group = single.param_groups[0]
        group.update({key: value for key, value in self.optimizer.param_groups[index].items() if key != "params"})
        group["params"] = [param]
        single.state = self.optimizer.state        # shared (rebound: load_state_dict replaces the dict)
        norm = torch.linalg.vector_norm(param.grad, dtype=torch.float32)
        self._squares += norm.square()
        finite = self._finite_loss & torch.isfinite(norm)
        step_if_finite(single, finite)
        param.grad = None

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def step_if_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """`optimizer.step()` when `finite` (a device bool) holds, else nothing changes: no parameter, no moment,
    no step count. A fused AdamW decides on the device (`found_inf`, as under GradScaler), so the host does
    not wait for the GPU before the step; other optimizers read the flag first."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~finite).float()
        try:
            optimizer.step()
        finally:
            optimizer.found_inf = None
    elif bool(finite):
        optimizer.step()
