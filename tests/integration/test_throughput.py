"""The throughput callback: FLOPs per step counted once per batch shape, against the closed form of a linear layer."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from wuerstchen.training.callbacks import Throughput, peak_tflops

IN, OUT = 64, 32


class Linear(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(IN, OUT, bias=False)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.layer(batch["x"]).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def batches(sizes: list[int]) -> list[dict]:
    return [{"x": torch.randn(n, IN), "captions": [""] * n} for n in sizes]


def test_flops_per_sample_and_mfu(tmp_path: Path) -> None:
    callback = Throughput(peak_tflops=1.0)
    sizes = [8] * 6 + [4] * 6  # two batch shapes: each counted once
    trainer = L.Trainer(accelerator="cpu", max_steps=len(sizes), logger=CSVLogger(tmp_path, name="", version=0),
                        callbacks=[callback], log_every_n_steps=2, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(Linear(), train_dataloaders=torch.utils.data.DataLoader(batches(sizes), batch_size=None))
    # forward x @ W^T: 2 * IN * OUT per sample; backward: the weight gradient only (x needs none), 2 * IN * OUT more
    per_sample = {shape: flops for shape, flops in callback._flops_per_sample.items()}
    assert sorted(per_sample.values()) == [4 * IN * OUT, 4 * IN * OUT] and len(per_sample) == 2
    with open(tmp_path / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/tflops_per_s")]
    assert rows, "no tflops logged"
    for row in rows:  # MFU is the achieved rate over the given peak (1 TFLOP/s)
        assert float(row["train/mfu"]) == pytest.approx(float(row["train/tflops_per_s"]), rel=1e-6)


def test_no_peak_on_cpu() -> None:
    assert peak_tflops(torch.device("cpu")) is None
