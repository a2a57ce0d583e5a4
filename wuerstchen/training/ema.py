"""Exponential moving average of a network's weights, with its own state dict."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the EMA network is sharded exactly like the network), else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class EMA:
    """EMA of ``model``'s parameters (buffers are copied) on a step schedule.

    Until ``start_step`` the average is a plain copy; from then on every ``every`` steps
    ``ema = decay * ema + (1 - decay) * weights``. The released Stage C schedule is ``decay=0.9, every=100,
    start_step=5000`` (about 0.99895 per step); ``every=1`` gives the usual per-step EMA.

    The stage modules register :attr:`module` as their submodule ``ema_network`` under every strategy, so it is
    saved in ``state_dict`` (with the averaged network named by ``ema_of``: ``wuerstchen.weights.checkpoint``),
    restored and moved like the networks, and under FSDP sharded exactly like its network (each rank averages its
    own shards). Its parameters never require gradients: the optimizer only takes the trained networks' parameters,
    and DDP leaves parameters without gradients out of its gradient sync (it broadcasts the buffers from rank 0, which
    the EMA copies from the network anyway).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, start_step: int = 0, every: int = 1) -> None:
        if not 0.0 <= decay <= 1.0 or every < 1:
            raise ValueError(f"EMA needs 0 <= decay <= 1 and every >= 1, got decay={decay}, every={every}")
        self.decay, self.start_step, self.every = float(decay), int(start_step), int(every)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold ``model``'s current weights in, for optimizer step number ``step`` (0-based)."""
        if step < self.start_step:
            self._copy_from(model)
            return
        if (step - self.start_step) % self.every:
            return
        ema_params = [_local(p) for p in self.module.parameters()]
        params = [_local(p.detach()).to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)  # sharded: each rank averages its own shards
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)

    def _copy_from(self, model: nn.Module) -> None:
        for target, source in zip(self.module.state_dict().values(), model.state_dict().values()):
            target.copy_(source)
