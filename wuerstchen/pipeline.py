"""Text-to-image through C -> B -> A (arXiv 2306.00637): Stage C samples the semantic latent, Stage B the Stage A
latent conditioned on it, Stage A decodes to pixels."""

from __future__ import annotations

import os
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .diffusion import classifier_free_guidance, ddpm_sample, linear_timesteps
from .diffusion.sampling import guided_scale
from .models import SemanticCompressor, StageA, StageB, StageC
from .models.compressor import prior_latent_size
from .models.text_encoder import TextEncoder, recorded_text_encoder
from .weights import CheckpointFile, open_checkpoint


class _Prior:
    """denoise(x, t, clip) for Stage C (a class, so no closure captures stale modules)."""

    def __init__(self, stage_c: StageC) -> None:
        self.stage_c = stage_c

    def __call__(self, x: torch.Tensor, t: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        return self.stage_c(x, t, clip)


class _Decoder:
    """denoise(x, t, (effnet, clip)) for Stage B."""

    def __init__(self, stage_b: StageB) -> None:
        self.stage_b = stage_b

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        effnet, clip = cond
        return self.stage_b(x, t, effnet, clip)


@torch.no_grad()
def sample_prior(stage_c: StageC, text_encoder: nn.Module, captions: Sequence[str], height: int, width: int,
                 steps: int | torch.Tensor = 60, cfg: float | None = 4.0, generator: torch.Generator | None = None,
                 effnet_scale: float | None = None) -> torch.Tensor:
    """Stage C: captions -> latents in Stage C's space (B, 16, h, w) for an output of height x width."""
    device = next(stage_c.parameters()).device
    clip = text_encoder(list(captions)).to(device)
    uncond = text_encoder([""]).to(device) if guided_scale(cfg) else None
    shape = (len(captions), stage_c.config["c_in"], prior_latent_size(height, effnet_scale),
             prior_latent_size(width, effnet_scale))
    x = torch.randn(shape, generator=generator, device=device)
    grid = steps if torch.is_tensor(steps) else linear_timesteps(steps)
    denoise = classifier_free_guidance(_Prior(stage_c), cfg, uncond)
    return ddpm_sample(denoise, x, grid.to(device), clip, generator=generator)


@torch.no_grad()
def sample_decoder(stage_b: StageB, stage_a: StageA, text_encoder: nn.Module, effnet: torch.Tensor,
                   captions: Sequence[str], height: int, width: int, steps: int = 12, cfg: float | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Stage B + Stage A: compressor latents (B, 16, h, w) -> images (B, 3, height, width) in [0, 1].

    ``cfg``: guidance over (zeroed compressor latent, empty caption); None or <= 1 is off (the released pipelines'
    default), the paper samples Stage B with 4 (arXiv 2306.00637)."""
    device = effnet.device
    clip = text_encoder(list(captions)).to(device)
    shape = (effnet.shape[0], stage_b.config["c_in"], height // 4, width // 4)
    x = torch.randn(shape, generator=generator, device=device)
    uncond = (torch.zeros_like(effnet[:1]), text_encoder([""]).to(device)) if guided_scale(cfg) else None
    denoise = classifier_free_guidance(_Decoder(stage_b), cfg, uncond)
    latents = ddpm_sample(denoise, x, linear_timesteps(steps).to(device), (effnet, clip), generator=generator)
    return stage_a.decode(latents).clamp(0, 1)


def text_encoder_of(weights: str | os.PathLike | CheckpointFile, config: Mapping[str, Any] | None = None,
                    key: str = "text_encoder") -> TextEncoder:
    """The text encoder ``weights`` were trained with (our checkpoints record it), or the one ``config`` describes
    (``TextEncoder`` arguments; converted released weights record none). ``key`` names the setting in the error."""
    if config is not None:
        return TextEncoder(**dict(config))
    recorded = recorded_text_encoder(weights)
    if recorded is None:
        raise ValueError(f"{getattr(weights, 'path', weights)} records no text encoder: set "
                         f"{key}={{model_name: ..., pretrained: ...}}")
    return TextEncoder(**recorded)


@dataclass
class Pipeline:
    """The three stages plus what conditions them; the text encoders may be one module (same CLIP) or two."""

    stage_c: StageC
    stage_b: StageB
    stage_a: StageA
    effnet: SemanticCompressor  # only its latent map (from_prior) is used at sampling
    text_encoder_c: nn.Module
    text_encoder_b: nn.Module
    effnet_scale: float | None = None  # the compressor view scale Stage C trained with (None: the 42.67 rule)
    # the Stage C latent (h, w) sizes the prior trained on (our checkpoints record them); None: unknown (released)
    trained_latent_sizes: Collection[tuple[int, int]] | None = None

    @classmethod
    def from_checkpoints(cls, stage_c: str | os.PathLike, stage_b: str | os.PathLike,
                         stage_a: str | os.PathLike | None = None, text_encoder: Mapping[str, Any] | None = None,
                         decoder_text_encoder: Mapping[str, Any] | None = None, effnet_scale: float | None = None,
                         ema: bool = True, device: torch.device | str = "cpu") -> Pipeline:
        """The pipeline of trained weights (our checkpoints or exports, released files, diffusers folders), in eval
        mode on ``device``.

        Stage C comes from ``stage_c``; Stage B and the compressor, whose latent map undoes Stage C's, from
        ``stage_b``; Stage A from ``stage_a``, by default the one ``stage_b`` holds (our Stage B checkpoints carry
        it). ``ema``: the EMA weights where a checkpoint has them. The text encoders are the ones the checkpoints
        record unless ``text_encoder`` (Stage C's) or ``decoder_text_encoder`` (Stage B's) give ``TextEncoder``
        arguments. ``effnet_scale`` and the trained latent sizes default to what ``stage_c`` records; without them
        (released weights) Stage C's latent side is ceil(side / 42.67)."""
        c, b = open_checkpoint(stage_c), open_checkpoint(stage_b)  # each file opened once
        prior, decoder = c.network("c", prefer_ema=ema), b.network("b", prefer_ema=ema)
        effnet, vqgan = b.network("effnet"), open_checkpoint(stage_a or stage_b).network("a")
        encoder_c = text_encoder_of(c, text_encoder, "text_encoder")
        encoder_b = text_encoder_of(b, decoder_text_encoder, "decoder_text_encoder")
        for module in (prior, decoder, effnet, vqgan, encoder_c, encoder_b):
            module.to(device).eval()
        return cls(prior, decoder, vqgan, effnet, encoder_c, encoder_b, effnet_scale or c.effnet_scale,
                   c.latent_sizes)  # the latent size rule and the sizes Stage C trained with

    def prior_size(self, height: int, width: int) -> tuple[int, int]:
        """The Stage C latent (h, w) sampled for an output of height x width."""
        return prior_latent_size(height, self.effnet_scale), prior_latent_size(width, self.effnet_scale)

    def check_size(self, height: int, width: int) -> None:
        """Refuse sides Stage B cannot decode; warn at a Stage C latent size the prior never trained on (a 512 px
        prior sampled at 1024 px draws repeated, broken layouts)."""
        multiple = self.stage_b.pixel_multiple
        if height % multiple or width % multiple:
            raise ValueError(f"height={height} and width={width} must be multiples of {multiple} (Stage B's "
                             f"down-sampling of the f4 Stage A latent)")
        size = self.prior_size(height, width)
        trained = {tuple(s) for s in self.trained_latent_sizes or ()}
        if trained and size not in trained:
            sides = ", ".join(f"{h}x{w}" for h, w in sorted(trained))
            warnings.warn(f"{height}x{width} px samples Stage C latents of {size[0]}x{size[1]}, a size this prior "
                          f"never trained on (it saw {sides}): expect broken layouts; sample at a trained size or fine-tune "
                          f"at this one (experiment=stage_c_finetune resolution=...)", UserWarning, stacklevel=2)

    def __call__(self, captions: Sequence[str], height: int, width: int, prior_steps: int | torch.Tensor = 60,
                 prior_cfg: float | None = 4.0, decoder_steps: int = 12, decoder_cfg: float | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Captions -> images (B, 3, height, width) in [0, 1]. Guidance scales None or <= 1 mean no guidance."""
        self.check_size(height, width)
        prior = sample_prior(self.stage_c, self.text_encoder_c, captions, height, width, prior_steps, prior_cfg,
                             generator, self.effnet_scale)
        return sample_decoder(self.stage_b, self.stage_a, self.text_encoder_b, self.effnet.from_prior(prior),
                              captions, height, width, decoder_steps, decoder_cfg, generator)
