"""Optimizer and learning-rate schedule pieces of the official recipe (arXiv 2306.00637)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR


class LinearWarmup:
    """LR factor rising linearly from ~0 to 1 over ``warmup_steps`` optimizer steps, then constant (the released
    recipe), or, with ``decay_until``, falling linearly to 0 at that step (short runs end better annealed).

    A class, not a lambda, so the scheduler's state dict (and with it the checkpoint) keeps it.
    """

    def __init__(self, warmup_steps: int, decay_until: int | None = None) -> None:
        self.warmup_steps = int(warmup_steps)
        self.decay_until = decay_until

    def __call__(self, step: int) -> float:
        warm = 1.0 if self.warmup_steps <= 0 else min(1.0, (step + 1) / self.warmup_steps)
        if self.decay_until is None or step < self.warmup_steps:
            return warm
        return max(0.0, (self.decay_until - step) / max(1, self.decay_until - self.warmup_steps))


class WarmupLR(LambdaLR):
    """``LambdaLR`` over :class:`LinearWarmup` whose shape always comes from the config, never from a checkpoint.

    ``LambdaLR`` checkpoints its factor object's attributes and restores them over the new ones, so a finished run
    resumed with a larger ``trainer.max_steps`` (``decay_until: ${trainer.max_steps}``) would keep the old end and
    train on at LR 0. Only the position (``last_epoch``, base LRs) is restored; the factor is a pure function of it.
    """

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("lr_lambdas", None)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict({**state_dict, "lr_lambdas": [None] * len(self.lr_lambdas)})
        # the restored optimizer holds the LR of the old schedule at this step; the next step must use the new one
        for group, base_lr, factor in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas):
            group["lr"] = base_lr * factor(self.last_epoch)


def warmup_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int = 10_000,
                     decay_until: int | None = None) -> LambdaLR:
    return WarmupLR(optimizer, LinearWarmup(warmup_steps, decay_until))


OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def build_optimizer(params: Iterable[torch.nn.Parameter] | Iterable[dict], optimizer: OptimizerFactory,
                    scheduler: SchedulerFactory | None) -> dict:
    """Lightning's ``configure_optimizers`` answer: the optimizer and a per-step scheduler.

    ``params`` are parameters, or param groups ``{"params": [...], "lr_scale": s}`` whose LR is s x the optimizer's.
    """
    params = list(params)
    if params and isinstance(params[0], dict):
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
        opt = optimizer([{k: v for k, v in g.items() if k != "lr_scale"} for g in groups if g["params"]])
        for group, spec in zip(opt.param_groups, [g for g in groups if g["params"]]):
            group["lr"] *= spec.get("lr_scale", 1.0)  # before the scheduler records its base LRs
    else:
        opt = optimizer([p for p in params if p.requires_grad])
    if scheduler is None:
        return {"optimizer": opt}
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler(opt), "interval": "step"}}
