"""Run a stage's frozen networks once over image shards and write their outputs as new shards (``data=cached``).

    python scripts/cache_latents.py data.urls='/data/laion/{00000..23999}.tar' stage_b_ckpt=CKPT out=DIR \
        [data.image_size=512] [text_encoder=vit_h] [batch_size=64] [num_workers=8]          (Stage C, the default)
    python scripts/cache_latents.py for_stage=b data.urls=... stage_a_ckpt=CKPT [effnet_ckpt=CKPT] out=DIR   (Stage B)
    torchrun --nproc-per-node 8 scripts/cache_latents.py ...      (or srun: ranks from the environment)

Stage C's cache holds the compressor's raw latent and the text token states. Stage B's holds the Stage A latent of the
training crop and the token states, plus either a frozen compressor's latent (``effnet_ckpt``: train with
``stage.freeze_effnet=true effnet_init=<the same>``) or, for a compressor that trains jointly, its exact input view as
a lossless PNG. What is stored is the stage's conditioning (``wuerstchen/conditioning.py``), the format and its writer
are ``wuerstchen/data/cached.py`` (``write_cache``).

Every source shard becomes ``OUT/<same name>.tar``, plus ``OUT/empty_caption.npy`` and ``OUT/cache_info.json``;
``val_out=DIR`` caches ``data.val_urls`` the same way. More sources can be added to an ``OUT`` later, with the same
networks, text encoder and view scale: a folder written with others is refused, naming the key that differs. Shards
are split over ranks and decoded by ``num_workers`` loader processes; re-running the command skips finished shards
and redoes interrupted ones.

Then: ``python scripts/train.py experiment=stage_c data=cached data.urls=DIR stage_b_ckpt=CKPT ...``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from wuerstchen.conditioning import StageBConditioning, StageCConditioning
from wuerstchen.data.buckets import resolve_multiple
from wuerstchen.data.cached import write_cache
from wuerstchen.data.pipeline import ERROR_PREFIX
from wuerstchen.models.stage_b import RELEASED_PIXEL_MULTIPLE


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's or Slurm's environment; one process without either."""
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    return rank, size, local


def conditioning(cfg: DictConfig, device: torch.device) -> tuple[StageBConditioning | StageCConditioning, dict]:
    """The stage's conditioning with the networks the config's weight nodes give, and where they came from."""
    if cfg.for_stage not in ("b", "c"):
        raise ValueError(f"for_stage={cfg.for_stage!r}: expected b (Stage B's inputs) or c (Stage C's)")
    text_encoder = hydra.utils.instantiate(cfg.text_encoder).to(device).eval()
    if cfg.for_stage == "c":
        effnet = hydra.utils.instantiate(cfg.effnet).to(device)
        return StageCConditioning(text_encoder, effnet), {"effnet_ckpt": str(cfg.stage_b_ckpt)}
    stage_a = hydra.utils.instantiate(cfg.stage_a).to(device)
    effnet = hydra.utils.instantiate(cfg.frozen_effnet)  # None: the compressor trains with Stage B, keep its views
    provenance = {"stage_a_ckpt": str(cfg.stage_a_ckpt)}
    if effnet is not None:
        provenance["effnet_ckpt"] = str(cfg.effnet_ckpt)
    return StageBConditioning(text_encoder, stage_a, effnet and effnet.to(device), freeze_effnet=effnet is not None,
                              caption_drop_prob=0.0), provenance


@hydra.main(version_base="1.3", config_path="../configs", config_name="cache_latents")
def main(cfg: DictConfig) -> None:
    rank, world_size, local_rank = world()
    device = torch.device(f"cuda:{local_rank}" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    cond, provenance = conditioning(cfg, device)
    data = cfg.data
    # bucket sides: by default a Stage B cache's pass the released U-Net (64 px; data.multiple=32 suits a 3-level
    # one, training checks the cache against its Stage B); Stage C's compressor views are snapped to 32 anyway
    multiple = resolve_multiple(data.get("multiple") or (RELEASED_PIXEL_MULTIPLE if cfg.for_stage == "b" else None), 1)
    splits = [(data.urls, cfg.out)]
    if cfg.get("val_out"):
        if not data.get("val_urls"):
            raise ValueError("val_out is set but data.val_urls is not: nothing to cache there")
        splits.append((data.val_urls, cfg.val_out))
    for urls, out in splits:
        start = time.perf_counter()
        totals = write_cache(
            cond, urls if isinstance(urls, str) else OmegaConf.to_container(urls), Path(out),
            image_size=int(data.image_size), ratios=list(data.ratios), effnet_scale=float(data.effnet_scale),
            multiple=multiple, batch_size=int(cfg.batch_size), num_workers=int(cfg.num_workers), dtype=cfg.dtype,
            filter=hydra.utils.instantiate(data.filter) if data.get("filter") else None,
            require_caption=bool(data.require_caption), max_tries=int(data.max_tries), provenance=provenance,
            rank=rank, world_size=world_size)
        seconds = time.perf_counter() - start
        rejected = {k: v for k, v in totals.items() if k != "accepted" and not k.startswith(ERROR_PREFIX)}
        accepted = totals.get("accepted", 0)
        print(f"rank {rank}: cached {accepted} samples into {out} in {seconds:.1f} s "
              f"({accepted / max(seconds, 1e-9):.1f} samples/s); rejected {sum(rejected.values())} {rejected}")


if __name__ == "__main__":
    main()
