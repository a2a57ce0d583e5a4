"""Helpers for tests that train through the real entry points: ``wuerstchen.train.train`` in this process, or
scripts/train.py and friends as a subprocess where the process itself is under test."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from wuerstchen.train import TrainResult

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64  # side of the synthetic training images
# the demo's Stage B keeps its pretrained compressor frozen; tests of the recipe's joint fine-tuning turn it back on
JOINT_COMPRESSOR = ("stage.freeze_effnet=false", "stage.lr_scales={effnet: 0.05}")


def run(script: str, *overrides: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python scripts/<script> overrides...`` from the repository root; asserts success unless ``check=False``."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *overrides], capture_output=True,
                            text=True, timeout=timeout, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def train_here(*overrides: str) -> tuple[TrainResult, str]:
    """``train(compose(overrides))`` in this process, as ``python scripts/train.py overrides...`` runs it, and the
    INFO-and-up log lines it wrote. Single-process runs only: Lightning's DDP launcher re-runs this process's command
    line (pytest) for the other ranks, so DDP and FSDP tests run scripts/train.py with :func:`run`."""
    from wuerstchen.train import compose, train

    records, root = _Records(), logging.getLogger()
    level = root.level
    root.addHandler(records)
    root.setLevel(logging.INFO)
    try:
        result = train(compose(overrides))
    finally:
        root.removeHandler(records)
        root.setLevel(level)
    return result, "\n".join(records.lines)


def output(result: subprocess.CompletedProcess) -> str:
    """Everything a run printed (Hydra's log goes to stdout, Lightning's to stderr)."""
    return result.stdout + result.stderr


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    """Every row of every CSV log of a run (a resumed run adds a version), in order."""
    rows = []
    for metrics in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(metrics) as f:
            rows += list(csv.DictReader(f))
    return rows


def losses(run_dir: Path, key: str = "train/loss") -> list[float]:
    return [float(r[key]) for r in metric_rows(run_dir) if r.get(key)]


def losses_by_step(run_dir: Path, key: str = "train/loss") -> dict[int, str]:
    """step -> the logged value as written (exact comparison); a step logged twice is an error."""
    found: dict[int, str] = {}
    for row in metric_rows(run_dir):
        if row.get(key):
            step = int(row["step"])
            assert step not in found, f"step {step} logged twice in {run_dir}"
            found[step] = row[key]
    return found


def stage_c_inputs(stage_b_ckpt: Path, shards: Path, size: int, batch_size: int):
    """(batch, compressor latents, text states) for the first centre-cropped batch of ``shards`` through the frozen
    compressor and text encoder a Stage B checkpoint holds (what Stage C sees online; demo views at 1.5x)."""
    from wuerstchen.data import ImageTransform, WebImageTextDataset, to_model_inputs
    from wuerstchen.models.text_encoder import TextEncoder
    from wuerstchen.weights import checkpoint_info, load_network

    effnet, _ = load_network("effnet", stage_b_ckpt)
    encoder = TextEncoder(**checkpoint_info(stage_b_ckpt)["text_encoders"]["text_encoder"])
    dataset = WebImageTextDataset(str(shards), batch_size=batch_size, resample=False, shuffle_buffer=0,
                                  transform=ImageTransform(size, outputs=("effnet_images",), random_crop=False,
                                                           effnet_scale=1.5))
    batch = to_model_inputs(next(iter(dataset)))
    with torch.no_grad():
        return batch, effnet.eval()(batch["effnet_images"]), encoder(batch["captions"]), encoder([""])


def common(shards: Path, run_dir: Path, steps: int, every: int = 20) -> list[str]:
    """Overrides for a short CPU run on the synthetic shards, logging every step."""
    return [f"run_dir={run_dir}", f"data.urls={shards / 'train'}", f"data.val_urls={shards / 'val'}",
            f"data.image_size={SIZE}", "data.num_workers=0", "data.batches_per_epoch=20", "data.val_batches=1",
            f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1", f"callbacks.checkpoint.every_n_steps={every}",
            f"callbacks.preview.every_n_steps={every}", "callbacks.preview.num_images=2",
            "callbacks.progress.refresh_rate=0"]


# tiny layouts of the released architectures, for parity and format tests
TINY_C = dict(c_in=16, c=32, c_cond=24, c_r=8, depth=2, nhead=4)
TINY_B = dict(c_hidden=[16, 32], nhead=[-1, 4], blocks=[1, 2], level_config=["CT", "CTA"],
              inject_effnet=[False, True], effnet_embd=16, clip_embd=20, c_cond=24, c_r=8)


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random parameters everywhere: zero-initialised layers would hide wiring errors."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return module.eval()


def tame_prior_output(module: torch.nn.Module) -> None:
    """Keep |1 - B| away from 0: the A/B parameterisation divides by it and would amplify rounding into noise."""
    with torch.no_grad():
        module.out[1].weight.mul_(0.1)
        module.out[1].bias.zero_()


def to_legacy(checkpoint: dict) -> dict:
    """The same checkpoint in the older single-file layout: the EMA under ``ema[<attribute>]``, outside state_dict."""
    from wuerstchen.weights import checkpoint as schema

    legacy = dict(checkpoint)
    state = dict(checkpoint[schema.STATE_DICT])
    prefix = schema.EMA_NETWORK + "."
    ema = {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)}
    legacy[schema.STATE_DICT] = state
    legacy[schema.LEGACY_EMA] = {legacy.pop(schema.EMA_OF): ema}
    return legacy


def write_shapes(root: Path, size: int, train: int, val: int, shard_size: int) -> Path:
    """The synthetic shapes at ``size``: ``train`` training samples (seed 0) and ``val`` held-out ones (seed 1)."""
    from wuerstchen.data.synthetic import write_synthetic_shards

    write_synthetic_shards(root / "train", train, size, seed=0, shard_size=shard_size)
    write_synthetic_shards(root / "val", val, size, seed=1, shard_size=val)
    return root
