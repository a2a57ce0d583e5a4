"""What every stage's LightningModule shares: optimizer wiring, EMA, frozen parts, checkpoint extras, logging."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..data.buckets import BASE_MULTIPLE
from ..weights import load_network, read_weights
from ..weights.formats import shape_mismatches
from .checkpointing import rng_states, set_rng_states
from .distributed import FSDPStrategy, NonFiniteSteps
from .ema import EMA
from .optim import OptimizerFactory, SchedulerFactory, build_optimizer


def load_frozen(stage: str, path: str | None, what: str) -> nn.Module:
    """A frozen network from a checkpoint path, or a clear error naming the config key that should give it."""
    if not path:
        raise ValueError(f"{what} is required: set {what}=PATH (a checkpoint of ours, a released .pt, a diffusers "
                         f"folder or a safetensors export)")
    network, _ = load_network(stage, path)
    return network.eval().requires_grad_(False)


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


def drop_captions(captions: Sequence[str], prob: float, rng: random.Random | None = None) -> list[str]:
    """Replace each caption by the empty one with probability ``prob`` (classifier-free guidance training)."""
    draw = rng.random if rng is not None else random.random
    return ["" if prob > 0 and draw() < prob else c for c in captions]


class StageModule(L.LightningModule):
    """Base of the three stage modules.

    Subclasses set ``trained`` (attribute names of the networks being trained, the first one also EMA'd) and
    ``frozen_modules`` (registered submodules that stay in eval mode and out of the optimizer), and implement
    ``training_step``.
    """

    trained: tuple[str, ...] = ()
    frozen_modules: tuple[str, ...] = ()
    weights_stage: str = ""  # the trained network's stage in wuerstchen.weights ("a", "b", "c")
    # Image side multiple the stage's networks need; the data's buckets snap to it (data.multiple: null, at least 32).
    # Stage C and the compressor see images only through views snapped to 32 on their own (data.compressor_size).
    pixel_multiple: int = BASE_MULTIPLE

    def __init__(self, optimizer: OptimizerFactory, scheduler: SchedulerFactory | None = None,
                 ema: dict[str, Any] | None = None, grad_clip: float | None = 1.0,
                 lr_scales: dict[str, float] | None = None, max_nonfinite_steps: int = 10) -> None:
        super().__init__()
        self.nonfinite = NonFiniteSteps(max_nonfinite_steps)
        unknown = set(lr_scales or {}) - set(self.trained)
        if unknown:
            raise ValueError(f"stage.lr_scales names {sorted(unknown)}; trained networks are {list(self.trained)}")
        self.lr_scales = dict(lr_scales or {})
        self.grad_clip = grad_clip
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.ema_config = ema
        self.ema: EMA | None = None

    # -- networks ---------------------------------------------------------------------------------------------------
    @property
    def network(self) -> nn.Module:
        """The main trained network (the one EMA follows)."""
        return getattr(self, self.trained[0])

    def init_from(self, path: str) -> None:
        """Start the trained network from weights in any supported format; the architectures must agree."""
        state, config = read_weights(path, self.weights_stage)
        ours = getattr(self.network, "config", {})
        conflicts = {k: (ours[k], v) for k, v in (config or {}).items()
                     if k in ours and ours[k] != v and k != "dropout"}
        if conflicts:
            raise ValueError(f"init_from={path}: the weights' config disagrees with the model config: "
                             + ", ".join(f"{k}: model {a!r} vs weights {b!r}" for k, (a, b) in conflicts.items()))
        missing, unexpected, wrong = shape_mismatches(self.network, state)
        if missing or unexpected or wrong:
            raise ValueError(f"init_from={path} does not fit the model: missing {missing[:8]}, unexpected "
                             f"{unexpected[:8]}, wrong shape {wrong[:8]}")
        self.network.load_state_dict(state, strict=True)

    def setup_ema(self) -> None:
        if self.ema_config is not None and self.ema is None:
            self.ema = EMA(self.network, **self.ema_config)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        for name in self.trained:
            yield from getattr(self, name).parameters()

    def train(self, mode: bool = True) -> "StageModule":
        super().train(mode)
        for name in self.frozen_modules:
            getattr(self, name).eval()  # frozen BatchNorm statistics and no dropout, whatever the trainer asks
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
        self.setup_ema()
        if self.ema is not None:
            self.ema.to(self.device)

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
        """Clip by the stage's ``grad_clip`` (one place for automatic and manual optimisation alike)."""
        if self.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # all ranks agree: a non-finite gradient anywhere drops every gradient, so this step changes no weight
        self.nonfinite.check(optimizer, self.global_step, self.device)
        self.log("train/skipped_steps", float(self.nonfinite.total), on_step=True, on_epoch=False)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            if isinstance(norm, DTensor):  # sharded gradients: the norm over all shards
                norm = norm.full_tensor()
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["network_configs"] = {name: module.config for name, module in self.named_children()
                                         if hasattr(module, "config") and name != "ema_network"}
        if self.ema is not None and not self.sharded:
            checkpoint["ema"] = {self.trained[0]: self.ema.state_dict()}
        elif self.ema is not None:  # sharded: the EMA is the registered `ema_network`, saved with the shards
            checkpoint["ema_of"] = self.trained[0]
        checkpoint["nonfinite_steps"] = self.nonfinite.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite.load_state_dict(checkpoint.get("nonfinite_steps", {}))
        ema_state = (checkpoint.get("ema") or {}).get(self.trained[0])
        if ema_state is not None:
            self.setup_ema()
            self.ema.load_state_dict(ema_state)

    @contextmanager
    def averaged(self) -> Iterator[nn.Module]:
        """Within it, the trained network's attribute names the EMA network (no weights are copied; sharded or not);
        yields the network in use. Without EMA, the network itself."""
        if self.ema is None:
            yield self.network
            return
        name, network = self.trained[0], self.network
        setattr(self, name, self.ema.module)
        try:
            yield self.ema.module
        finally:
            setattr(self, name, network)

    # -- sharding ---------------------------------------------------------------------------------------------------
    @property
    def sharded(self) -> bool:
        return "ema_network" in self._modules or getattr(self, "_sharded", False)

    def configure_model(self) -> None:
        """Under ``trainer=fsdp``: fully_shard the trained networks block by block (and the EMA copy, registered as
        ``ema_network`` so it is sharded, saved and restored with them); frozen networks are replicated unless the
        strategy's ``shard_frozen``. Other strategies: nothing to do."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, FSDPStrategy) or getattr(self, "_sharded", False):
            return
        self._sharded = True
        if self.ema_config is not None:
            self.setup_ema()  # a copy of the unsharded network, sharded below exactly like it
            self.ema_network = self.ema.module
        for name in self.trained:
            strategy.shard(getattr(self, name), role="trained")
        if self.ema is not None:
            strategy.shard(self.ema_network, role="average")
        for name in self.frozen_modules:
            strategy.shard(getattr(self, name), role="frozen")
