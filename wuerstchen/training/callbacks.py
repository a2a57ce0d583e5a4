"""Callbacks: image previews (PNG grids in the run directory and wandb) and training throughput."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image


class ImagePreview(L.Callback):
    """Every ``every_n_steps`` optimizer steps, render ``pl_module.preview(batch)`` for a fixed batch.

    The module returns named image batches in [0, 1] (e.g. inputs, raw and EMA outputs); each becomes a grid saved as
    ``<dirpath>/step_<N>_<name>.png`` and, with a wandb logger, an image in the run. The batch is the first training
    batch, kept so successive previews are comparable.
    """

    def __init__(self, dirpath: str, every_n_steps: int = 1000, num_images: int = 8) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self._batch: dict[str, Any] | None = None
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._batch is None:
            self._batch = {k: v[: self.num_images] for k, v in batch.items() if k != "meta"}
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps or not hasattr(pl_module, "preview"):
            return
        self._last_step = step
        self.render(trainer, pl_module, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._batch is not None and trainer.global_step != self._last_step and hasattr(pl_module, "preview"):
            self.render(trainer, pl_module, trainer.global_step)

    def render(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            images = pl_module.preview(self._batch)  # every rank runs it: modules may hold sharded weights
        pl_module.train(was_training)
        self._save(trainer, images, step)

    @rank_zero_only
    def _save(self, trainer: L.Trainer, images: dict[str, torch.Tensor], step: int) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        for name, batch in images.items():
            grid = make_grid(batch.float().clamp(0, 1).cpu(), nrow=min(len(batch), 8))
            save_image(grid, self.dirpath / f"step_{step:07d}_{name}.png")
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=f"preview/{name}", images=[grid], step=step)


class Throughput(L.Callback):
    """Logs ``train/samples_per_s`` (this rank's samples over wall time between logged steps, times world size)."""

    def __init__(self) -> None:
        self._start: float | None = None
        self._samples = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._samples += len(batch["captions"]) if "captions" in batch else len(next(iter(batch.values())))
        if trainer.global_step % trainer.log_every_n_steps or self._start is None:
            return
        elapsed = time.perf_counter() - self._start
        if elapsed > 0:
            rate = self._samples * trainer.world_size / elapsed
            pl_module.log("train/samples_per_s", rate, on_step=True, on_epoch=False)
        self._start, self._samples = time.perf_counter(), 0
