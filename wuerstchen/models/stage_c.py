"""Stage C: the text-conditional prior in the 16-channel semantic latent space (arXiv 2306.00637)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import (AttnBlock, LayerNorm2d, ResBlock, TimestepBlock, Unit, init_xavier, maybe_checkpoint,
                     timestep_embedding)


class StageC(nn.Module):
    """``depth`` repeats of [ResBlock, TimestepBlock, AttnBlock] at the latent's own resolution.

    The paper's 16-block layout is the default (347,037,472 parameters); the released v2 prior is
    ``StageC(c=1536, depth=32, nhead=24, c_cond=1280)`` (993,636,896). There are no positional embeddings, so the
    weights work at any latent size. ``forward(x, r, clip)`` returns the noise estimate in the A/B parameterisation.

    ``input_init_std``: the std of the normal init of the input projection and the text mapper (the official 0.02,
    close to Xavier's 0.026-0.039 at the paper's and released widths); None keeps them Xavier, which narrow priors
    need: at width 128, 0.02 is 5x below Xavier, and the CPU demo's 1500-step prior then put the object in the
    captioned cell for 66 % of captions instead of 98 % (docs/benchmarks.md). Only the initialisation: not stored in
    ``config``.
    """

    def __init__(self, c_in: int = 16, c: int = 1280, c_cond: int = 1024, c_r: int = 64, depth: int = 16,
                 nhead: int = 16, dropout: float = 0.1, input_init_std: float | None = 0.02) -> None:
        super().__init__()
        # the architecture, stored with checkpoints and exports so they rebuild without outside knowledge
        self.config = dict(c_in=c_in, c=c, c_cond=c_cond, c_r=c_r, depth=depth, nhead=nhead, dropout=dropout)
        self.input_init_std = input_init_std
        self.c_r = c_r
        self.depth = depth
        self.grad_checkpointing = False  # in training, recompute each of fsdp_units() in the backward pass
        self.projection = nn.Conv2d(c_in, c, kernel_size=1)
        self.cond_mapper = nn.Sequential(nn.Linear(c_cond, c), nn.LeakyReLU(0.2), nn.Linear(c, c))
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(ResBlock(c, dropout=dropout))
            self.blocks.append(TimestepBlock(c, c_r))
            self.blocks.append(AttnBlock(c, c, nhead, self_attn=True, dropout=dropout))
        self.out = nn.Sequential(LayerNorm2d(c, elementwise_affine=False, eps=1e-6), nn.Conv2d(c, c_in * 2, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official initialisation (the official ``Prior.__init__``): Xavier everywhere; the input projection and both
        linears of the text mapper drawn from N(0, 0.02) (``input_init_std``); the output conv and timestep mappers at
        zero (so the network starts at eps_hat = x_t); the ResBlocks' last layers scaled by sqrt(1 / depth)."""
        self.apply(init_xavier)
        if self.input_init_std is not None:
            for layer in (self.projection, self.cond_mapper[0], self.cond_mapper[-1]):
                nn.init.normal_(layer.weight, std=self.input_init_std)  # biases stay at zero (init_xavier)
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)
        for block in self.blocks:
            if isinstance(block, ResBlock):
                block.channelwise[-1].weight.data.mul_(math.sqrt(1 / self.depth))
            elif isinstance(block, TimestepBlock):
                nn.init.zeros_(block.mapper.weight)

    def fsdp_units(self) -> list[Unit]:
        """The ``depth`` [ResBlock, TimestepBlock, AttnBlock] repeats, in forward order: FSDP shards each as one unit
        and ``grad_checkpointing`` recomputes each. They stay flat in ``blocks`` (the released keys
        ``blocks.{3i+k}``); the root keeps ``projection``, ``cond_mapper`` and ``out``."""
        blocks = list(self.blocks)
        return [tuple(blocks[3 * i: 3 * i + 3]) for i in range(self.depth)]

    def forward(self, x: torch.Tensor, r: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        """x (B, 16, h, w) noised latent, r (B,) time in [0, 1], clip (B, 77, c_cond) text states -> eps_hat."""
        x_in = x
        r_embed = timestep_embedding(r, self.c_r).to(x.dtype)  # (B, c_r)
        clip = self.cond_mapper(clip)  # (B, 77, c)
        x = self.projection(x)  # (B, c, h, w)
        for unit in self.fsdp_units():
            x = maybe_checkpoint(self.grad_checkpointing and self.training, _run_unit, unit, x, r_embed, clip)
        a, b = self.out(x).chunk(2, dim=1)  # (B, 16, h, w) each
        # A/B parameterisation: eps_hat = (x_t - A) / |1 - B|; the zero-initialised output makes eps_hat = x_t
        return (x_in - a) / ((1 - b).abs() + 1e-5)


def _run_unit(unit: Unit, x: torch.Tensor, r_embed: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """One [ResBlock, TimestepBlock, AttnBlock] repeat."""
    res, time, attn = unit
    return attn(time(res(x), r_embed), clip)
