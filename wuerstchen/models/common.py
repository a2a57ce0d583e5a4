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


# GRNs over maps of fewer elements keep autograd's backward: below ~16k elements the written-out one's Python calls
# cost more than the passes it saves (in CPU training steps ~40 us slower per GRN at 2-4k elements, ~45 us faster at
# 32k; outputs are the same either way)
GRN_WRITTEN_BACKWARD_MIN_NUMEL = 1 << 15


def _grn_scale(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRN's per-sample, per-channel factors of a (B, H, W, C) map: norm (the L2 norm over H, W), mean
    (mean_C(norm) + 1e-6, (B, 1, 1, 1)) and scale = norm / mean, computed as diffusers' and ConvNeXt-V2's GRN do."""
    norm = torch.linalg.vector_norm(x, 2, dim=(1, 2), keepdim=True)  # (B, 1, 1, C): the kernel torch.norm calls
    mean = norm.mean(dim=-1, keepdim=True) + 1e-6
    return norm, mean, norm / mean


class _GlobalResponseNorm(torch.autograd.Function):
    """GRN with the reference forward, op for op, and its backward written out.

    The forward runs the ops of diffusers' (and ConvNeXt-V2's) GRN in their order, so the values are the same to the
    bit; its norm stays ``torch.norm``'s kernel, whose gradient is finite (zero) at an all-zero channel, where a
    square root of summed squares has an infinite one (that stopped the CPU demo on NaN gradients,
    docs/benchmarks.md). Over the (B, H, W, 4c) map, the channel MLP's widest activation, autograd's backward runs
    nine elementwise ops and three reductions and keeps ``x * scale`` for them; this one runs three and two and keeps
    only x beside per-channel values (a training step of the small Stage C takes ~8 % less on a CPU).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        norm, mean, scale = _grn_scale(x)
        ctx.save_for_backward(x, gamma, norm, scale, mean)
        out = gamma * (x * scale)  # of the promoted dtype already, so adding in place rounds as out-of-place would
        out += beta
        out += x
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, gamma, norm, scale, mean = ctx.saved_tensors
        # out = gamma * x * scale + beta + x, scale = norm / mean, mean = mean_C(norm) + 1e-6, norm = ||x|| over H, W
        grad_x_scale = (grad * x).sum(dim=(1, 2), keepdim=True, dtype=torch.float32)  # (B, 1, 1, C)
        grad_gamma = (grad_x_scale * scale).sum(dim=0, keepdim=True)
        grad_beta = grad.sum(dim=(0, 1, 2), keepdim=True)
        grad_scale = grad_x_scale * gamma
        grad_norm = (grad_scale - (grad_scale * scale).mean(dim=-1, keepdim=True)) / mean
        grad_x = grad * (gamma * scale + 1)
        # torch.norm's own backward: x * grad / norm, zero where the norm is zero
        grad_x.addcmul_(x, (grad_norm / norm).masked_fill_(norm == 0, 0))
        return grad_x.to(x.dtype), grad_gamma.to(gamma.dtype), grad_beta.to(gamma.dtype)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN over a channels-last (B, H, W, C) map; starts as the identity (gamma = beta = 0)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.numel() >= GRN_WRITTEN_BACKWARD_MIN_NUMEL:
            return _GlobalResponseNorm.apply(x, self.gamma, self.beta)  # the same values, a leaner backward
        _, _, scale = _grn_scale(x)
        return self.gamma * (x * scale) + self.beta + x


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
