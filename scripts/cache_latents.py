"""Run a stage's frozen networks once over image shards and write their outputs as new shards (``data=cached``).

    python scripts/cache_latents.py data.urls='/data/laion/{00000..23999}.tar' stage_b_ckpt=CKPT out=DIR \
        [data.image_size=512] [text_encoder=vit_h] [batch_size=64] [num_workers=8]          (Stage C, the default)
    python scripts/cache_latents.py for_stage=b data.urls=... stage_a_ckpt=CKPT [effnet_ckpt=CKPT] out=DIR   (Stage B)
    torchrun --nproc-per-node 8 scripts/cache_latents.py ...      (or srun: ranks from the environment)

Stage C's cache holds the compressor's raw latent and the text token states. Stage B's holds the Stage A latent of the
training crop and the token states, plus either a frozen compressor's latent (``effnet_ckpt``: train with
``stage.freeze_effnet=true stage.effnet_init=<the same>``) or, for a compressor that trains jointly, its exact input
view as a lossless PNG. Arrays are float16 (``dtype``); the caption and the source's metadata are kept. Format:
``wuerstchen/data/cached.py``.

Every source shard becomes ``OUT/<same name>.tar`` (a name another source took gets a hash of its URL added), plus
``OUT/empty_caption.npy`` for caption dropout and ``OUT/cache_info.json``; ``val_out=DIR`` caches ``data.val_urls`` the
same way. More sources can be added to an ``OUT`` later, with the same networks, text encoder and view scale: a folder
written with others is refused, naming the key that differs. Shards are split over ranks (shard i
on rank i mod world size) and decoded by ``num_workers`` loader processes, whole shards each. A shard is written to
``.partial`` and renamed when complete, so re-running the command skips finished shards and redoes interrupted ones.
Views are centre crops of each sample's aspect bucket (training from the cache sees the same crop every epoch).

Then: ``python scripts/train.py experiment=stage_c data=cached data.urls=DIR stage_b_ckpt=CKPT ...``.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from wuerstchen.data import ImageTransform, WebImageTextDataset, expand_shard_spec, to_model_inputs
from wuerstchen.data.buckets import resolve_multiple
from wuerstchen.data.cached import (CLIP, EFFNET_VIEW, EMPTY_CAPTION, INFO, LATENT, STAGE_A, encode_npy, encode_png,
                                    fingerprint, prepare_cache_info)
from wuerstchen.data.pipeline import ERROR_PREFIX
from wuerstchen.models.stage_b import RELEASED_PIXEL_MULTIPLE
from wuerstchen.training.base import load_frozen

log = logging.getLogger(__name__)
_MTIME = 1_700_000_000.0  # constant member mtime: the same inputs give byte-identical shards


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's or Slurm's environment; one process without either."""
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    return rank, size, local


class ShardBatches(IterableDataset):
    """Each loader worker decodes whole shards: yields (url, batch) per batch and (url, None) when a shard is done."""

    def __init__(self, urls: list[str], make_dataset: Any) -> None:
        super().__init__()
        self.urls, self.make_dataset = urls, make_dataset

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any] | None]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for url in self.urls[worker::workers]:
            for batch in self.make_dataset(url):
                yield url, batch
            yield url, None


def shard_dataset(url: str, **kwargs: Any) -> WebImageTextDataset:
    """One source shard, read once in order (centre crops: the val transform), partial last batches included."""
    return WebImageTextDataset([url], resample=False, num_batches=None, shuffle_buffer=0, **kwargs)


class ShardWriter:
    """One output shard, written to ``.partial`` and renamed into place on ``close``."""

    def __init__(self, dst: Path) -> None:
        self.dst, self.partial = dst, dst.with_name(dst.name + ".partial")
        self.tar = tarfile.open(self.partial, "w")
        self.count = 0

    def add(self, key: str, files: dict[str, bytes]) -> None:
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime = len(data), _MTIME
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self.tar.close()
        os.replace(self.partial, self.dst)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Encoders:
    """The frozen networks whose outputs a stage's cache stores, and the ``cache_info.json`` describing them."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        if cfg.for_stage not in ("b", "c"):
            raise ValueError(f"for_stage={cfg.for_stage!r}: expected b (Stage B's inputs) or c (Stage C's)")
        self.stage, self.device, self.dtype = cfg.for_stage, device, getattr(torch, cfg.dtype)
        data = cfg.data
        self.text_encoder = hydra.utils.instantiate(cfg.text_encoder).to(device).eval()
        self.info: dict[str, Any] = {
            "stage": self.stage, "text_encoder": self.text_encoder.config, "image_size": int(data.image_size),
            "ratios": list(data.ratios), "effnet_scale": float(data.effnet_scale), "dtype": cfg.dtype,
            "crop": "center", "arrays": {}}
        # bucket sides: by default a Stage B cache's pass the released U-Net (64 px; data.multiple=32 suits a 3-level
        # one, training checks the cache against its Stage B); Stage C's compressor views are snapped to 32 anyway
        requested = data.get("multiple") or (RELEASED_PIXEL_MULTIPLE if self.stage == "b" else None)
        self.info["multiple"] = resolve_multiple(requested, 1)
        self.stage_a = self.effnet = None
        if self.stage == "b":
            self.stage_a = load_frozen("a", cfg.stage_a_ckpt, "stage_a_ckpt").to(device)
            self.info.update(stage_a_ckpt=str(cfg.stage_a_ckpt), stage_a_sha1=fingerprint(self.stage_a),
                             stage_a_config=self.stage_a.config)
            self.info["arrays"][STAGE_A] = "Stage A encoder latent of the crop, unquantised (4, H/4, W/4)"
        effnet_ckpt = cfg.stage_b_ckpt if self.stage == "c" else cfg.effnet_ckpt
        if self.stage == "c" or effnet_ckpt:
            key = "stage_b_ckpt" if self.stage == "c" else "effnet_ckpt"
            self.effnet = load_frozen("effnet", effnet_ckpt, key).to(device)
            self.info.update(effnet_ckpt=str(effnet_ckpt), effnet_sha1=fingerprint(self.effnet),
                             effnet_config=self.effnet.config)
            self.info["arrays"][LATENT] = "raw compressor latent (16, h, w)"
        else:  # the compressor trains with Stage B: keep exactly what it would see online
            self.info["arrays"][EFFNET_VIEW] = "compressor input view, uint8 RGB, lossless"
        self.info["arrays"][CLIP] = "text token states (77, width)"
        self.outputs = ("effnet_images",) if self.stage == "c" else ("images", "effnet_images")

    @torch.no_grad()
    def empty_caption(self) -> torch.Tensor:
        return self.text_encoder([""]).to(self.dtype).cpu()  # (1, 77, width)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> list[dict[str, bytes]]:
        """Per sample of a (model-input) batch: the cache's files."""
        device = self.device
        arrays: dict[str, torch.Tensor] = {}
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            if self.stage_a is not None:
                arrays[STAGE_A] = self.stage_a.encode(batch["images"].to(device))
            if self.effnet is not None:
                arrays[LATENT] = self.effnet(batch["effnet_images"].to(device))
            arrays[CLIP] = self.text_encoder(batch["captions"])
        arrays = {name: value.to(self.dtype).cpu() for name, value in arrays.items()}
        files = []
        for i in range(len(batch["keys"])):
            sample = {name: encode_npy(value[i]) for name, value in arrays.items()}
            if EFFNET_VIEW in self.info["arrays"]:
                sample[EFFNET_VIEW] = encode_png(batch["views"][i])
            sample.update(txt=batch["captions"][i].encode(), json=json.dumps(batch["meta"][i]).encode())
            files.append(sample)
        return files


