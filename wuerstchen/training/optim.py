"""Optimizer and learning-rate schedule pieces of the official recipe (SPEC.md section 7)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR


class LinearWarmup:
    """LR factor rising linearly from ~0 to 1 over ``warmup_steps`` optimizer steps, then constant.

    A class, not a lambda, so the scheduler's state dict (and with it the checkpoint) keeps it.
    """

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)


def warmup_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int = 10_000) -> LambdaLR:
    return LambdaLR(optimizer, LinearWarmup(warmup_steps))


OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def build_optimizer(params: Iterable[torch.nn.Parameter], optimizer: OptimizerFactory,
                    scheduler: SchedulerFactory | None) -> dict:
    """Lightning's ``configure_optimizers`` answer: the optimizer and a per-step scheduler."""
    opt = optimizer([p for p in params if p.requires_grad])
    if scheduler is None:
        return {"optimizer": opt}
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler(opt), "interval": "step"}}
