"""What every stage's LightningModule shares: optimizer wiring, EMA, frozen parts, checkpoint extras, logging."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from ..data.buckets import BASE_MULTIPLE
from ..weights import checkpoint as schema
from ..weights.loaders import InitialWeights
from .checkpointing import rng_states, set_rng_states
from .distributed import FSDPStrategy, NonFiniteSteps, StepHealth, clip_by_norm, step_health
from .ema import EMA
from .optim import OptimizerFactory, SchedulerFactory, build_optimizer


class Frozen:
    """Networks a stage uses but never trains or saves (the text encoder): kept out of ``nn.Module`` registration,
    so optimizers, sharding and checkpoints skip them; moved to the device with the module."""

    def __init__(self, **modules: nn.Module | None) -> None:
        self.modules = {name: m.eval().requires_grad_(False) for name, m in modules.items() if m is not None}

    def __getattr__(self, name: str) -> nn.Module:
        try:
            return self.__dict__["modules"][name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: torch.device) -> None:
        for module in self.modules.values():
            module.to(device)


class StageModule(L.LightningModule):
    """Base of the three stage modules.

    Subclasses set ``trained`` (attribute names of the networks being trained, the first one also EMA'd) and
    ``frozen_modules`` (registered submodules that stay in eval mode and out of the optimizer), and implement
    ``training_step``.
    """

    trained: tuple[str, ...] = ()
    frozen_modules: tuple[str, ...] = ()
    # Image side multiple the stage's networks need; the data's buckets snap to it (data.multiple: null, at least 32).
    # Stage C and the compressor see images only through views snapped to 32 on their own (models.compressor.view_size).
    pixel_multiple: int = BASE_MULTIPLE

    def __init__(self, optimizer: OptimizerFactory, scheduler: SchedulerFactory | None = None,
                 ema: dict[str, Any] | None = None, grad_clip: float | None = 1.0,
                 lr_scales: dict[str, float] | None = None, max_nonfinite_steps: int = 10,
                 init: Mapping[str, InitialWeights | None] | None = None, channels_last: bool = False) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.nonfinite = NonFiniteSteps(max_nonfinite_steps)
        unknown = set(lr_scales or {}) - set(self.trained)
        if unknown:
            raise ValueError(f"stage.lr_scales names {sorted(unknown)}; trained networks are {list(self.trained)}")
        self.lr_scales = dict(lr_scales or {})
        self.initial_weights = {name: source for name, source in (init or {}).items() if source}
        unknown = set(self.initial_weights) - set(self.trained) - set(self.frozen_modules)
        if unknown:
            raise ValueError(f"stage.init names {sorted(unknown)}; the stage's networks are "
                             f"{[*self.trained, *self.frozen_modules]}")
        self.grad_clip = grad_clip
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.ema_config = ema
        self.ema: EMA | None = None
        # host booleans the ranks agree on in the step's one all-reduce (Preemption registers its signal flag);
        # after each optimizer step `agreed_flags` holds the agreed values and the step they belong to
        self.step_flags: dict[str, Callable[[], bool]] = {}
        self.agreed_flags: dict[str, Any] = {}
        self._health: tuple[int, StepHealth] | None = None

    # -- networks ---------------------------------------------------------------------------------------------------
    @property
    def network(self) -> nn.Module:
        """The main trained network (the one EMA follows)."""
        return getattr(self, self.trained[0])

    def load_initial_weights(self) -> None:
        """Start the trained networks from the weights ``stage.init`` names (a fresh run: a resumed one restores its
        own); networks without a source keep their initialisation."""
        for name, source in self.initial_weights.items():
            source.load_into(getattr(self, name))

    def setup_ema(self) -> None:
        """Create the EMA of the main trained network (``stage.ema``; a copy of it as it is now) and register it as
        ``ema_network``: it is saved in ``state_dict``, restored, moved and (under FSDP) sharded like the networks.
        Its parameters take no gradient, so the optimizer, DDP's gradient sync and gradient clipping skip it.

        ``configure_model`` calls it under every strategy, after the initial weights are loaded and before a
        checkpoint restores the EMA; the checkpoint hooks call it too, for modules used without a trainer.
        """
        if self.ema_config is not None and self.ema is None:
            self.ema = EMA(self.network, **self.ema_config)
            self.ema_network = self.ema.module

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        for name in self.trained:
            yield from getattr(self, name).parameters()

    def train(self, mode: bool = True) -> "StageModule":
        super().train(mode)
        for name in self.frozen_modules:
            getattr(self, name).eval()  # frozen BatchNorm statistics and no dropout, whatever the trainer asks
        if self.ema is not None:
            self.ema.module.eval()  # the average is only ever evaluated (previews, validation): no dropout
        return self

    def configure_optimizers(self) -> dict:
        if not self.lr_scales:
            return build_optimizer(self.trainable_parameters(), self.optimizer_factory, self.scheduler_factory)
        groups = [{"params": list(getattr(self, name).parameters()), "lr_scale": float(self.lr_scales.get(name, 1.0))}
                  for name in self.trained]
        return build_optimizer(groups, self.optimizer_factory, self.scheduler_factory)

    # -- hooks ------------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # every rank draws its own noise, timesteps and dropout: seed + rank (the networks were built before, from
        # the common seed, so their initial weights agree). Runs before a checkpoint's RNG states are restored.
        if self.trainer is not None and self.trainer.world_size > 1:
            L.seed_everything(torch.initial_seed() + self.global_rank, workers=True, verbose=False)

    def on_fit_start(self) -> None:
        self.setup_ema()  # registered as `ema_network`: it moves with the module

    # Validation draws its noise and timesteps from a generator of its own, fixed per rank: every pass scores the
    # same draws (comparable metrics), and training's random stream is the same whether or not a pass ran, which a
    # bitwise resume needs (a run resumed from a checkpoint at an epoch's last batch skips that epoch's validation).
    VALIDATION_SEED = 20230600

    def on_validation_start(self) -> None:
        self._training_rng = rng_states()
        seed = self.VALIDATION_SEED + self.global_rank
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def on_validation_end(self) -> None:
        if getattr(self, "_training_rng", None) is not None:
            set_rng_states(self._training_rng)
            self._training_rng = None

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema(self.global_step)  # Lightning increments global_step after this hook

    def update_ema(self, step: int) -> None:
        """Fold the weights just stepped into the EMA (``step``: 0-based index of that optimizer step).

        Right after the optimizer step and before any ``on_train_batch_end`` callback, so a checkpoint written at
        this step already holds this step's average (callbacks run before the module's own batch-end hook).
        """
        if self.ema is not None:
            self.ema.update(self.network, step)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip by the stage's ``grad_clip`` (one place for automatic and manual optimisation alike). Automatic
        optimisation clips with the norm :meth:`on_before_optimizer_step` just computed (the same coefficient as
        ``clip_grad_norm_``, without a second pass over the gradients)."""
        if not self.grad_clip:
            return
        health = self._health
        if self.automatic_optimization and health is not None and health[0] == self.global_step:
            clip_by_norm((p.grad for group in optimizer.param_groups for p in group["params"]), self.grad_clip,
                         health[1].norm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The step's one host synchronisation: the gradients' norm and finiteness and the callbacks' ``step_flags``
        (the preemption signal), agreed by all ranks in one all-reduce (:func:`~.distributed.step_health`). A
        non-finite gradient anywhere drops every gradient, so this step changes no weight; the norm is logged and
        clipped with."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        names = sorted(self.step_flags)
        health = step_health(grads, self.device, [self.step_flags[name]() for name in names])
        self._health = (self.global_step, health)
        self.agreed_flags = {"step": self.global_step, **dict(zip(names, health.flags))}
        self.nonfinite.record(health.finite, optimizer, self.global_step)
        self.log("train/skipped_steps", float(self.nonfinite.total), on_step=True, on_epoch=False)
        if health.finite and any(g is not None for g in grads):
            self.log("train/grad_norm", health.norm, on_step=True, on_epoch=False)
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        schema.write_stage(checkpoint, dict(self.named_children()), self._ema_of, self.nonfinite.state_dict())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite.load_state_dict(schema.nonfinite_steps(checkpoint))
        self.setup_ema()  # before the state dict (with `ema_network.*`) loads; configure_model has, under a trainer
        self.adapt_checkpoint(checkpoint)

    def adapt_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Bring a checkpoint about to be restored into this module to its layout, in place
        (:func:`~wuerstchen.weights.checkpoint.prepare_resume`); ``FSDPStrategy`` calls it on a single file before
        its strict load."""
        schema.prepare_resume(checkpoint, self._ema_of)

    @property
    def _ema_of(self) -> str | None:
        """The attribute of the network the EMA averages, or None without EMA."""
        return self.trained[0] if self.ema is not None else None

    @contextmanager
    def averaged(self) -> Iterator[nn.Module]:
        """Within it, the trained network's attribute names the EMA network (no weights are copied; sharded or not);
        yields the network in use. Without EMA, the network itself."""
        if self.ema is None:
            yield self.network
            return
        name, network = self.trained[0], self.network
        setattr(self, name, self.ema_network)
        try:
            yield self.ema_network
        finally:
            setattr(self, name, network)

    def to_channels_last(self, strategy: Any = None) -> None:
        """``stage.channels_last``: the registered networks' 4-D weights (and so their convolutions' outputs) in NHWC
        memory order, which cuDNN's tensor-core convolutions prefer (``make gpu-report`` measures Stage B both ways).
        The math is the same; checkpoints load into either order. FSDP2 gathers its shards into contiguous
        parameters, so it is refused there rather than silently ignored."""
        if isinstance(strategy, FSDPStrategy):
            raise ValueError("stage.channels_last=true is for one device or trainer=ddp: trainer=fsdp gathers "
                             "contiguous parameters")
        for name in (*self.trained, *self.frozen_modules):
            getattr(self, name).to(memory_format=torch.channels_last)

    # -- sharding ---------------------------------------------------------------------------------------------------
    @property
    def sharded(self) -> bool:
        return getattr(self, "_sharded", False)

    def configure_model(self) -> None:
        """Create the EMA copy (every strategy: :meth:`setup_ema`). Under ``trainer=fsdp`` then fully_shard the
        trained networks over their ``fsdp_units()`` and the EMA copy exactly like its network; frozen networks are replicated
        unless the strategy's ``shard_frozen``."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if self.channels_last:
            self.to_channels_last(strategy)
        self.setup_ema()  # a copy of the unsharded network, before the checkpoint (if any) is restored into it
        if not isinstance(strategy, FSDPStrategy) or self.sharded:
            return
        self._sharded = True
        for name in self.trained:
            strategy.shard(getattr(self, name), role="trained")
        if self.ema is not None:
            strategy.shard(self.ema_network, role="average")
        for name in self.frozen_modules:
            strategy.shard(getattr(self, name), role="frozen")
