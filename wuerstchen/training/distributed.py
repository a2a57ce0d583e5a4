"""Distributed pieces the stages share: cross-rank BatchNorm on any backend, the agreement of all ranks on skipping a
non-finite optimizer step, the one function that shards a network (:func:`parallelize`) and the FSDP2 strategy that
calls it."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

from ..models.common import Unit

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

log = logging.getLogger(__name__)


def distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def summed_over_ranks(counts: torch.Tensor) -> torch.Tensor:
    """``counts`` summed over every rank, in place, on each rank's own device (a no-op on one process)."""
    if distributed_world() > 1:
        dist.all_reduce(counts)
    return counts


def from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank, in place. A tensor broadcast, not Lightning's ``strategy.broadcast``: that
    pickles the object, and a CUDA tensor unpickles onto rank 0's GPU on every rank."""
    if distributed_world() > 1:
        dist.broadcast(tensor, src=0)
    return tensor



def union_over_ranks(items: set) -> set:
    """The union of every rank's (picklable) ``items``, on every rank; a collective, so every rank must call it."""
    if distributed_world() == 1:
        return set(items)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(items))
    return {item for part in gathered for item in part}

class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of all ranks' batches together, on any backend (gloo on CPU
    included).

    torch's ``nn.SyncBatchNorm`` only runs on GPUs. Here each rank computes its count, mean and sum of squared
    deviations per channel in float32 (under bf16 autocast too: bf16 sums of x and x^2 cancel to noise when the mean
    is large next to the spread), one differentiable all-reduce gathers every rank's, and they combine as in Chan et
    al. 1979, "Updating formulae and a pairwise algorithm for computing sample variances" (no E[x^2] - E[x]^2).
    Gradients flow through the global statistics exactly as in a single-process run over the concatenated batch.
    Parameter and buffer names are BatchNorm2d's, so checkpoints do not change.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or distributed_world() == 1:
            y = super().forward(x)
            return self.post(y) if hasattr(self, "post") else y
        x32 = x.float()  # the statistics and the normalisation in float32, whatever the input dtype
        mean, var, count = global_batch_stats(x32)  # (C,), (C,), ()
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)
        y = (x32 - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        y = y.to(x.dtype)
        return self.post(y) if hasattr(self, "post") else y

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        unbiased = var * count / (count - 1).clamp(min=1)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def global_batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased variance) of ``x`` (B, C, H, W) over every rank's batch, and the element count.

    Each rank fills its own row of a (world, 2C + 1) table with (count, count * mean, sum of squared deviations)
    and one differentiable all-reduce sums the tables: an all-gather whose backward gloo can run. Chan et al.'s pairwise
    update: M2 = sum_r M2_r + sum_r n_r (mean_r - mean)^2, whose terms are all non-negative.
    """
    world, rank, channels = dist.get_world_size(), dist.get_rank(), x.shape[1]
    n = x.new_tensor(float(x.numel() // channels))
    var_r, mean_r = torch.var_mean(x, dim=(0, 2, 3), correction=0)  # (C,) each, two-pass: no cancellation
    row = torch.cat([n[None], n * mean_r, n * var_r])  # (2C + 1,)
    table = torch.zeros(world, 2 * channels + 1, dtype=x.dtype, device=x.device)
    table = differentiable_all_reduce(table.index_copy(0, torch.tensor([rank], device=x.device), row[None]))
    counts, means = table[:, :1], table[:, 1:channels + 1] / table[:, :1].clamp(min=1)  # (world, 1), (world, C)
    count = counts.sum()
    mean = (counts * means).sum(0) / count
    m2 = table[:, channels + 1:].sum(0) + (counts * (means - mean).square()).sum(0)
    return mean, m2 / count, count


def convert_sync_batchnorm(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Every BatchNorm2d in ``module`` (timm's BatchNormAct2d included) normalises over all ranks' batches.

    ``device``: where the strategy trains (``trainer.strategy.root_device``), which may differ from where the
    parameters are when this runs (before the strategy moves the module). On CUDA this is timm's converter (torch's
    fused ``nn.SyncBatchNorm``, keeping timm's activation); elsewhere :class:`SyncBatchNorm`, with a BatchNormAct2d's
    dropout and activation applied after it.
    """
    if torch.device(device).type == "cuda":
        from timm.layers import convert_sync_batchnorm as timm_convert

        return timm_convert(module)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SyncBatchNorm):
            sync = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                 child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            post = [m for m in (getattr(child, "drop", None), getattr(child, "act", None)) if m is not None]
            if post:  # timm's BatchNormAct2d: parameter-free dropout and activation after the normalisation
                sync.post = nn.Sequential(*post)
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child, device)
    return module


