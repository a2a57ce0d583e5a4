#!/usr/bin/env python
"""Write the built-in synthetic shape dataset as img2dataset-style WebDataset shards.

Example: python scripts/make_synthetic_shards.py --out data/shapes64 --num-samples 20000 --size 64 --seed 0
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from wuerstchen.data.synthetic import write_synthetic_shards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=pathlib.Path, help="output folder for NNNNN.tar shards")
    parser.add_argument("--num-samples", required=True, type=int)
    parser.add_argument("--size", required=True, type=int, help="image side in pixels (32..1024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    parser.add_argument("--format", choices=("jpg", "png", "webp"), default="jpg")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="quality for jpg and webp")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    paths = write_synthetic_shards(args.out, args.num_samples, args.size, seed=args.seed,
                                   shard_size=args.shard_size, image_format=args.format,
                                   jpeg_quality=args.jpeg_quality)
    total_bytes = 0
    for path in paths:
        count = json.loads(path.with_name(f"{path.stem}_stats.json").read_text())["count"]
        total_bytes += path.stat().st_size
        print(f"{path}  {count} samples  {path.stat().st_size / 2**20:.2f} MiB")
    print(f"wrote {args.num_samples} samples at {args.size}px in {len(paths)} shards to {args.out} "
          f"({total_bytes / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
