"""Samplers over a ``denoise(x, t, cond) -> eps_hat`` callable, and classifier-free guidance (arXiv 2306.00637).

k-diffusion style: samplers are free functions, guidance wraps the callable. ``t`` given to ``denoise`` is a (B,)
tensor of continuous times in the grid's dtype (float32); the networks take it as their ``r``. Samplers do not switch
off autograd: wrap the call in ``torch.inference_mode()`` for previews.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .schedule import _per_sample, alpha_bar

Denoise = Callable[[Tensor, Tensor, Any], Tensor]
Callback = Callable[[dict[str, Any]], None]

STAGE_C_NUM_STEPS = 60  # Stage C default: 60 linear steps (arXiv 2306.00637)
STAGE_B_NUM_STEPS = 12  # Stage B default: 12 linear steps, CFG off


def linear_timesteps(num_steps: int) -> Tensor:
    """Descending grid linspace(1, 0, num_steps + 1) (official sampler; diffusers ``set_timesteps``)."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    return torch.linspace(1.0, 0.0, num_steps + 1)


def stage_c_timesteps() -> Tensor:
    """29-step Stage C grid linspace(1, 2/3, 20) ++ linspace(2/3, 0, 11)[1:] (StableCascade/diffusers default)."""
    # float64 then float32, the same values diffusers gets from its numpy list.
    high = torch.linspace(1.0, 2 / 3, 20, dtype=torch.float64)
    low = torch.linspace(2 / 3, 0.0, 11, dtype=torch.float64)[1:]
    return torch.cat([high, low]).float()


def ddpm_mean(x: Tensor, eps: Tensor, ab_t: Tensor, ab_prev: Tensor) -> Tensor:
    """μ = (x − (1 − a)·ε̂/√(1 − ᾱ_t)) / √a with a = ᾱ_t/ᾱ_prev (DDPM eq. 11 between grid points; official code)."""
    a = ab_t / ab_prev
    return (x - (1 - a) * eps / (1 - ab_t).sqrt()) / a.sqrt()


def ddpm_std(ab_t: Tensor, ab_prev: Tensor) -> Tensor:
    """σ = √((1 − a)(1 − ᾱ_prev)/(1 − ᾱ_t)), the posterior std β̃ (DDPM eq. 7); DDIM's σ at η = 1 (DDIM eq. 16)."""
    a = ab_t / ab_prev
    return ((1 - a) * (1 - ab_prev) / (1 - ab_t)).sqrt()


def ddim_mean(x: Tensor, eps: Tensor, ab_t: Tensor, ab_prev: Tensor, sigma: Tensor) -> Tensor:
    """√ᾱ_prev·x̂₀ + √(1 − ᾱ_prev − σ²)·ε̂ with x̂₀ = (x − √(1 − ᾱ_t)·ε̂)/√ᾱ_t (DDIM eq. 12)."""
    x0_hat = (x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    return ab_prev.sqrt() * x0_hat + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps


def reverse_step(x: Tensor, eps: Tensor, t: Tensor, t_prev: Tensor, noise: Tensor | None = None,
                 eta: float = 1.0) -> Tensor:
    """One step t → t_prev (both (B,)): mean + η·σ·z, no noise where t_prev == 0 (DDIM eq. 12; official DDPM step).

    η = 1 uses the official DDPM mean (algebraically equal to the DDIM mean at η = 1, same float ops as the official
    code); η = 0 is deterministic DDIM. Math runs in at least float32; the result has ``x``'s dtype.
    """
    work = torch.promote_types(x.dtype, torch.float32)
    ab_t = _per_sample(alpha_bar(t.to(work)), x)  # (B, 1, ..., 1)
    ab_prev = _per_sample(alpha_bar(t_prev.to(work)), x)
    sigma = eta * ddpm_std(ab_t, ab_prev)
    x_w, eps_w = x.to(work), eps.to(work)
    if eta == 1.0:
        mean = ddpm_mean(x_w, eps_w, ab_t, ab_prev)
    else:
        mean = ddim_mean(x_w, eps_w, ab_t, ab_prev, sigma)
    if noise is not None:
        mean = mean + sigma * noise.to(work) * _per_sample((t_prev > 0).to(work), x)
    return mean.to(x.dtype)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise drawn on the generator's device, then moved (diffusers ``randn_tensor``)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def ddpm_sample(denoise: Denoise, x: Tensor, timesteps: Tensor, cond: Any = None,
                generator: torch.Generator | None = None, eta: float = 1.0, callback: Callback | None = None) -> Tensor:
    """Ancestral DDPM (η = 1) / DDIM (η < 1) over a descending grid from ``x`` ~ N(0, I) at timesteps[0].

    For η > 0 noise is drawn from ``generator`` on every step, the last one included (where it is then not added),
    exactly like diffusers' ``DDPMWuerstchenScheduler.step``, so a seeded run matches it. ``callback`` gets
    ``{"i", "x", "t", "t_prev", "eps"}`` after each step, ``x`` being the new sample.
    """
    timesteps = _check_grid(timesteps).to(x.device)
    batch = x.shape[0]
    for i in range(len(timesteps) - 1):
        t, t_prev = timesteps[i].expand(batch), timesteps[i + 1].expand(batch)  # (B,)
        eps = denoise(x, t, cond)
        noise = _randn_like(x, generator) if eta > 0 else None
        x = reverse_step(x, eps, t, t_prev, noise, eta)
        if callback is not None:
            callback({"i": i, "x": x, "t": t, "t_prev": t_prev, "eps": eps})
    return x


