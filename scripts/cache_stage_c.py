"""Run Stage C's frozen encoders once over image shards and write their outputs as new shards (``data=cached``).

    python scripts/cache_stage_c.py data.urls='/data/laion/{00000..23999}.tar' stage_b_ckpt=CKPT out=DIR \
        [data.image_size=512] [text_encoder=vit_h] [batch_size=64] [num_workers=8]
    torchrun --nproc-per-node 8 scripts/cache_stage_c.py ...      (or srun: ranks from the environment)

Every source shard becomes ``DIR/<same name>.tar`` with, per sample, the compressor's raw latent (float16), the text
token states (float16), the caption and the source's metadata (format: ``wuerstchen/data/cached.py``), plus
``DIR/empty_caption.npy`` for caption dropout and ``DIR/cache_info.json``. Shards are split over ranks (shard i on rank
i mod world size) and decoded by ``num_workers`` loader processes, whole shards each. A shard is written to
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
from wuerstchen.data.cached import CLIP, EMPTY_CAPTION, INFO, LATENT, encode_npy, fingerprint
from wuerstchen.weights import load_network

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


@hydra.main(version_base="1.3", config_path="../configs", config_name="cache_stage_c")
def main(cfg: DictConfig) -> None:
    rank, world_size, local_rank = world()
    device = torch.device(f"cuda:{local_rank}" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    effnet, _ = load_network("effnet", cfg.stage_b_ckpt)
    encoder = hydra.utils.instantiate(cfg.text_encoder)
    effnet.to(device).eval()
    encoder.to(device).eval()
    dtype = getattr(torch, cfg.dtype)
    with torch.no_grad():
        empty = encoder([""]).to(dtype).cpu()  # (1, 77, width)
    data = cfg.data
    source = data.urls if isinstance(data.urls, str) else OmegaConf.to_container(data.urls)
    info = {"source": source,
            "stage_b_ckpt": str(cfg.stage_b_ckpt), "effnet_sha1": fingerprint(effnet), "effnet_config": effnet.config,
            "text_encoder": encoder.config, "image_size": int(data.image_size), "ratios": list(data.ratios),
            "effnet_scale": float(data.effnet_scale), "dtype": cfg.dtype, "crop": "center",
            "arrays": {LATENT: "raw compressor latent (16, h, w)", CLIP: "text token states (77, width)"}}
    if rank == 0:
        write_atomic(out / EMPTY_CAPTION, encode_npy(empty))
        write_atomic(out / INFO, (json.dumps(info, indent=1) + "\n").encode())

    urls = expand_shard_spec(source)
    mine = [u for i, u in enumerate(urls) if i % world_size == rank]
    todo = [u for u in mine if not (out / _shard_name(u)).exists()]
    log.info("rank %d/%d: %d of %d shards to cache (%d done before)", rank, world_size, len(todo), len(mine),
             len(mine) - len(todo))
    transform = ImageTransform(int(data.image_size), outputs=("effnet_images",), ratios=list(data.ratios),
                               effnet_scale=float(data.effnet_scale), random_crop=False)
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
            writer = writers.pop(url, None) or ShardWriter(out / _shard_name(url))
            writer.close()
            log.info("%s: %d samples", writer.dst.name, writer.count)
            continue
        if url not in writers:
            writers[url] = ShardWriter(out / _shard_name(url))
        writer = writers[url]
        totals.update(batch.pop("data_stats", {}))
        batch = to_model_inputs(batch)
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            latents = effnet(batch["effnet_images"].to(device)).to(dtype).cpu()
            clip = encoder(batch["captions"]).to(dtype).cpu()
        for i, key in enumerate(batch["keys"]):
            writer.add(key, {LATENT: encode_npy(latents[i]), CLIP: encode_npy(clip[i]),
                             "txt": batch["captions"][i].encode(), "json": json.dumps(batch["meta"][i]).encode()})
    seconds = time.perf_counter() - start
    rejected = {k: v for k, v in totals.items() if k != "accepted"}
    print(f"rank {rank}: cached {totals['accepted']} samples from {len(todo)} shards in {seconds:.1f} s "
          f"({totals['accepted'] / max(seconds, 1e-9):.1f} samples/s); rejected {sum(rejected.values())} {rejected}")


def _shard_name(url: str) -> str:
    name = Path(url.split("::")[-1].rstrip(" -")).name
    return name if name.endswith(".tar") else name + ".tar"


if __name__ == "__main__":
    main()
