"""Blocks shared by Stage B and Stage C (arXiv 2306.00637), named as in the released Würstchen weights."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# A network's unit of sharding and recomputation: modules FSDP gathers with one all-gather and activation
# checkpointing recomputes together (``wuerstchen.training.distributed.parallelize``). Every network lists its units in
# forward order with ``fsdp_units()``; what no unit holds (stems, heads, samplers) stays with the network root.
Unit = tuple[nn.Module, ...]


def timestep_embedding(r: torch.Tensor, c_r: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of the continuous diffusion time ``r`` in [0, 1] (official ``gen_r_embedding``).

    ``r`` is scaled by ``max_positions``; ``c_r // 2`` frequencies exp(-k ln(max_positions) / (c_r/2 - 1)), sin || cos.
    """
    r = r.float() * max_positions  # (B,)
    half = c_r // 2
    freqs = torch.exp(-math.log(max_positions) / (half - 1) * torch.arange(half, device=r.device, dtype=torch.float32))
    angles = r[:, None] * freqs[None, :]  # (B, half)
    embedding = torch.cat([angles.sin(), angles.cos()], dim=1)
    if c_r % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding  # (B, c_r), float32; the mappers cast under autocast


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN over a channels-last (B, H, W, C) map; starts as the identity (gamma = beta = 0)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.norm(x, p=2, dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
        norm = norm / (norm.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * norm) + self.beta + x


def _channel_mlp(c_in: int, c: int, dropout: float) -> nn.Sequential:
    """Linear -> GELU -> GRN -> Dropout -> Linear; indices 0, 2 and 4 are the checkpoint keys."""
    return nn.Sequential(nn.Linear(c_in, c * 4), nn.GELU(), GlobalResponseNorm(c * 4), nn.Dropout(dropout),
                         nn.Linear(c * 4, c))


class ResBlock(nn.Module):
    """Stage C's ResBlock: depthwise conv over [x ; skip] -> LN -> channel MLP, residual."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c + c_skip, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = _channel_mlp(c, c, dropout)

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor | None = None) -> torch.Tensor:
        residual = x
        if x_skip is not None:
            x = torch.cat([x, x_skip], dim=1)
        x = self.norm(self.depthwise(x)).permute(0, 2, 3, 1)  # (B, H, W, C)
        return self.channelwise(x).permute(0, 3, 1, 2) + residual


class ResBlockStageB(nn.Module):
    """Stage B's ResBlock: depthwise conv -> LN, then [x ; skip] through the channel MLP, residual."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = _channel_mlp(c + c_skip, c, dropout)

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor | None = None) -> torch.Tensor:
        residual = x
        x = self.norm(self.depthwise(x))
        if x_skip is not None:
            x = torch.cat([x, x_skip], dim=1)
        return self.channelwise(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + residual


class TimestepBlock(nn.Module):
    """Modulation by the time embedding: x * (1 + a) + b with [a ; b] = Linear(r_embed)."""

    def __init__(self, c: int, c_r: int) -> None:
        super().__init__()
        self.mapper = nn.Linear(c_r, c * 2)

    def forward(self, x: torch.Tensor, r_embed: torch.Tensor) -> torch.Tensor:
        a, b = self.mapper(r_embed)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + a) + b


class MultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter names, computed by SDPA.

    Keeping ``in_proj_weight``/``in_proj_bias``/``out_proj`` lets the released checkpoints load as they are, while
    ``F.scaled_dot_product_attention`` picks the flash / memory-efficient kernels on GPU. Dropout acts on the
    attention probabilities in training, as in ``nn.MultiheadAttention``.
    """

    def __init__(self, c: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        if c % nhead:
            raise ValueError(f"channels {c} are not divisible by nhead {nhead}")
        self.nhead = nhead
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * c, c))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * c))
        self.out_proj = nn.Linear(c, c)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """query (B, N, C), kv (B, M, C) -> (B, N, C)."""
        c = query.shape[-1]
        w_q, w_kv = self.in_proj_weight.split([c, 2 * c])
        b_q, b_kv = self.in_proj_bias.split([c, 2 * c])
        q = F.linear(query, w_q, b_q)
        k, v = F.linear(kv, w_kv, b_kv).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.nhead, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class Attention2D(nn.Module):
    """Attention of a (B, C, H, W) map over [its own tokens ; conditioning tokens] (one softmax over both)."""

    def __init__(self, c: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = MultiheadAttention(c, nhead, dropout)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, self_attn: bool = True) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        if self_attn:
            kv = torch.cat([tokens, kv], dim=1)
        out = self.attn(tokens, kv)
        return out.transpose(1, 2).reshape(batch, channels, height, width)


class AttnBlock(nn.Module):
    """LN -> attention over [image tokens ; SiLU -> Linear(conditioning)], residual."""

    def __init__(self, c: int, c_cond: int, nhead: int, self_attn: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.norm = LayerNorm2d(c, elementwise_affine=False, eps=1e-6)
        self.attention = Attention2D(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kv = self.kv_mapper(kv)
        return x + self.attention(self.norm(x), kv, self_attn=self.self_attn)


def maybe_checkpoint(enabled: bool, function: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """Run ``function(*args)``, recomputing its activations in the backward pass when ``enabled`` (the networks run
    each of their units through it, so the recomputed unit is the sharded one)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)


def init_xavier(module: nn.Module) -> None:
    """Official initialisation of convs and linears: Xavier-uniform weights, zero biases (transposed convs keep
    torch's default, as in the official code)."""
    if isinstance(module, nn.Conv2d | nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, MultiheadAttention):
        nn.init.xavier_uniform_(module.in_proj_weight)
        nn.init.zeros_(module.in_proj_bias)