# --------------------------------------------------------------------------------------------- non-finite steps
class StepHealth(NamedTuple):
    """What the ranks agree on before an optimizer step (:func:`step_health`)."""

    norm: torch.Tensor  # the gradients' global 2-norm, fp32 on the device: for clipping and the grad_norm log
    finite: bool  # every gradient on every rank finite (and the norm too)
    flags: list[bool]  # each flag given, true on any rank


def step_health(grads: Iterable[torch.Tensor | None], device: torch.device,
                flags: Sequence[bool] = ()) -> StepHealth:
    """The gradients' global 2-norm, whether they are finite everywhere, and ``flags`` (host booleans, e.g. a
    preemption signal) OR-ed over the ranks: one multi-tensor norm pass, at most one all-reduce and one host read.

    A NaN or inf anywhere makes its tensor's norm, hence the global norm, non-finite; a finite gradient whose norm
    overflows (entries beyond ~1e19 in fp32) counts as non-finite too, its step would be garbage anyway. Sharded
    (DTensor) gradients contribute their local shards' squared norm to the all-reduce (a sum, as FSDP2's norm is);
    replicated ones (one process, DDP after its all-reduce) are whole on every rank already. Every rank must call it
    (a collective on several ranks). The norm is computed as ``torch.nn.utils.get_total_norm`` computes it, so
    clipping with it (:func:`clip_by_norm`) is what ``clip_grad_norm_`` does.
    """
    grads = [g for g in grads if g is not None]
    is_shard = [isinstance(g, torch.distributed.tensor.DTensor) for g in grads]
    replicated = _norm([g for g, shard in zip(grads, is_shard) if not shard], device)
    shards = _norm([g.to_local() for g, shard in zip(grads, is_shard) if shard], device) if any(is_shard) else None
    if distributed_world() == 1:  # the flags are this process's already
        norm = replicated if shards is None else torch.linalg.vector_norm(torch.stack([replicated, shards]))
        return StepHealth(norm, math.isfinite(norm.item()), [bool(f) for f in flags])  # the step's one host read
    # summed over ranks: the shards' squared norms, non-finite counts, the flags (a true one makes the sum positive)
    packed = torch.stack([torch.zeros_like(replicated) if shards is None else shards.square(),
                          (~torch.isfinite(replicated)).to(torch.float32),
                          *(torch.tensor(float(f), device=device) for f in flags)])
    dist.all_reduce(packed)
    norm = replicated if shards is None else (packed[0] + replicated.square()).sqrt()
    read = torch.cat([norm[None], packed[1:]]).tolist()  # the step's one host read
    return StepHealth(norm, math.isfinite(read[0]) and read[1] == 0, [value > 0 for value in read[2:]])


