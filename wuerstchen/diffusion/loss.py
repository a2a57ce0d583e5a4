"""The ε-prediction training objective of Stages B and C (arXiv 2306.00637)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from .schedule import AlphaBarWeighting, add_noise, loss_weight


def diffusion_loss(model: Callable[..., Tensor], x0: Tensor, t: Tensor, noise: Tensor,
                   weighting: str | AlphaBarWeighting = "code", **cond: Any) -> dict[str, Tensor]:
    """ε-loss: mean over non-batch dims of (model(x_t, t, **cond) − ε)², p2-weighted, batch-averaged (official code).

    ``noise`` and ``t`` (shape (B,)) are arguments, so the loss is deterministic given them; the network receives the
    continuous ``t`` itself (its ``r``). The squared error is taken in float32 even under autocast.

    Returns ``loss`` (weighted batch mean, the one to backpropagate), ``loss_unweighted`` (plain batch mean),
    ``loss_per_sample`` / ``loss_weighted_per_sample`` (both (B,)) and ``weight`` ((B,)).
    """
    x_t = add_noise(x0, noise, t)
    eps_hat = model(x_t, t, **cond)
    per_sample = (eps_hat.float() - noise.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    weight = loss_weight(t.float(), weighting)  # (B,)
    weighted = per_sample * weight
    return {
        "loss": weighted.mean(),
        "loss_unweighted": per_sample.mean(),
        "loss_per_sample": per_sample,
        "loss_weighted_per_sample": weighted,
        "weight": weight,
    }

