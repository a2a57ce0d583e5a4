"""Diffusion math: closed forms, the official t-sampler, the ε-loss, DDPM/DDIM sampling (diffusers parity), CFG."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMWuerstchenScheduler

from wuerstchen.diffusion import (
    P2_WEIGHTINGS,
    STAGE_B_NUM_STEPS,
    STAGE_C_NUM_STEPS,
    add_noise,
    alpha_bar,
    classifier_free_guidance,
    ddim_mean,
    ddim_sample,
    ddpm_mean,
    ddpm_sample,
    ddpm_std,
    diffusion_loss,
    linear_timesteps,
    loss_weight,
    p2_weight,
    sample_t,
    stage_c_timesteps,
)


def closed_form_alpha_bar(t: float, s: float = 0.008) -> float:
    value = math.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    return min(max(value, 1e-4), 0.9999)


# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize(("t", "expected"), [(0.0, 0.9999), (0.25, 0.8470), (0.5, 0.4938), (0.75, 0.1443),
                                             (1.0, 0.0001)])
def test_alpha_bar_check_values(t: float, expected: float) -> None:
    assert alpha_bar(torch.tensor(t)).item() == pytest.approx(expected, abs=1e-4)
    assert alpha_bar(torch.tensor(t, dtype=torch.float64)).item() == pytest.approx(closed_form_alpha_bar(t), abs=1e-12)


def test_alpha_bar_monotone_clamped_and_dtype_shape_preserving() -> None:
    ab = alpha_bar(torch.linspace(0, 1, 1001, dtype=torch.float64))
    assert (ab[1:] <= ab[:-1]).all() and (ab[100:900].diff() < 0).all()
    assert ab.max().item() == pytest.approx(0.9999, abs=1e-12) and ab.min().item() == pytest.approx(1e-4, abs=1e-12)
    custom = alpha_bar(torch.linspace(0, 1, 101), clamp=(0.1, 0.9))
    assert custom.min().item() == pytest.approx(0.1) and custom.max().item() == pytest.approx(0.9)
    assert ((custom >= 0.1 - 1e-7) & (custom <= 0.9 + 1e-7)).all()
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        out = alpha_bar(torch.full((2, 3), 0.5, dtype=dtype))
        assert out.dtype == dtype and out.shape == (2, 3)
        assert out.double().sub(0.4938).abs().max().item() < 4e-3
    assert alpha_bar(1).dtype == torch.get_default_dtype()


def test_alpha_bar_matches_diffusers_scheduler() -> None:
    t = torch.linspace(0, 1, 257)
    reference = DDPMWuerstchenScheduler()._alpha_cumprod(t, torch.device("cpu"))
    torch.testing.assert_close(alpha_bar(t), reference, atol=1e-6, rtol=0)


def test_add_noise_closed_form_and_diffusers() -> None:
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, 6, generator=generator), torch.randn(3, 4, 5, 6, generator=generator)
    t = torch.tensor([0.0, 0.5, 1.0])
    x_t = add_noise(x0, noise, t)
    for i, ti in enumerate(t.tolist()):
        ab = closed_form_alpha_bar(ti)
        torch.testing.assert_close(x_t[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i])
    torch.testing.assert_close(x_t, DDPMWuerstchenScheduler().add_noise(x0, noise, t), atol=1e-5, rtol=0)
    assert add_noise(x0.half(), noise.half(), t).dtype == torch.float16
    with pytest.raises(ValueError, match="shape"):
        add_noise(x0, noise, torch.tensor([0.5, 0.5]))


def test_sample_t_official_distribution() -> None:
    t = sample_t(200_000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (200_000,) and t.dtype == torch.float32
    assert t.min().item() >= 0.001 and t.max().item() == 1.0
    assert (t == 1.0).float().mean().item() == pytest.approx(1 - 0.999 / 1.08, abs=3e-3)  # ≈ 0.075
    rest = t[t < 1.0]
    fractions = torch.histc(rest, bins=10, min=0.001, max=1.0) / len(rest)
    assert fractions.sub(0.1).abs().max().item() < 5e-3
    draw = [sample_t(64, torch.Generator().manual_seed(seed)) for seed in (3, 3, 4)]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])


def test_p2_weightings() -> None:
    t = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    ab = alpha_bar(t)
    assert torch.equal(loss_weight(t, "code"), 1 - ab)  # the released code's default, exactly
    assert torch.equal(loss_weight(t), 1 - ab)
    torch.testing.assert_close(p2_weight(ab), 1 - ab)  # (1 + SNR)^-1 == 1 - ᾱ
    torch.testing.assert_close(loss_weight(t, "paper"), (1 - ab) / (1 + ab))
    torch.testing.assert_close(loss_weight(t, "paper"), p2_weight(ab, k=0.5) / 2)  # (1 + 2 SNR)^-1
    assert torch.equal(loss_weight(t, "none"), torch.ones_like(t))
    assert set(P2_WEIGHTINGS) == {"code", "paper", "none"}
    # general (k + SNR)^-γ, e.g. ᾱ = 0.5 -> SNR 1, ᾱ = 0.8 -> SNR 4
    values = p2_weight(torch.tensor([0.5, 0.8]), k=2.0, gamma=0.5)
    torch.testing.assert_close(values, torch.tensor([3 ** -0.5, 6 ** -0.5]))
    custom = loss_weight(t, functools.partial(p2_weight, k=2.0, gamma=0.5))
    torch.testing.assert_close(custom, (2 + ab / (1 - ab)) ** -0.5)
    with pytest.raises(ValueError, match="unknown weighting"):
        loss_weight(t, "min-snr")


# ---------------------------------------------------------------- loss


def loss_inputs(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(batch, 3, 4, 4, generator=generator), torch.randn(batch, 3, 4, 4, generator=generator)
    return x0, torch.tensor([0.05, 0.3, 0.7, 1.0])[:batch], noise


def test_loss_zero_for_exact_noise_and_forwards_cond() -> None:
    x0, t, noise = loss_inputs()
    seen = {}

    def oracle(x_t: torch.Tensor, r: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        seen.update(x_t=x_t, r=r, clip=clip)
        return noise.clone()

    out = diffusion_loss(oracle, x0, t, noise, clip=torch.ones(4, 2))
    assert out["loss"].item() == 0.0 and out["loss_unweighted"].item() == 0.0
    assert torch.equal(seen["r"], t) and torch.equal(seen["x_t"], add_noise(x0, noise, t))
    assert seen["clip"].shape == (4, 2)


@pytest.mark.parametrize("weighting", ["code", "paper", "none"])
def test_loss_of_zero_model(weighting: str) -> None:
    x0, t, noise = loss_inputs()
    out = diffusion_loss(lambda x, r: torch.zeros_like(x), x0, t, noise, weighting=weighting)
    per_sample = noise.pow(2).mean(dim=(1, 2, 3))
    ab = alpha_bar(t)
    weight = {"code": 1 - ab, "paper": (1 - ab) / (1 + ab), "none": torch.ones(4)}[weighting]
    torch.testing.assert_close(out["loss_per_sample"], per_sample)
    torch.testing.assert_close(out["loss_unweighted"], per_sample.mean())
    torch.testing.assert_close(out["loss_weighted_per_sample"], per_sample * weight)
    torch.testing.assert_close(out["loss"], (per_sample * weight).mean())
    if weighting != "none":  # both p2 weights are < 1 for every t
        assert out["loss"].item() < out["loss_unweighted"].item()


def test_loss_deterministic_and_differentiable() -> None:
    x0, t, noise = loss_inputs()
    scale = torch.nn.Parameter(torch.tensor(0.3))

    def model(x_t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return scale * x_t + r.view(-1, 1, 1, 1)

    first, second = diffusion_loss(model, x0, t, noise), diffusion_loss(model, x0, t, noise)
    assert torch.equal(first["loss"], second["loss"])
    first["loss"].backward()
    assert scale.grad is not None and scale.grad.abs().item() > 0


# ---------------------------------------------------------------- grids


def test_timestep_grids() -> None:
    assert torch.equal(linear_timesteps(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    grid = stage_c_timesteps()
    reference = list(np.linspace(1.0, 2 / 3, 20)) + list(np.linspace(2 / 3, 0.0, 11))[1:]  # diffusers' default
    scheduler = DDPMWuerstchenScheduler()
    scheduler.set_timesteps(timesteps=reference)
    assert len(grid) == 30 and grid.dtype == torch.float32 and torch.equal(grid, scheduler.timesteps)
    assert (STAGE_C_NUM_STEPS, STAGE_B_NUM_STEPS) == (60, 12)
    with pytest.raises(ValueError):
        ddpm_sample(lambda x, t, c: x, torch.zeros(1, 2), torch.tensor([0.0, 1.0]))


# ---------------------------------------------------------------- samplers

CHANNELS = 4
MIX = torch.randn(CHANNELS, CHANNELS, generator=torch.Generator().manual_seed(7)) / CHANNELS**0.5


def toy_denoise(x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
    """Near-optimal ε for N(0, 0.25) data plus a fixed linear mix of x and a function of t (stays bounded)."""
    ab = (torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2).clamp(1e-4, 0.9999).view(-1, 1, 1, 1)
    mixed = torch.einsum("bchw,dc->bdhw", x, MIX)
    return (1 - ab).sqrt() * x / (0.25 * ab + 1 - ab) + 0.1 * mixed + 0.1 * torch.cos(3 * t).view(-1, 1, 1, 1)


@pytest.mark.parametrize("grid", [linear_timesteps(STAGE_C_NUM_STEPS), stage_c_timesteps(),
                                  linear_timesteps(STAGE_B_NUM_STEPS)], ids=["linear60", "stage_c_29", "linear12"])
def test_ddpm_matches_diffusers_step_for_step(grid: torch.Tensor) -> None:
    start = torch.randn(2, CHANNELS, 8, 8, generator=torch.Generator().manual_seed(1))
    scheduler = DDPMWuerstchenScheduler()
    scheduler.set_timesteps(timesteps=grid)
    generator, latents, reference = torch.Generator().manual_seed(42), start.clone(), []
    for t in scheduler.timesteps[:-1]:  # as the diffusers Würstchen pipelines iterate
        ratio = t.expand(latents.size(0))
        latents = scheduler.step(toy_denoise(latents, ratio, None), ratio, latents, generator=generator).prev_sample
        reference.append(latents)
    ours: list[torch.Tensor] = []
    final = ddpm_sample(toy_denoise, start.clone(), grid, generator=torch.Generator().manual_seed(42),
                        callback=lambda info: ours.append(info["x"]))
    assert len(ours) == len(reference) == len(grid) - 1
    errors = [(a - b).abs().max().item() for a, b in zip(ours, reference, strict=True)]
    assert max(errors) <= 1e-5, errors
    assert torch.equal(final, ours[-1]) and reference[-1].abs().max().item() > 0.5  # a non-trivial trajectory


def test_ddim_mean_at_eta_one_is_ddpm_mean() -> None:
    generator = torch.Generator().manual_seed(0)
    x, eps = torch.randn(5, 3, dtype=torch.float64, generator=generator), torch.randn(5, 3, dtype=torch.float64)
    ab_t = alpha_bar(torch.tensor([0.9, 0.6, 0.3, 0.1, 0.02], dtype=torch.float64)).view(-1, 1)
    ab_prev = alpha_bar(torch.tensor([0.8, 0.5, 0.25, 0.0, 0.01], dtype=torch.float64)).view(-1, 1)
    sigma = ddpm_std(ab_t, ab_prev)
    torch.testing.assert_close(ddim_mean(x, eps, ab_t, ab_prev, sigma), ddpm_mean(x, eps, ab_t, ab_prev))


def test_ddim_is_deterministic() -> None:
    start = torch.randn(2, CHANNELS, 8, 8, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    first = ddim_sample(toy_denoise, start.clone(), linear_timesteps(10))
    second = ddim_sample(toy_denoise, start.clone(), linear_timesteps(10), generator=generator)
    assert torch.equal(first, second) and torch.equal(generator.get_state(), state)
    assert not torch.equal(first, ddpm_sample(toy_denoise, start.clone(), linear_timesteps(10), generator=generator))


DATA_MEAN, DATA_STD = torch.tensor([1.5, -0.5]), torch.tensor([0.5, 0.8])


def gaussian_eps(x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
    """Exact E[ε | x_t] for data ~ N(mean, std²) per dim: √(1−ᾱ)(x − √ᾱ·mean) / (ᾱ·std² + 1 − ᾱ)."""
    ab = alpha_bar(t.double()).view(-1, 1).to(x.dtype)
    return (1 - ab).sqrt() * (x - ab.sqrt() * DATA_MEAN) / (ab * DATA_STD**2 + 1 - ab)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_samplers_recover_gaussian_data(eta: float) -> None:
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(8000, 2, generator=generator)
    samples = ddpm_sample(gaussian_eps, start, linear_timesteps(100), generator=generator, eta=eta)
    torch.testing.assert_close(samples.mean(0), DATA_MEAN, atol=0.04, rtol=0)
    torch.testing.assert_close(samples.std(0), DATA_STD, atol=0.04, rtol=0)


# ---------------------------------------------------------------- classifier-free guidance


class Recorder:
    """A denoise callable that records its inputs; ε depends on x, t and the conditioning."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, object]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        self.calls.append((x, t, cond))
        c = cond["clip"] if isinstance(cond, dict) else cond
        return x * 0.5 + t.view(-1, 1) + c.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("scale", [None, 0.0, 0.5, 1.0])