@hydra.main(version_base="1.3", config_path="../configs", config_name="cache_latents")
def main(cfg: DictConfig) -> None:
    rank, world_size, local_rank = world()
    device = torch.device(f"cuda:{local_rank}" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    encoders = Encoders(cfg, device)
    splits = [(cfg.data.urls, cfg.out)]
    if cfg.get("val_out"):
        if not cfg.data.get("val_urls"):
            raise ValueError("val_out is set but data.val_urls is not: nothing to cache there")
        splits.append((cfg.data.val_urls, cfg.val_out))
    for urls, out in splits:
        cache_split(cfg, encoders, urls, Path(out), rank, world_size)


def cache_split(cfg: DictConfig, encoders: Encoders, urls: Any, out: Path, rank: int, world_size: int) -> None:
    """Cache one set of shards (``data.urls`` or ``data.val_urls``) into ``out``: this rank's share, resumably."""
    out.mkdir(parents=True, exist_ok=True)
    data = cfg.data
    source = urls if isinstance(urls, str) else OmegaConf.to_container(urls)
    shards = list(dict.fromkeys(expand_shard_spec(source)))  # a shard named twice is cached once
    info = prepare_cache_info(out, {"source": source, **encoders.info}, shards)  # every rank refuses a mismatch
    names = {url: name for name, url in info["shards"].items()}
    if rank == 0:
        write_atomic(out / EMPTY_CAPTION, encode_npy(encoders.empty_caption()))
        write_atomic(out / INFO, (json.dumps(info, indent=1) + "\n").encode())

    mine = [u for i, u in enumerate(shards) if i % world_size == rank]
    todo = [u for u in mine if not (out / names[u]).exists()]
    log.info("rank %d/%d: %d of %d shards to cache into %s (%d done before)", rank, world_size, len(todo), len(mine),
             out, len(mine) - len(todo))
    transform = ImageTransform(int(data.image_size), outputs=encoders.outputs, ratios=list(data.ratios),
                               effnet_scale=float(data.effnet_scale), random_crop=False,
                               multiple=encoders.info["multiple"])
    filter_ = hydra.utils.instantiate(data.filter) if data.get("filter") else None

    make_dataset = functools.partial(shard_dataset, batch_size=int(cfg.batch_size), transform=transform,
                                     filter=filter_, require_caption=bool(data.require_caption),
                                     max_tries=int(data.max_tries))
    loader = DataLoader(ShardBatches(todo, make_dataset), batch_size=None, num_workers=min(cfg.num_workers, len(todo)))
    writers: dict[str, ShardWriter] = {}
    totals: Counter[str] = Counter()
    start = time.perf_counter()
    for url, batch in loader:
        if batch is None:  # the shard is complete
            writer = writers.pop(url, None) or ShardWriter(out / names[url])
            writer.close()
            log.info("%s: %d samples", writer.dst.name, writer.count)
            continue
        if url not in writers:
            writers[url] = ShardWriter(out / names[url])
        writer = writers[url]
        totals.update(batch.pop("data_stats", {}))
        batch["views"] = batch["effnet_images"]  # uint8, before to_model_inputs normalises the compressor's input
        batch = to_model_inputs(batch)
        for key, files in zip(batch["keys"], encoders(batch)):
            writer.add(key, files)
    seconds = time.perf_counter() - start
    rejected = {k: v for k, v in totals.items() if k != "accepted" and not k.startswith(ERROR_PREFIX)}
    print(f"rank {rank}: cached {totals['accepted']} samples from {len(todo)} shards into {out} in {seconds:.1f} s "
          f"({totals['accepted'] / max(seconds, 1e-9):.1f} samples/s); rejected {sum(rejected.values())} {rejected}")


if __name__ == "__main__":
    main()