def _norm(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The 2-norm of all ``tensors`` together (``torch.nn.utils.get_total_norm``: what ``clip_grad_norm_`` computes),
    fp32 on ``device``; 0 for none."""
    return torch.nn.utils.get_total_norm(tensors).to(device, torch.float32)


def clip_by_norm(grads: Iterable[torch.Tensor | None], max_norm: float, norm: torch.Tensor) -> None:
    """Scale the gradients in place so their global norm ``norm`` (:func:`step_health`) is at most ``max_norm``:
    ``clip_grad_norm_``'s coefficient without computing the norm again. torch's ``clip_grads_with_norm_`` does the
    same for whole gradients; sharded ones are scaled here on their local shards, since ``norm`` is a plain tensor
    (already reduced over the ranks), not a DTensor."""
    local = [g.to_local() if isinstance(g, torch.distributed.tensor.DTensor) else g for g in grads if g is not None]
    if local:
        coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(local, coefficient.to(local[0].device))


def all_finite(tensors: Iterable[torch.Tensor | None], device: torch.device) -> bool:
    """Whether every tensor is finite on every rank (:func:`step_health` without flags)."""
    return step_health(tensors, device).finite


class NonFiniteSteps:
    """Counts optimizer steps skipped for non-finite gradients and stops a run that keeps producing them."""

    def __init__(self, max_in_a_row: int = 10) -> None:
        if max_in_a_row < 1:
            raise ValueError(f"max_nonfinite_steps={max_in_a_row} must be >= 1")
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0

    def check(self, optimizer: torch.optim.Optimizer, step: int, device: torch.device) -> bool:
        """True if the step may go ahead; else drops every gradient (so the step changes nothing) and counts it."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return self.record(all_finite((p.grad for p in params), device), optimizer, step)

    def record(self, finite: bool, optimizer: torch.optim.Optimizer, step: int) -> bool:
        """Count the step as the ranks agreed (``finite``: :func:`step_health`); a non-finite one drops every
        gradient, so the optimizer step changes nothing. Returns ``finite``."""
        if finite:
            self.in_a_row = 0
            return True
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for p in params:
            p.grad = None
        self.in_a_row += 1
        self.total += 1
        log.warning("non-finite gradients at step %d: optimizer step skipped on all ranks (%d in a row, %d in all)",
                    step, self.in_a_row, self.total)
        if self.in_a_row >= self.max_in_a_row:
            raise FloatingPointError(
                f"{self.in_a_row} optimizer steps in a row had non-finite gradients (last at step {step}); stopping "
                f"(stage.max_nonfinite_steps={self.max_in_a_row}). Lower the learning rate, check the data, or "
                f"resume from an earlier checkpoint.")
        return False

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_a_row, self.total = int(state.get("in_a_row", 0)), int(state.get("total", 0))


# ------------------------------------------------------------------------------------------------------------ FSDP
# Distinct input shapes each compiled unit keeps a graph of: aspect buckets (11 in configs/data/laion_buckets.yaml),
# the last partial batch of a finite dataset, validation. torch's default (8) would send the rest back to eager.
COMPILED_SHAPES = 32


def parallelize(network: nn.Module, mesh: DeviceMesh | None = None, mp_policy: MixedPrecisionPolicy | None = None,
                activation_checkpointing: bool = False, compile_units: bool = False,
                reshard_after_forward: bool = True, compile_backend: str = "inductor") -> list[Unit]:
    """Shard ``network`` over its own units (``network.fsdp_units()``), as torchtitan's ``parallelize``: activation
    checkpointing of every unit, then ``torch.compile`` of every unit's modules, then ``fully_shard`` of every unit
    (a unit of several modules shares one all-gather) and last of the root, which holds what no unit does.

    ``mesh=None`` skips the sharding: activation checkpointing and compile only, for one device or DDP. The units free
    their gathered parameters after their forward as ``reshard_after_forward`` says; the root's are needed again right
    at the start of the backward, so it keeps them. A forward without gradients (validation, previews, an EMA copy, a
    frozen encoder) has no backward to reshard in, so everything is resharded right after it: until then the module's
    parameters would be the gathered tensors, not the shards the optimizer, the EMA and the checkpoints pair them with.

    Compiled units keep one static graph per input shape (up to ``COMPILED_SHAPES``; ``compile_backend``: a
    ``torch.compile`` backend, ``aot_eager`` in the CPU tests). Activation checkpointing is the network's
    ``grad_checkpointing``: its forward recomputes exactly the units listed
    here. A network without it (BatchNorm or spectral norm in every unit, which must not run twice) is sharded
    without; one without ``fsdp_units`` is sharded as one unit, the root. Returns the units.
    """
    units = network.fsdp_units() if hasattr(network, "fsdp_units") else []
    if activation_checkpointing:
        if hasattr(network, "grad_checkpointing"):
            network.grad_checkpointing = True
        else:
            log.info("%s has no activation checkpointing; sharded without", type(network).__name__)
    if compile_units:
        # static shapes: one graph per bucket shape, each compiled at its first batch and never again, rather than
        # dynamo's switch to a dynamic-shape graph at the second shape
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_SHAPES)
        for unit in units:
            for module in unit:
                module.compile(dynamic=False, backend=compile_backend)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        policy = {} if mp_policy is None else {"mp_policy": mp_policy}
        for unit in units:
            fully_shard(unit[0] if len(unit) == 1 else list(unit), mesh=mesh,
                        reshard_after_forward=reshard_after_forward, **policy)
        fully_shard(network, mesh=mesh, reshard_after_forward=False, **policy)
        network.register_forward_hook(_reshard_without_backward)
        for name in getattr(network, "fsdp_forward_methods", ()):
            _as_forward(network, name)
    return units


