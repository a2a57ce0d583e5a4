"""Shared fixtures: tiny img2dataset-style shards written by the tests, broken ones included."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import JOINT_COMPRESSOR, SIZE, common, train_here, write_shapes
from PIL import Image


# No test may reach a model hub; without this an accidental hub call hangs for ~45 s before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

GOOD_META = {"original_width": 1024, "original_height": 768, "aesthetic": 6.0, "punsafe": 0.01, "pwatermark": 0.1}


def image_bytes(width: int = 96, height: int = 64, fmt: str = "JPEG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def good_sample(index: int, width: int = 96, height: int = 64, fmt: str = "jpg") -> dict[str, bytes]:
    """One valid sample: image, caption and LAION-style json; the caption names the index."""
    pil_format = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    meta = dict(GOOD_META, key=f"{index:09d}", width=width, height=height, caption=f"sample {index}")
    return {fmt: image_bytes(width, height, pil_format, seed=index), "txt": f"sample {index}".encode(),
            "json": json.dumps(meta).encode()}


def write_tar(path: Path, samples: dict[str, dict[str, bytes]], truncate_to: int | None = None) -> Path:
    """Write ``{key: {ext: bytes}}`` as a tar shard; ``truncate_to`` cuts the file to that many bytes."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    if truncate_to is not None:
        with open(path, "r+b") as f:
            f.truncate(truncate_to)
    return path


def write_good_shards(root: Path, num_shards: int, per_shard: int, **kwargs) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(num_shards):
        samples = {f"{shard:05d}{i:04d}": good_sample(shard * per_shard + i, **kwargs) for i in range(per_shard)}
        paths.append(write_tar(root / f"{shard:05d}.tar", samples))
    return paths


@pytest.fixture
def good_shards(tmp_path: Path) -> list[Path]:
    """4 shards x 8 valid samples, 96x64 JPEGs."""
    return write_good_shards(tmp_path / "good", num_shards=4, per_shard=8)


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """The synthetic shapes at the test size: 400 training and 32 validation samples."""
    return write_shapes(tmp_path_factory.mktemp("shapes"), SIZE, train=400, val=32, shard_size=200)


@pytest.fixture(scope="session")
def chain(shards: Path, tmp_path_factory) -> dict[str, Path]:
    """Tiny compressor pretraining and Stage A, then B on both, then C on B, 60 steps each through
    ``wuerstchen.train.train`` in this process (what scripts/train.py runs; about 40 s)."""
    root = tmp_path_factory.mktemp("runs")
    runs = {name: root / name for name in ("effnet", "a", "b", "c")}
    train_here("experiment=demo_effnet", *common(shards, runs["effnet"], 60), "data.batch_size=16")
    train_here("experiment=demo_stage_a", *common(shards, runs["a"], 60), "stage.stage_a.c_hidden=16",
               "stage.latent_scale_images=64", "stage.disc_start=40", "data.batch_size=8")
    train_here("experiment=demo_stage_b", *common(shards, runs["b"], 60), "data.batch_size=8",
               f"stage_a_ckpt={runs['a'] / 'checkpoints' / 'last.ckpt'}",
               f"effnet_init={runs['effnet'] / 'checkpoints' / 'last.ckpt'}", *JOINT_COMPRESSOR)
    train_here("experiment=demo_stage_c", *common(shards, runs["c"], 60), "data.batch_size=16",
               f"stage_b_ckpt={runs['b'] / 'checkpoints' / 'last.ckpt'}", "stage.ema.start_step=10")
    return runs
