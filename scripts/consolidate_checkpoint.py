"""Turn a sharded (``trainer=fsdp``) training checkpoint folder into one file, on one process, no GPU needed.

    python scripts/consolidate_checkpoint.py runs/stage_c/checkpoints/step=0100000.ckpt stage_c_100k.ckpt

The output has our single-file layout (``state_dict`` with the EMA copy as ``ema_network.*``, ``ema_of``,
``network_configs``, ``text_encoders``, step counters: ``wuerstchen/weights/checkpoint.py``), so ``load_network``,
``init_from=``, ``stage_b_ckpt=``, ``scripts/sample.py`` and ``scripts/convert_weights.py`` take it like any other
checkpoint (they also read the folder directly). Optimizer states are not carried over: resume training from the
folder itself, on any number of ranks.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from wuerstchen.weights import checkpoint as schema
from wuerstchen.weights.formats import is_sharded_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="a sharded checkpoint folder (step=NNNNNNN.ckpt/)")
    parser.add_argument("dst", type=Path, help="the single-file checkpoint to write")
    args = parser.parse_args()
    if not is_sharded_checkpoint(args.src):
        parser.error(f"{args.src} is not a sharded checkpoint folder (no .metadata and meta.pt in it)")
    source = schema.CheckpointFile(args.src)
    checkpoint = source.consolidated()
    args.dst.parent.mkdir(parents=True, exist_ok=True)
    partial = args.dst.with_name(f".{args.dst.name}.partial")
    torch.save(checkpoint, partial)
    os.replace(partial, args.dst)  # never a half-written output
    state = checkpoint[schema.STATE_DICT]
    tensors = sum(v.numel() for v in state.values())
    print(f"{args.dst}: {len(state)} tensors, {tensors / 1e6:.1f} M values, EMA of {source.ema_of or 'none'}, "
          f"step {source.global_step}")


if __name__ == "__main__":
    main()
