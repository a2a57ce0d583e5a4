"""Stage B v2 ("DiffNeXt"): the diffusion decoder in Stage A's latent space (arXiv 2306.00637)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import (AttnBlock, LayerNorm2d, ResBlockStageB, TimestepBlock, Unit, init_xavier, maybe_checkpoint,
                     timestep_embedding)

STAGE_A_FACTOR = 4  # Stage B works on the latent of Stage A, an f4 VQGAN: image side / 4 (arXiv 2306.00637)


def pixel_multiple(patch_size: int, num_levels: int) -> int:
    """Image side multiple a Stage B needs: its latent (image / 4) is PixelUnshuffled by ``patch_size``, then halved
    by a stride-2 conv at every level below the first, and the up path's skips must meet those sizes again
    (``DiffNeXt`` in dome272/Wuerstchen ``modules.py``; StableCascade's ``modules/stage_b.py`` down-samples the same
    way but resizes the up path to a skip that differs). The released layout, patch 2 and 4 levels: 4 * 2 * 2**3 = 64.
    """
    return STAGE_A_FACTOR * patch_size * 2 ** (num_levels - 1)


# The released Stage B v2 (configs/model/stage_b/full.yaml): what a cache for an unknown Stage B is snapped to.
RELEASED_PIXEL_MULTIPLE = pixel_multiple(patch_size=2, num_levels=4)


class StageB(nn.Module):
    """U-Net over Stage A latents, conditioned on the semantic latent (``effnet``) and CLIP text states.

    The effnet latent is resized to every level that ``inject_effnet`` names, mapped by a 1x1 conv to ``c_cond``
    channels and fed as the skip input of that level's ResBlocks. ``forward`` returns eps_hat = (x_t - a) / b with
    b = sigmoid(.) squeezed into [1e-3, 1 - 1e-3]. The default is the released 1,055,365,280-parameter layout.
    """

    def __init__(self, c_in: int = 4, c_out: int = 4, c_r: int = 64, patch_size: int = 2, c_cond: int = 1024,
                 c_hidden: Sequence[int] = (320, 640, 1280, 1280), nhead: Sequence[int] = (-1, 10, 20, 20),
                 blocks: Sequence[int] = (4, 4, 14, 4), level_config: Sequence[str] = ("CT", "CTA", "CTA", "CTA"),
                 inject_effnet: Sequence[bool] = (False, True, True, True), effnet_embd: int = 16,
                 clip_embd: int = 1024, kernel_size: int = 3, dropout: float | Sequence[float] = 0.1) -> None:
        super().__init__()
        c_hidden, nhead, blocks = list(c_hidden), list(nhead), list(blocks)
        level_config, inject_effnet = list(level_config), list(inject_effnet)
        if not len(c_hidden) == len(nhead) == len(blocks) == len(level_config) == len(inject_effnet):
            raise ValueError("c_hidden, nhead, blocks, level_config and inject_effnet need one entry per level")
        dropouts = list(dropout) if isinstance(dropout, Sequence) else [float(dropout)] * len(c_hidden)
        # the architecture, stored with checkpoints and exports so they rebuild without outside knowledge
        self.config = dict(c_in=c_in, c_out=c_out, c_r=c_r, patch_size=patch_size, c_cond=c_cond, c_hidden=c_hidden,
                           nhead=nhead, blocks=blocks, level_config=level_config, inject_effnet=inject_effnet,
                           effnet_embd=effnet_embd, clip_embd=clip_embd, kernel_size=kernel_size,
                           dropout=dropouts if isinstance(dropout, Sequence) else float(dropout))
        self.c_r, self.num_blocks = c_r, sum(blocks)
        self.grad_checkpointing = False  # in training, recompute each of fsdp_units() in the backward pass
        self.clip_mapper = nn.Linear(clip_embd, c_cond)
        # one slot per down level, then per up level (mirrored); levels without injection hold None
        self.effnet_mappers = nn.ModuleList(
            [nn.Conv2d(effnet_embd, c_cond, kernel_size=1) if inject else None
             for inject in inject_effnet + inject_effnet[::-1]])
        self.seq_norm = nn.LayerNorm(c_cond, elementwise_affine=False, eps=1e-6)
        self.embedding = nn.Sequential(nn.PixelUnshuffle(patch_size),
                                       nn.Conv2d(c_in * patch_size**2, c_hidden[0], kernel_size=1),
                                       LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6))

        def block(kind: str, level: int, c_skip: int) -> nn.Module:
            c = c_hidden[level]
            if kind == "C":
                return ResBlockStageB(c, c_skip, kernel_size=kernel_size, dropout=dropouts[level])
            if kind == "T":
                return TimestepBlock(c, c_r)
            if kind == "A":
                return AttnBlock(c, c_cond, nhead[level], self_attn=True, dropout=dropouts[level])
            raise ValueError(f"unknown block type {kind!r} in level_config {level_config}")

        self.down_blocks = nn.ModuleList()
        for level in range(len(c_hidden)):
            layers = nn.ModuleList()
            if level > 0:
                layers.append(nn.Sequential(LayerNorm2d(c_hidden[level - 1], elementwise_affine=False, eps=1e-6),
                                            nn.Conv2d(c_hidden[level - 1], c_hidden[level], kernel_size=2, stride=2)))
            c_skip = c_cond if inject_effnet[level] else 0
            for _ in range(blocks[level]):
                layers.extend(block(kind, level, c_skip) for kind in level_config[level])
            self.down_blocks.append(layers)

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(c_hidden))):
            layers = nn.ModuleList()
            for repeat in range(blocks[level]):
                for position, kind in enumerate(level_config[level]):
                    # the first block of every level but the deepest takes the down path's output as skip
                    c_skip = c_hidden[level] if level < len(c_hidden) - 1 and repeat == position == 0 else 0
                    c_skip += c_cond if inject_effnet[level] else 0
                    layers.append(block(kind, level, c_skip))
            if level > 0:
                layers.append(nn.Sequential(
                    LayerNorm2d(c_hidden[level], elementwise_affine=False, eps=1e-6),
                    nn.ConvTranspose2d(c_hidden[level], c_hidden[level - 1], kernel_size=2, stride=2)))
            self.up_blocks.append(layers)

        self.clf = nn.Sequential(LayerNorm2d(c_hidden[0], elementwise_affine=False, eps=1e-6),
                                 nn.Conv2d(c_hidden[0], 2 * c_out * patch_size**2, kernel_size=1),
                                 nn.PixelShuffle(patch_size))
        self.reset_parameters()

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of it (:func:`pixel_multiple`): 64 for the released layout, 32 for tiny."""
        return pixel_multiple(self.config["patch_size"], len(self.config["c_hidden"]))

    def reset_parameters(self) -> None:
        """Official initialisation: Xavier; conditioning mappers N(0, 0.02); input conv Xavier with gain 0.02;
        output conv and timestep mappers zero; ResBlocks' last layers scaled by sqrt(1 / number of blocks)."""
        self.apply(init_xavier)
        for mapper in self.effnet_mappers:
            if mapper is not None:
                nn.init.normal_(mapper.weight, std=0.02)
        nn.init.normal_(self.clip_mapper.weight, std=0.02)
        nn.init.xavier_uniform_(self.embedding[1].weight, gain=0.02)
        nn.init.zeros_(self.clf[1].weight)
        for layers in [*self.down_blocks, *self.up_blocks]:
            for layer in layers:
                if isinstance(layer, ResBlockStageB):
                    layer.channelwise[-1].weight.data.mul_(math.sqrt(1 / self.num_blocks))
                elif isinstance(layer, TimestepBlock):
                    nn.init.zeros_(layer.mapper.weight)

    def _effnet_skip(self, slot: int, effnet: torch.Tensor, size: torch.Size) -> torch.Tensor | None:
        """The effnet latent resized to a level (bicubic, antialiased, as the official code) and mapped."""
        mapper = self.effnet_mappers[slot]
        if mapper is None:
            return None
        resized = F.interpolate(effnet.float(), size=size, mode="bicubic", antialias=True, align_corners=True)
        return mapper(resized.to(effnet.dtype))

    def _level_units(self, layers: nn.ModuleList, level: int, start: int) -> list[Unit]:
        """The ``blocks[level]`` repeats of ``level_config[level]`` in a level's layers, from index ``start`` (after
        a down level's sampler)."""
        kinds, modules = len(self.config["level_config"][level]), list(layers)
        return [tuple(modules[start + kinds * i: start + kinds * (i + 1)]) for i in range(self.config["blocks"][level])]

    def _down_units(self, level: int) -> list[Unit]:
        return self._level_units(self.down_blocks[level], level, start=int(level > 0))

    def _up_units(self, index: int) -> list[Unit]:
        return self._level_units(self.up_blocks[index], len(self.up_blocks) - 1 - index, start=0)

    def fsdp_units(self) -> list[Unit]:
        """Every repeat of a level's ``level_config`` (e.g. [ResBlock, TimestepBlock, AttnBlock]), down path then up
        path: FSDP shards each as one unit and ``grad_checkpointing`` recomputes each. The root keeps the stems
        (``embedding``, ``clip_mapper``, ``effnet_mappers``), the levels' down/up samplers and ``clf``."""
        return ([unit for level in range(len(self.down_blocks)) for unit in self._down_units(level)]
                + [unit for index in range(len(self.up_blocks)) for unit in self._up_units(index)])

    def _run(self, unit: Unit, x: torch.Tensor, first_skip: torch.Tensor | None, skip: torch.Tensor | None,
             r_embed: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self.grad_checkpointing and self.training, _run_unit, unit, x, first_skip, skip,
                                r_embed, clip)

    def _down(self, x: torch.Tensor, r_embed: torch.Tensor, effnet: torch.Tensor,
              clip: torch.Tensor) -> list[torch.Tensor]:
        level_outputs = []
        for level, layers in enumerate(self.down_blocks):
            if level > 0:
                x = layers[0](x)  # LN + stride-2 conv
            effnet_skip = self._effnet_skip(level, effnet, x.shape[-2:])
            for unit in self._down_units(level):
                x = self._run(unit, x, effnet_skip, effnet_skip, r_embed, clip)
            level_outputs.insert(0, x)
        return level_outputs  # deepest first

    def _up(self, level_outputs: list[torch.Tensor], r_embed: torch.Tensor, effnet: torch.Tensor,
            clip: torch.Tensor) -> torch.Tensor:
        x = level_outputs[0]
        for index, layers in enumerate(self.up_blocks):
            effnet_skip = self._effnet_skip(len(self.down_blocks) + index, effnet, x.shape[-2:])
            # the first ResBlock of every level but the deepest also takes the down path's output at its size
            skips = [level_outputs[index]] if index > 0 else []
            skips += [effnet_skip] if effnet_skip is not None else []
            first_skip = torch.cat(skips, dim=1) if skips else None
            for repeat, unit in enumerate(self._up_units(index)):
                x = self._run(unit, x, first_skip if repeat == 0 else effnet_skip, effnet_skip, r_embed, clip)
            if index < len(self.up_blocks) - 1:
                x = layers[-1](x)  # LN + transposed conv
        return x

    def forward(self, x: torch.Tensor, r: torch.Tensor, effnet: torch.Tensor, clip: torch.Tensor,
                eps: float = 1e-3) -> torch.Tensor:
        """x (B, 4, H, W) noised Stage A latent, r (B,) time, effnet (B, 16, h, w), clip (B, 77, clip_embd)."""
        x_in = x
        r_embed = timestep_embedding(r, self.c_r).to(x.dtype)
        clip = self.seq_norm(self.clip_mapper(clip))  # (B, 77, c_cond)
        x = self.embedding(x)
        x = self._up(self._down(x, r_embed, effnet, clip), r_embed, effnet, clip)
        a, b = self.clf(x).chunk(2, dim=1)  # (B, c_out, H, W) each
        b = b.sigmoid() * (1 - eps * 2) + eps
        return (x_in - a) / b


def _run_unit(unit: Unit, x: torch.Tensor, first_skip: torch.Tensor | None, skip: torch.Tensor | None,
              r_embed: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """One repeat of a level's blocks; a ResBlock first in it takes ``first_skip``, any other ``skip``."""
    for position, block in enumerate(unit):
        if isinstance(block, ResBlockStageB):
            x = block(x, first_skip if position == 0 else skip)
        elif isinstance(block, TimestepBlock):
            x = block(x, r_embed)
        else:
            x = block(x, clip)
    return x
