"""Stage A: the f4 "Paella" VQGAN, images in [0, 1] <-> a 4-channel latent at 1/4 resolution (arXiv 2306.00637).

Module names follow the released ``vqgan_f4_v1_500k.pt``, so it loads key for key; diffusers' ``PaellaVQModel``
differs only in the codebook key (``vquantizer.embedding.weight``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, Unit, maybe_checkpoint


class MixingResidualBlock(nn.Module):
    """Stage A's ResBlock: depthwise 3x3 and a channel MLP, each modulated by learned scalars (official ``ResBlock``).

    x = x + g2 * dw(norm(x) * (1 + g0) + g1);  x = x + g5 * mlp(norm(x) * (1 + g3) + g4).
    ``gammas`` start at 0, so every block starts as the identity.
    """

    def __init__(self, c: int, c_hidden: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        # Replication (not zero) padding: borders see the same statistics as the interior, as in the released weights.
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c))
        self.norm2 = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(c, c_hidden), nn.GELU(), nn.Linear(c_hidden, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gammas
        x = x + self.depthwise(self.norm1(x) * (1 + g[0]) + g[1]) * g[2]  # (B, c, H, W)
        h = (self.norm2(x) * (1 + g[3]) + g[4]).permute(0, 2, 3, 1)  # (B, H, W, c): the MLP mixes the last dim
        return x + self.channelwise(h).permute(0, 3, 1, 2) * g[5]


class Quantized(NamedTuple):
    latents: torch.Tensor  # (B, C, h, w) codebook vectors, straight-through gradient to the input
    indices: torch.Tensor  # (B, h, w) int64 code indices
    loss: torch.Tensor  # () codebook + commitment_weight * commitment


@torch.no_grad()
def nearest_codes(z: torch.Tensor, codebook: torch.Tensor, chunk_size: int = 16384) -> torch.Tensor:
    """Index of the nearest codebook row for each row of ``z`` (N, C) -> (N,).

    argmin ||z - e||^2 = argmin (||e||^2 - 2 z.e): one matmul per chunk of rows, so memory is chunk_size x K floats
    instead of the N x K x C broadcast. Computed in fp32 even under autocast: bf16 distances mis-pick codes.
    """
    z, codebook = z.float(), codebook.float()
    e_sq = codebook.pow(2).sum(dim=1)  # (K,)
    with torch.autocast(device_type=z.device.type, enabled=False):
        # addmm: e_sq - 2 * chunk @ codebook.T, (chunk, K)
        indices = [torch.addmm(e_sq, chunk, codebook.t(), alpha=-2).argmin(dim=1) for chunk in z.split(chunk_size)]
    return torch.cat(indices)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook with the straight-through estimator (van den Oord et al. 2017, eq. 3)."""

    def __init__(self, codebook_size: int, c_latent: int, commitment_weight: float = 0.25) -> None:
        super().__init__()
        self.commitment_weight = commitment_weight
        self.codebook = nn.Embedding(codebook_size, c_latent)
        # Official init: a tiny uniform codebook, the codes are pulled to the encoder outputs by the codebook loss.
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def forward(self, z: torch.Tensor) -> Quantized:
        """z (B, C, h, w) -> codebook vectors of the same shape, indices (B, h, w), VQ loss."""
        batch, channels, height, width = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, channels)  # (B*h*w, C)
        indices = nearest_codes(z_flat, self.codebook.weight)  # (B*h*w,)
        e = self.codebook(indices).view(batch, height, width, channels).permute(0, 3, 1, 2)  # (B, C, h, w)
        # loss = ||e - sg(z)||^2 (moves codes) + beta * ||z - sg(e)||^2 (keeps the encoder near its codes)
        loss = F.mse_loss(e, z.detach()) + self.commitment_weight * F.mse_loss(z, e.detach())
        z_q = z + (e - z).detach()  # value e, gradient identity to z
        return Quantized(z_q, indices.view(batch, height, width), loss)


class StageAOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, 3, H, W), not clamped
    indices: torch.Tensor  # (B, H/4, W/4)
    vq_loss: torch.Tensor  # ()