def test_cfg_scale_up_to_one_is_the_conditional_branch(scale: float | None) -> None:
    """diffusers' convention: 0, 1 and None all mean "no guidance", never the unconditional prediction."""
    recorder = Recorder()
    uncond = torch.full((2, 3), 7.0)  # an unconditional branch that would show in the output
    x, t, cond = torch.randn(2, 4), torch.tensor([0.3, 0.3]), torch.randn(2, 3)
    out = classifier_free_guidance(recorder, scale, uncond)(x, t, cond)
    assert len(recorder.calls) == 1 and recorder.calls[0][0].shape == (2, 4)  # one branch only
    assert torch.equal(out, x * 0.5 + t.view(-1, 1) + cond.sum(1, keepdim=True))


def test_cfg_combines_branches_in_one_batched_call() -> None:
    recorder, scale = Recorder(), 4.0
    x, t, cond, uncond = torch.randn(2, 4), torch.tensor([0.7, 0.7]), torch.randn(2, 3), torch.randn(2, 3)
    out = classifier_free_guidance(recorder, scale, uncond)(x, t, cond)
    assert len(recorder.calls) == 1
    seen_x, seen_t, seen_cond = recorder.calls[0]
    assert seen_x.shape == (4, 4) and seen_t.shape == (4,) and torch.equal(seen_cond, torch.cat([cond, uncond]))
    eps_c, eps_u = Recorder()(x, t, cond), Recorder()(x, t, uncond)
    assert torch.equal(out, eps_u + scale * (eps_c - eps_u))
    assert not torch.allclose(out, eps_c)


def test_cfg_with_dict_conditioning_and_broadcast_uncond() -> None:
    recorder = Recorder()
    x, t = torch.randn(3, 4), torch.full((3,), 0.5)
    cond = {"clip": torch.randn(3, 2), "effnet": torch.randn(3, 5)}
    uncond = {"clip": torch.zeros(1, 2), "effnet": torch.zeros(1, 5)}  # one empty-caption embedding for all
    out = classifier_free_guidance(recorder, 2.0, uncond)(x, t, cond)
    seen = recorder.calls[0][2]
    assert seen["clip"].shape == (6, 2) and seen["effnet"].shape == (6, 5) and seen["clip"][3:].abs().sum() == 0
    eps_c, eps_u = Recorder()(x, t, cond), Recorder()(x, t, {"clip": torch.zeros(3, 2)})
    torch.testing.assert_close(out, eps_u + 2.0 * (eps_c - eps_u))
