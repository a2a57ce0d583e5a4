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


# Dense bf16 tensor-core peak per GPU in TFLOP/s (vendor datasheets), matched in this order against the device name:
# the PCIe and NVL H100s before the SXM part (`torch.cuda.get_device_name` says "NVIDIA H100 80GB HBM3" for SXM).
PEAK_BF16_TFLOPS = {"B200": 2250.0, "H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0,
                    "A100": 312.0, "L40S": 362.0, "A6000": 155.0, "A10": 125.0, "V100": 125.0}


def peak_tflops(device: torch.device) -> float | None:
    """The bf16 peak of a CUDA device from ``PEAK_BF16_TFLOPS``, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def batch_signature(batch: dict[str, Any]) -> str:
    """The tensor shapes of a batch: one FLOP count per signature (aspect buckets change it)."""
    return repr(tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()) if torch.is_tensor(v)))


def flop_counter() -> Any:
    """``FlopCounterMode`` that also counts CPU attention: torch has formulas for the CUDA SDPA kernels and the math
    path (as on the meta device), none for the CPU flash kernel, whose FLOPs would silently be left out."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:  # shapes, as the mode passes
        return sdpa_flop_count(query, key, value)

    def backward(grad_out: Any, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={aten._scaled_dot_product_flash_attention_for_cpu: forward,
                                                          aten._scaled_dot_product_flash_attention_for_cpu_backward:
                                                          backward})


class Throughput(L.Callback):
    """Logs ``train/samples_per_s`` (this rank's samples over the wall time between logged steps, times the world size)
    and, with FLOP counting on, ``train/tflops_per_s`` (per device) and ``train/mfu``.

    FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (:func:`flop_counter`) over the first training
    step of each new batch shape: the whole step (frozen encoders' forward, the trained networks' forward and backward),
    so MFU is the device's useful arithmetic against ``peak_tflops`` (default: the bf16 datasheet peak of the GPU, see
    ``PEAK_BF16_TFLOPS``; on CPU give it, or MFU is not logged). The counted step runs slower and is left out of the
    rates. Counting sees eager ops only: leave ``count_flops`` off with ``torch.compile``. Counting can route an op to
    another kernel (attention), so the counts are checkpointed: a resumed run counts exactly the steps an uninterrupted
    one does, and stays bitwise equal to it.
    """

    def __init__(self, count_flops: bool = True, peak_tflops: float | None = None) -> None:
        self.count_flops = count_flops
        self.peak = peak_tflops
        self._start: float | None = None
        self._samples = 0
        self._flops = 0.0
        self._flops_per_sample: dict[str, float] = {}
        self._counter: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {"flops_per_sample": dict(self._flops_per_sample)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._flops_per_sample = dict(state_dict.get("flops_per_sample", {}))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak is None:
            self.peak = peak_tflops(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.count_flops and batch_signature(batch) not in self._flops_per_sample:
            self._counter = flop_counter()
            self._counter.__enter__()
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        samples = len(batch["captions"]) if "captions" in batch else len(next(iter(batch.values())))
        if self._counter is not None:  # the counted step: record its FLOPs, restart the rate window after it
            self._counter.__exit__(None, None, None)
            self._flops_per_sample[batch_signature(batch)] = self._counter.get_total_flops() / samples
            self._counter = None
            self._start, self._samples, self._flops = time.perf_counter(), 0, 0.0
            return
        self._samples += samples
        self._flops += self._flops_per_sample.get(batch_signature(batch), 0.0) * samples
        if trainer.global_step % trainer.log_every_n_steps or self._start is None:
            return
        elapsed = time.perf_counter() - self._start
        if elapsed > 0 and self._samples:
            pl_module.log("train/samples_per_s", self._samples * trainer.world_size / elapsed, on_step=True,
                          on_epoch=False)
            if self._flops:
                tflops = self._flops / elapsed / 1e12
                pl_module.log("train/tflops_per_s", tflops, on_step=True, on_epoch=False)
                if self.peak:
                    pl_module.log("train/mfu", tflops / self.peak, on_step=True, on_epoch=False)
        self._start, self._samples, self._flops = time.perf_counter(), 0, 0.0
