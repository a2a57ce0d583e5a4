"""Data pipeline throughput: samples/s of one worker process for read + filter + decode + transform + collate.

    python scripts/bench_data.py [--sizes 256 512 1024] [--samples 200] [--workers 1 2] [--json out.json]

Writes synthetic JPEG shards stored at each size (as img2dataset stores them at its resize size), then streams them
through :class:`~wuerstchen.data.WebImageTextDataset` for each stage's outputs: Stage A (the crop), Stage B (the crop
and the 0.75x compressor view) and Stage C (the compressor view alone, which lets the JPEG decoder downscale).
Prints one table; the per-worker rate times the worker count bounds what one GPU's loader can deliver.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

from wuerstchen.data import ImageTransform, LaionFilter, WebImageTextDataset
from wuerstchen.data.synthetic import write_synthetic_shards

STAGE_OUTPUTS = {"A": ("images",), "B": ("images", "effnet_images"), "C": ("effnet_images",)}


def measure(urls: str, size: int, outputs: tuple[str, ...], num_samples: int, workers: int, batch_size: int) -> float:
    """Samples/s over ``num_samples`` samples after a warm-up batch per worker."""
    dataset = WebImageTextDataset(urls, batch_size=batch_size, transform=ImageTransform(size, outputs=outputs),
                                  filter=LaionFilter(), shuffle_buffer=64,
                                  num_batches=max(1, num_samples // batch_size) + max(workers, 1))
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    iterator = iter(loader)
    for _ in range(max(workers, 1)):  # warm up: worker start, first shard open
        next(iterator)
    count, start = 0, time.perf_counter()
    for batch in iterator:
        count += len(batch["captions"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--samples", type=int, default=256, help="samples timed per row")
    parser.add_argument("--shard-samples", type=int, default=64, help="distinct images written per size")
    parser.add_argument("--workers", type=int, nargs="+", default=[0], help="0 = in the main process")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            shard_dir = Path(tmp) / str(size)
            write_synthetic_shards(shard_dir, args.shard_samples, size, seed=0, shard_size=args.shard_samples // 2)
            for stage, outputs in STAGE_OUTPUTS.items():
                for workers in args.workers:
                    rate = measure(str(shard_dir), size, outputs, args.samples, workers, args.batch_size)
                    per_worker = rate / max(workers, 1)
                    rows.append({"size": size, "stage": stage, "outputs": "+".join(outputs), "workers": workers,
                                 "samples_per_s": round(rate, 1), "samples_per_s_per_worker": round(per_worker, 1),
                                 "ms_per_sample": round(1000.0 / per_worker, 2)})
                    print_row(rows[-1], header=len(rows) == 1)
    print(f"\nmachine: {os.cpu_count()} CPUs; JPEG quality 95, {args.shard_samples} distinct images per size")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def print_row(row: dict, header: bool) -> None:
    columns = ["size", "stage", "outputs", "workers", "samples_per_s", "samples_per_s_per_worker", "ms_per_sample"]
    widths = [6, 6, 22, 8, 14, 25, 14]
    if header:
        print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
        print("-+-".join("-" * w for w in widths))
    print(" | ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths)), flush=True)


if __name__ == "__main__":
    main()