def ddim_sample(denoise: Denoise, x: Tensor, timesteps: Tensor, cond: Any = None, eta: float = 0.0,
                generator: torch.Generator | None = None, callback: Callback | None = None) -> Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12 with η = 0) over a descending grid; ``ddpm_sample`` with η."""
    return ddpm_sample(denoise, x, timesteps, cond, generator=generator, eta=eta, callback=callback)


def _check_grid(timesteps: Tensor) -> Tensor:
    """A 1-D, strictly descending grid of at least two times."""
    timesteps = torch.as_tensor(timesteps)
    if timesteps.ndim != 1 or len(timesteps) < 2 or not bool((timesteps[1:] < timesteps[:-1]).all()):
        raise ValueError("timesteps must be a 1-D strictly descending grid of at least 2 values, e.g. 1 -> 0")
    return timesteps


def concat_batch(first: Any, second: Any) -> Any:
    """Concatenate two conditionings along the batch dim: tensors, dicts, tuples/lists of them, or None.

    A tensor ``second`` of batch size 1 is broadcast to ``first``'s batch (one empty-caption embedding for all).
    """
    if first is None and second is None:
        return None
    if isinstance(first, Tensor):
        if second.shape[0] == 1 and first.shape[0] != 1:
            second = second.expand(first.shape[0], *second.shape[1:])
        return torch.cat([first, second.to(first.dtype)])
    if isinstance(first, Mapping):
        return {key: concat_batch(first[key], second[key]) for key in first}
    if isinstance(first, Sequence) and not isinstance(first, str):
        return type(first)(concat_batch(a, b) for a, b in zip(first, second, strict=True))
    raise TypeError(f"cannot batch a conditioning of type {type(first).__name__}")


def guided_scale(scale: float | None) -> bool:
    """Whether a guidance scale runs the unconditional branch: only above 1 (None, 0 and 1 mean conditional only)."""
    return scale is not None and scale > 1


def classifier_free_guidance(denoise: Denoise, scale: float | None, uncond: Any) -> Denoise:
    """Wrap ``denoise`` with CFG ε̂ = ε̂_u + w·(ε̂_c − ε̂_u) (Ho & Salimans 2022, eq. 6; arXiv 2306.00637).

    Conditional and unconditional branches run in one call on a 2B batch (cond first, as in the official code).
    ``scale`` None or <= 1 means no guidance: ``denoise`` itself, the conditional prediction, and the unconditional
    branch is skipped. That is diffusers' convention (guidance runs for ``guidance_scale > 1``; its Würstchen decoder
    pipeline defaults to 0): the official lerp would return the unconditional prediction at 0, noise to every user
    who types 0 for "off".
    """
    if not guided_scale(scale):
        return denoise

    def guided(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        eps = denoise(torch.cat([x, x]), torch.cat([t, t]), concat_batch(cond, uncond))
        eps_c, eps_u = eps.chunk(2)
        return eps_u + scale * (eps_c - eps_u)

    return guided