def _as_forward(network: nn.Module, name: str) -> None:
    """Run ``network.<name>`` (an entry point besides ``forward``: Stage A's ``encode_unscaled``, ``decode``) as the
    sharded root's forward: the root's own parameters gathered before it (FSDP2's ``register_fsdp_forward_method``),
    and everything resharded after it without gradients, as after ``forward``."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    register_fsdp_forward_method(network, name)
    method = getattr(network, name)

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        output = method(*args, **kwargs)
        _reshard_without_backward(network, args, output)
        return output

    setattr(network, name, run)


def _reshard_without_backward(network: nn.Module, args: Any, output: Any) -> None:
    """After a forward without gradients: every sharded module of ``network`` back to its shards."""
    from torch.distributed.fsdp import FSDPModule

    if not torch.is_grad_enabled():
        for module in network.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


class FSDPStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as plain FSDP2: all ranks in one data-parallel group (no tensor
    parallelism), plus the options the stage modules apply in ``configure_model``.

    Args:
        param_dtype / reduce_dtype: FSDP2 ``MixedPrecisionPolicy``: parameters are gathered and computed in
            ``param_dtype``, gradients reduced in ``reduce_dtype``; the sharded fp32 parameters stay the optimizer's
            master weights. ``param_dtype: null`` computes in the parameters' own dtype (fp32 in the CPU tests).
        activation_checkpointing: recompute each unit's activations in the backward pass (the trained networks').
        compile_blocks: ``torch.compile`` each unit of the trained networks before sharding it.
        reshard_after_forward: free gathered parameters after each unit's forward (ZeRO-3); False keeps them until
            the backward (more memory, less communication).
        shard_frozen: also shard the frozen networks (Stage A in Stage B, the compressor in Stage C). By default they
            are replicated on every rank: they are small next to the trained network, run without gradients, and
            replicated they need no parameter all-gathers.
        save_distributed_checkpoint: checkpoints are folders of per-rank shards (torch distributed checkpoint), which
            resume on any number of ranks; ``scripts/consolidate_checkpoint.py`` turns one into a single file.
    """

    def __init__(self, param_dtype: str | None = "bfloat16", reduce_dtype: str | None = "float32",
                 activation_checkpointing: bool = False, compile_blocks: bool = False,
                 reshard_after_forward: bool = True, shard_frozen: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(**kwargs)
        self.param_dtype = getattr(torch, param_dtype) if param_dtype else None
        self.reduce_dtype = getattr(torch, reduce_dtype) if reduce_dtype else None
        self.activation_checkpointing = activation_checkpointing
        self.compile_blocks = compile_blocks
        self.reshard_after_forward = reshard_after_forward
        self.shard_frozen = shard_frozen

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes  # one FSDP group over every rank
        super().setup_environment()

    def shard(self, network: nn.Module, role: str = "trained") -> nn.Module:
        """:func:`parallelize` ``network`` over the data-parallel mesh with this strategy's options.

        ``role``: ``trained`` (activation checkpointing and compile apply), ``average`` (the EMA copy: sharded the
        same way, so each rank averages its own shards) or ``frozen`` (replicated unless ``shard_frozen``).
        """
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if role not in ("trained", "average", "frozen"):
            raise ValueError(f"role={role!r}")
        if role == "frozen" and not self.shard_frozen:
            return network
        name = type(network).__name__  # before fully_shard renames the class (FSDPStageC)
        mesh = self.device_mesh["data_parallel"]
        trained = role == "trained"
        units = parallelize(network, mesh, MixedPrecisionPolicy(param_dtype=self.param_dtype,
                                                                 reduce_dtype=self.reduce_dtype),
                            activation_checkpointing=trained and self.activation_checkpointing,
                            compile_units=trained and self.compile_blocks,
                            reshard_after_forward=self.reshard_after_forward)
        log.info("FSDP: %s (%s) sharded over %d ranks in %d units%s%s", name, role, mesh.size(), len(units),
                 ", activation checkpointing" if getattr(network, "grad_checkpointing", False) else "",
                 ", compiled units" if trained and self.compile_blocks else "")
        return network

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loader, except that a single-file checkpoint (a DDP or single-device run's, or one written with
        ``save_distributed_checkpoint=false``) is first brought to this module's layout by its ``adapt_checkpoint``
        (an older file's EMA entry, an EMA saved or kept on one side only). The other strategies do that in
        ``on_load_checkpoint``; this one restores the module from the file, strictly, before that hook runs. The file
        is read with ``weights_only=True`` whatever Lightning passes."""
        from lightning.fabric.strategies.model_parallel import _load_raw_module_state, _rekey_optimizer_state_if_needed
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        path = Path(self.broadcast(str(checkpoint_path)))
        module = self.lightning_module
        if not path.is_file() or not hasattr(module, "adapt_checkpoint"):
            return super().load_checkpoint(path, weights_only=weights_only)
        # tensors and plain containers only (checkpointing.py writes no other objects): a downloaded file runs no code
        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=True)
        module.adapt_checkpoint(checkpoint)
        strict = module.strict_loading
        _load_raw_module_state(checkpoint.pop("state_dict"), self.model, world_size=self.world_size, strict=strict)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            set_optimizer_state_dict(self.model, optimizer, options=options,
                                     optim_state_dict=_rekey_optimizer_state_if_needed(state, self.model))
        return checkpoint