class StageA(nn.Module):
    """The f4 VQGAN. The latent handed to Stage B is the UNquantised encoder output / ``scale_factor`` (v2 behaviour).

    Encoder: PixelUnshuffle(2) -> 1x1 conv -> [ResBlock, 4x4 s2 conv]... -> 1x1 conv -> BatchNorm.
    Decoder: 1x1 conv -> ``bottleneck_blocks`` ResBlocks -> [ConvTranspose 4x4 s2, ResBlock]... -> 1x1 conv ->
    PixelShuffle(2). Default config: 18,406,894 parameters.
    """

    def __init__(self, levels: int = 2, bottleneck_blocks: int = 12, c_hidden: int = 384, c_latent: int = 4,
                 codebook_size: int = 8192, scale_factor: float = 0.3764, commitment_weight: float = 0.25,
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        # the architecture, stored with checkpoints and exports so they rebuild without outside knowledge
        self.config = dict(levels=levels, bottleneck_blocks=bottleneck_blocks, c_hidden=c_hidden, c_latent=c_latent,
                           codebook_size=codebook_size, scale_factor=scale_factor)
        self.scale_factor = scale_factor
        self.grad_checkpointing = grad_checkpointing
        c_levels = [c_hidden // 2**i for i in reversed(range(levels))]  # [192, 384]
        self.in_block = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(3 * 4, c_levels[0], kernel_size=1))
        self.down_blocks = nn.Sequential(*_encoder_blocks(c_levels, c_latent))
        self.vquantizer = VectorQuantizer(codebook_size, c_latent, commitment_weight)
        self.up_blocks = nn.Sequential(*_decoder_blocks(c_levels, c_latent, bottleneck_blocks))
        self.out_block = nn.Sequential(nn.Conv2d(c_levels[0], 3 * 4, kernel_size=1), nn.PixelShuffle(2))

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of it: PixelUnshuffle(2), then a stride-2 conv per level after the first, and
        a decoder that mirrors them (the official ``vqgan.py`` of dome272/Wuerstchen): 2**levels, 4 for the f4 model."""
        return 2 ** self.config["levels"]

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's last weight, on which the adaptive GAN weight compares gradient norms (Esser et al.)."""
        return self.out_block[0].weight

    # entry points other than forward, which the sharded root runs as forwards (training.distributed.parallelize)
    fsdp_forward_methods = ("encode_unscaled", "quantize", "decode")

    def fsdp_units(self) -> list[Unit]:
        """Every ResBlock, encoder then decoder: FSDP shards each and ``grad_checkpointing`` recomputes each (they
        hold the 4c-wide MLP activations). The root keeps the in/out convs, the samplers, the latent's BatchNorm
        (which must not run twice) and the codebook."""
        return [(block,) for blocks in (self.down_blocks, self.up_blocks) for block in blocks
                if isinstance(block, MixingResidualBlock)]

    def _run(self, blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        use_checkpoint = self.grad_checkpointing and self.training
        for block in blocks:  # the units (fsdp_units) recomputed, the rest run once
            x = maybe_checkpoint(use_checkpoint and isinstance(block, MixingResidualBlock), block, x)
        return x

    def encode_unscaled(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> the raw encoder output (B, 4, H/4, W/4), the space of the codebook."""
        return self._run(self.down_blocks, self.in_block(images))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> unquantised latents (B, 4, H/4, W/4), divided by ``scale_factor``."""
        return self.encode_unscaled(images) / self.scale_factor

    def set_scale_factor(self, scale_factor: float) -> None:
        """Set the latent scale (and the config checkpoints store). It is a measured property of trained weights
        (0.3764 of the released ones; ``wuerstchen.training.latent_scale`` measures ours), not architecture: training
        Stage A is invariant to it (``quantize`` and ``decode`` undo it), Stage B sees ``encode``'s latents."""
        if not scale_factor > 0:
            raise ValueError(f"scale_factor={scale_factor} must be > 0")
        self.scale_factor = float(scale_factor)
        self.config["scale_factor"] = float(scale_factor)

    def quantize(self, latents: torch.Tensor) -> Quantized:
        """Quantise scaled latents (as ``encode`` returns them) against the codebook, which lives in the raw space."""
        raw = self.vquantizer(latents * self.scale_factor)
        return Quantized(raw.latents / self.scale_factor, raw.indices, raw.loss)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, 4h, 4w), no quantisation and no clamp."""
        return self.out_block(self._run(self.up_blocks, latents * self.scale_factor))

    def forward(self, images: torch.Tensor) -> StageAOutput:
        """Training pass: decode(quantize(encode(images)))."""
        quantized = self.quantize(self.encode(images))
        return StageAOutput(self.decode(quantized.latents), quantized.indices, quantized.loss)


def _encoder_blocks(c_levels: list[int], c_latent: int) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    for i, c in enumerate(c_levels):
        if i > 0:
            blocks.append(nn.Conv2d(c_levels[i - 1], c, kernel_size=4, stride=2, padding=1))
        blocks.append(MixingResidualBlock(c, 4 * c))
    # BatchNorm keeps the latent near unit scale, so one fixed scale_factor suits every image.
    blocks.append(nn.Sequential(nn.Conv2d(c_levels[-1], c_latent, kernel_size=1, bias=False),
                                nn.BatchNorm2d(c_latent)))
    return blocks


def _decoder_blocks(c_levels: list[int], c_latent: int, bottleneck_blocks: int) -> list[nn.Module]:
    blocks: list[nn.Module] = [nn.Sequential(nn.Conv2d(c_latent, c_levels[-1], kernel_size=1))]
    widths = c_levels[::-1]  # [384, 192]
    for i, c in enumerate(widths):
        blocks += [MixingResidualBlock(c, 4 * c) for _ in range(bottleneck_blocks if i == 0 else 1)]
        if i < len(widths) - 1:
            blocks.append(nn.ConvTranspose2d(c, widths[i + 1], kernel_size=4, stride=2, padding=1))
    return blocks


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Perplexity exp(H(p)) of the code histogram (== codebook_size when uniform) and the fraction of codes used."""
    counts = torch.bincount(indices.flatten(), minlength=codebook_size).double()  # (K,)
    p = counts / counts.sum()
    entropy = -torch.special.xlogy(p, p).sum()  # xlogy: 0 * log 0 = 0 for unused codes
    return {"perplexity": entropy.exp().item(), "fraction_used": (counts > 0).double().mean().item()}
