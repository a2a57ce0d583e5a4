"""Read a few batches from a stage's data module and report what came out.

    python scripts/check_data.py                                  # the synthetic demo data
    python scripts/check_data.py data=laion data.urls='/datasets/laion/{00000..00099}.tar' num_batches=50

Prints batch shapes, samples/s, accepted and rejected counts by reason, and writes a preview grid and its captions to
``run_dir``. Use it before a long run to see that the shards, the filter and the transforms do what you expect.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torchvision.utils import save_image

from wuerstchen.data import ERROR_PREFIX
from wuerstchen.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def preview(batch: dict, out: Path) -> None:
    """Save the first batch's images (or compressor views, un-normalised) and captions."""
    if "images" in batch:
        images = batch["images"]
    else:
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        images = batch["effnet_images"] * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + mean
    save_image(images.clamp(0, 1), out / "batch.png", nrow=8)
    (out / "batch.txt").write_text("\n".join(batch["captions"]) + "\n")


@hydra.main(version_base="1.3", config_path="../configs", config_name="check_data")
def main(cfg: DictConfig) -> None:
    out = Path(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    print(f"shards: {len(datamodule.train_set.urls)} from {cfg.data.urls}")
    shapes: Counter[str] = Counter()
    num_samples = 0
    start = time.perf_counter()
    for index, batch in enumerate(datamodule.train_dataloader()):
        if index == 0:
            start = time.perf_counter()  # exclude worker start-up
        batch = datamodule.on_after_batch_transfer(datamodule.on_before_batch_transfer(batch, 0), 0)
        if index == 0:
            preview(batch, out)
        num_samples += len(batch["captions"])
        shapes[", ".join(f"{k} {tuple(v.shape[1:])}" for k, v in batch.items() if torch.is_tensor(v))] += 1
        if index + 1 == cfg.num_batches:
            break
    elapsed = time.perf_counter() - start
    print(f"read {index + 1} batches, {num_samples} samples, {num_samples / max(elapsed, 1e-9):.1f} samples/s "
          f"after the first batch ({datamodule.num_workers} workers)")
    for shape, count in shapes.most_common():
        print(f"  {count:4d} x {shape}")
    stats = datamodule.data_stats
    rejects = {k: v for k, v in sorted(stats.items()) if k != "accepted" and not k.startswith(ERROR_PREFIX)}
    errors = {k[len(ERROR_PREFIX):]: v for k, v in sorted(stats.items()) if k.startswith(ERROR_PREFIX)}
    print(f"accepted {stats['accepted']}, rejected {sum(rejects.values())}: {rejects or 'nothing'}"
          + (f"; exceptions behind them: {errors}" if errors else ""))
    print(f"preview: {out / 'batch.png'} (captions in {out / 'batch.txt'})")


if __name__ == "__main__":
    main()
