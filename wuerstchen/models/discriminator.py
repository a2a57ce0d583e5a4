"""Patch discriminator for Stage A's adversarial loss, close to the official Paella VQGAN code's (arXiv 2306.00637).

No released weights exist for it, so its module names are ours.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from .common import Unit


class PatchDiscriminator(nn.Module):
    """Spectral-norm 3x3 stride-2 convs, then a 1x1 conv to one logit per patch.

    Every conv but the first is followed by InstanceNorm2d (the first sees raw pixels, where per-image normalisation
    would discard colour statistics) and every one by LeakyReLU. The default six layers turn 256x256 images into
    4x4 logits, each judging a large, overlapping patch. Returns raw logits: the loss (hinge / BCE-with-logits)
    decides the link; the official code ends in a Sigmoid instead.

    Args:
        in_channels: channels of the images it judges.
        channels: output width of each stride-2 conv; its length is the number of halvings.
        negative_slope: of the LeakyReLUs.
    """

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (64, 128, 256, 512, 512, 512),
                 negative_slope: float = 0.2) -> None:
        super().__init__()
        if not channels:
            raise ValueError("channels must name at least one conv layer")
        layers: list[nn.Module] = []
        widths = [in_channels, *channels]
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            # Spectral norm bounds each layer's Lipschitz constant, which keeps the GAN game stable.
            layers.append(spectral_norm(nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1)))
            if i > 0:
                layers.append(nn.InstanceNorm2d(c_out))
            layers.append(nn.LeakyReLU(negative_slope))
        self.encoder = nn.Sequential(*layers)
        self.to_logits = nn.Conv2d(widths[-1], 1, kernel_size=1)

    def fsdp_units(self) -> list[Unit]:
        """Every spectral-norm conv: FSDP shards each; the root keeps ``to_logits``. No activation checkpointing:
        spectral norm's power iteration would step twice."""
        return [(layer,) for layer in self.encoder if isinstance(layer, nn.Conv2d)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> logits (B, 1, H / 2^n, W / 2^n) for n = len(channels) (rounded up per layer)."""
        return self.to_logits(self.encoder(images))
