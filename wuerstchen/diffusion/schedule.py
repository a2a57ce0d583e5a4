"""Continuous-time cosine schedule, forward noising, training-t sampler and p2 loss weights (arXiv 2306.00637).

Everything here is a pure function of tensors; ``t`` is the continuous diffusion time in [0, 1] (0 = data, 1 = noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
from torch import Tensor

AlphaBarWeighting = Callable[[Tensor], Tensor]


def alpha_bar(t: Tensor | float, s: float = 0.008, clamp: tuple[float, float] = (1e-4, 0.9999)) -> Tensor:
    """ᾱ(t) = cos²(((t+s)/(1+s))·π/2) / cos²((s/(1+s))·π/2), clamped (Nichol & Dhariwal 2021 eq. 17; official code).

    Computed in float64 (float32 on MPS) and returned in ``t``'s dtype (the default dtype for integer/float input).
    """
    t = torch.as_tensor(t)
    out_dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
    work_dtype = torch.float32 if t.device.type == "mps" else torch.float64
    angle = (t.to(work_dtype) + s) / (1 + s) * (math.pi / 2)
    ab = torch.cos(angle) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    return ab.clamp(*clamp).to(out_dtype)


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Reshape a (B,) tensor to (B, 1, ..., 1) so it broadcasts over ``like``'s non-batch dims."""
    if values.ndim != 1 or values.shape[0] != like.shape[0]:
        raise ValueError(f"t must have shape ({like.shape[0]},), got {tuple(values.shape)}")
    return values.view(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Forward process x_t = √ᾱ(t)·x₀ + √(1−ᾱ(t))·ε (arXiv 2306.00637; DDPM eq. 4), ``t`` of shape (B,)."""
    ab = _per_sample(alpha_bar(t.to(torch.float64)), x0)  # (B, 1, ..., 1), float64 so 1 - ᾱ keeps its digits
    return (ab.sqrt().to(x0.dtype) * x0 + (1 - ab).sqrt().to(x0.dtype) * noise).to(x0.dtype)


def sample_t(batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None,
             dtype: torch.dtype = torch.float32) -> Tensor:
    """Official training sampler t = clamp(1.08·(1−U) + 0.001, 0.001, 1), U ~ U[0, 1): ≈7.5 % of t are exactly 1."""
    u = torch.rand(batch_size, generator=generator, device=device, dtype=dtype)
    return (1 - u).mul(1.08).add(0.001).clamp(0.001, 1.0)


def snr(ab: Tensor) -> Tensor:
    """Signal-to-noise ratio SNR = ᾱ / (1 − ᾱ) (Kingma et al. 2021, eq. 2)."""
    return ab / (1 - ab)


def p2_weight(ab: Tensor, k: float = 1.0, gamma: float = 1.0) -> Tensor:
    """P2 weight (k + SNR)^(−γ) of ᾱ (Choi et al. 2022 eq. 8; official Würstchen `p2_weight`, k = γ = 1)."""
    return (k + snr(ab)) ** (-gamma)


def p2_weight_code(ab: Tensor) -> Tensor:
    """Released code's p2 with k = γ = 1, in its exact closed form (1 + SNR)^(−1) = 1 − ᾱ."""
    return 1 - ab


def p2_weight_paper(ab: Tensor) -> Tensor:
    """The weight printed in the paper (arXiv 2306.00637, section 3.3): (1 − ᾱ) / (1 + ᾱ) = (1 + 2·SNR)^(−1)."""
    return (1 - ab) / (1 + ab)


def no_weight(ab: Tensor) -> Tensor:
    """Unweighted ε-loss (Ho et al. 2020 L_simple): weight 1 for every t."""
    return torch.ones_like(ab)


P2_WEIGHTINGS: Mapping[str, AlphaBarWeighting] = MappingProxyType(
    {"code": p2_weight_code, "paper": p2_weight_paper, "none": no_weight}
)


def loss_weight(t: Tensor, weighting: str | AlphaBarWeighting = "code") -> Tensor:
    """Per-sample loss weight at time ``t``: a name from ``P2_WEIGHTINGS`` or any callable of ᾱ (arXiv 2306.00637).

    A callable lets a config pick a general p2, e.g. ``functools.partial(p2_weight, k=1.0, gamma=0.5)``.
    """
    if isinstance(weighting, str):
        if weighting not in P2_WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose one of {sorted(P2_WEIGHTINGS)}")
        weighting = P2_WEIGHTINGS[weighting]
    return weighting(alpha_bar(t))
