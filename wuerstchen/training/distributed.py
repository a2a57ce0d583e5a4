"""Distributed pieces the stages share: cross-rank BatchNorm on any backend, and the agreement of all ranks on
skipping a non-finite optimizer step."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

log = logging.getLogger(__name__)


def distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are summed over all ranks, on any backend (gloo on CPU included).

    torch's ``nn.SyncBatchNorm`` only runs on GPUs; this one all-reduces the per-channel sum, sum of squares and count
    with a differentiable all-reduce, so gradients flow through the global statistics exactly as in a single-process
    run over the concatenated batch. Parameter and buffer names are BatchNorm2d's, so checkpoints do not change.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or distributed_world() == 1:
            y = super().forward(x)
            return self.post(y) if hasattr(self, "post") else y
        channels = x.shape[1]
        stats = torch.cat([x.sum((0, 2, 3)), x.square().sum((0, 2, 3)),
                           x.new_full((1,), x.numel() / channels)])
        stats = differentiable_all_reduce(stats.float())
        count = stats[-1]
        mean = stats[:channels] / count
        var = (stats[channels:2 * channels] / count - mean.square()).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                unbiased = var.detach() * count / (count - 1).clamp(min=1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = (x - mean.to(x.dtype)[None, :, None, None]) * torch.rsqrt(var + self.eps).to(x.dtype)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return self.post(y) if hasattr(self, "post") else y


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d in ``module`` (timm's BatchNormAct2d included) normalises over all ranks' batches.

    On CUDA this is timm's converter (torch's fused ``nn.SyncBatchNorm``, keeping timm's activation); elsewhere
    :class:`SyncBatchNorm`, with a BatchNormAct2d's dropout and activation applied after it.
    """
    if any(p.is_cuda for p in module.parameters()):
        from timm.layers import convert_sync_batchnorm as timm_convert

        return timm_convert(module)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SyncBatchNorm):
            sync = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                 child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            post = [m for m in (getattr(child, "drop", None), getattr(child, "act", None)) if m is not None]
            if post:  # timm's BatchNormAct2d: parameter-free dropout and activation after the normalisation
                sync.post = nn.Sequential(*post)
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module


# --------------------------------------------------------------------------------------------- non-finite steps
def all_finite(tensors: Iterable[torch.Tensor | None], device: torch.device) -> bool:
    """Whether every tensor is finite on every rank (one all-reduce; all ranks get the same answer)."""
    local = torch.ones((), device=device)
    for tensor in tensors:
        if tensor is None:
            continue
        if isinstance(tensor, torch.distributed.tensor.DTensor):
            tensor = tensor.to_local()
        if not torch.isfinite(tensor).all():
            local.zero_()
            break
    if distributed_world() > 1:
        dist.all_reduce(local, op=dist.ReduceOp.MIN)
    return bool(local.item())


class NonFiniteSteps:
    """Counts optimizer steps skipped for non-finite gradients and stops a run that keeps producing them."""

    def __init__(self, max_in_a_row: int = 10) -> None:
        if max_in_a_row < 1:
            raise ValueError(f"max_nonfinite_steps={max_in_a_row} must be >= 1")
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0

    def check(self, optimizer: torch.optim.Optimizer, step: int, device: torch.device) -> bool:
        """True if the step may go ahead; else drops every gradient (so the step changes nothing) and counts it."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if all_finite((p.grad for p in params), device):
            self.in_a_row = 0
            return True
        for p in params:
            p.grad = None
        self.in_a_row += 1
        self.total += 1
        log.warning("non-finite gradients at step %d: optimizer step skipped on all ranks (%d in a row, %d in all)",
                    step, self.in_a_row, self.total)
        if self.in_a_row >= self.max_in_a_row:
            raise FloatingPointError(
                f"{self.in_a_row} optimizer steps in a row had non-finite gradients (last at step {step}); stopping "
                f"(stage.max_nonfinite_steps={self.max_in_a_row}). Lower the learning rate, check the data, or "
                f"resume from an earlier checkpoint.")
        return False

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_a_row, self.total = int(state.get("in_a_row", 0)), int(state.get("total", 0))
