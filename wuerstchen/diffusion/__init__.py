"""Diffusion math of Stages B and C: cosine schedule, ε-loss with p2 weighting, DDPM/DDIM samplers, CFG.

Small pure functions (no modules, no Lightning); see arXiv 2306.00637.
"""

from .loss import diffusion_loss
from .sampling import (
    STAGE_B_NUM_STEPS,
    STAGE_C_NUM_STEPS,
    classifier_free_guidance,
    concat_batch,
    ddim_mean,
    ddim_sample,
    ddpm_mean,
    ddpm_sample,
    ddpm_std,
    linear_timesteps,
    reverse_step,
    stage_c_timesteps,
)
from .schedule import (
    P2_WEIGHTINGS,
    add_noise,
    alpha_bar,
    loss_weight,
    no_weight,
    p2_weight,
    p2_weight_code,
    p2_weight_paper,
    sample_t,
    snr,
)

__all__ = [
    "P2_WEIGHTINGS",
    "STAGE_B_NUM_STEPS",
    "STAGE_C_NUM_STEPS",
    "add_noise",
    "alpha_bar",
    "classifier_free_guidance",
    "concat_batch",
    "ddim_mean",
    "ddim_sample",
    "ddpm_mean",
    "ddpm_sample",
    "ddpm_std",
    "diffusion_loss",
    "linear_timesteps",
    "loss_weight",
    "no_weight",
    "p2_weight",
    "p2_weight_code",
    "p2_weight_paper",
    "reverse_step",
    "sample_t",
    "snr",
    "stage_c_timesteps",
]
