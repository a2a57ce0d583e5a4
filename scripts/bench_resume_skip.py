"""Resuming mid-epoch: the time to skip N batches from plans alone vs by decoding and dropping them.

    python scripts/bench_resume_skip.py [--batches 25 100] [--batch-size 16] [--image-size 256] [--samples 256]

Writes synthetic JPEG shards whose images are 512-1024 px on each side (random aspect: LAION's originals are larger
than the crop), then times one worker (the main process) from the start of a pass to its first batch after N skipped
ones, twice: with ``skip_batches=N`` (each skipped sample is planned from its header and dropped undecoded) and, as a
resume did before, by producing the first N batches (decode, crop, resample) and dropping them. The stream is the
multi-aspect training one: random buckets, random crops, Stage B's two outputs. Prints one table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from wuerstchen.data import ImageTransform, LaionFilter, WebImageTextDataset

META = {"aesthetic": 6.0, "punsafe": 0.01, "pwatermark": 0.1}


def photo(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A smooth random image with mild noise, as JPEG quality 90 (noise alone would decode unrealistically slowly)."""
    coarse = Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)).resize((width, height),
                                                                                           Image.Resampling.BICUBIC)
    noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, size=(height, width, 3), dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_shards(root: Path, num_samples: int, per_shard: int = 64, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for start in range(0, num_samples, per_shard):
        with tarfile.open(root / f"{start // per_shard:05d}.tar", "w") as tar:
            for index in range(start, min(start + per_shard, num_samples)):
                width, height = (int(side) for side in rng.integers(512, 1025, size=2))
                meta = dict(META, original_width=width, original_height=height)
                files = {"jpg": photo(rng, width, height), "txt": f"sample {index}".encode(),
                         "json": json.dumps(meta).encode()}
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{index:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def seconds_to_first_batch(urls: str, image_size: int, batch_size: int, skip: int, plan_only: bool) -> float:
    transform = ImageTransform.multi_aspect(image_size, random_ratio_prob=0.05)
    dataset = WebImageTextDataset(urls, batch_size=batch_size, transform=transform, filter=LaionFilter(),
                                  shuffle_buffer=64, seed=0)
    dataset.skip_batches = skip if plan_only else 0
    start = time.perf_counter()
    batches = iter(dataset)
    for _ in range(0 if plan_only else skip):  # the resume before plans: make each batch, then drop it
        next(batches)
    next(batches)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[25, 100], help="batches skipped per row")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--samples", type=int, default=256, help="distinct images written (the stream resamples)")
    args = parser.parse_args()

    print("| skipped batches | samples | decode and drop (s) | plans only (s) | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp), args.samples)
        seconds_to_first_batch(tmp, args.image_size, args.batch_size, 1, plan_only=True)  # warm the page cache
        for skip in args.batches:
            decoded = seconds_to_first_batch(tmp, args.image_size, args.batch_size, skip, plan_only=False)
            planned = seconds_to_first_batch(tmp, args.image_size, args.batch_size, skip, plan_only=True)
            print(f"| {skip} | {skip * args.batch_size} | {decoded:.2f} | {planned:.2f} | {decoded / planned:.1f}x |",
                  flush=True)
    print(f"\nmachine: {os.cpu_count()} CPUs; one process; times include the first batch after the skip, decoded in "
          f"both")


if __name__ == "__main__":
    main()
