"""Cached Stage C inputs: scripts/cache_stage_c.py writes what the encoders give online, resumes per shard, and
Stage C trains from the cache (data=cached) only with the frozen networks that wrote it."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import SIZE, common, losses, output, run, stage_c_inputs
from wuerstchen.data.cached import CLIP, EMPTY_CAPTION, INFO, LATENT, decode_npy
from wuerstchen.weights import checkpoint_info


def cache(shards: Path, stage_b: Path, out: Path, check: bool = True):
    return run("cache_stage_c.py", f"data.urls={shards / 'train'}", "data=synthetic", f"data.image_size={SIZE}",
               f"stage_b_ckpt={stage_b}", f"out={out}", "model/text_encoder@text_encoder=tiny", "batch_size=16",
               "num_workers=2", check=check)


def members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture(scope="module")
def cached(shards: Path, chain: dict[str, Path], tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache")
    cache(shards, chain["b"] / "checkpoints" / "last.ckpt", out)
    return out


def test_cache_holds_what_the_encoders_give_online(cached: Path, shards: Path, chain: dict[str, Path]) -> None:
    stage_b = chain["b"] / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in cached.glob("*.tar")) == ["00000.tar", "00001.tar"]
    info = json.loads((cached / INFO).read_text())
    assert info["effnet_scale"] == 1.5 and info["text_encoder"]["model_name"] == "wuerstchen-tiny-text"
    stored = {}
    for shard in sorted(cached.glob("*.tar")):
        for name, data in members(shard).items():
            key, ext = name.split(".", 1)
            stored.setdefault(key, {})[ext] = data
    assert len(stored) == 400 and all(set(v) == {LATENT, CLIP, "txt", "json"} for v in stored.values())

    # online: the same centre-cropped compressor view and caption through the same frozen networks
    batch, latents, clip, empty = stage_c_inputs(stage_b, shards / "train", SIZE, 32)
    for i, key in enumerate(batch["keys"]):
        cached_latent = torch.from_numpy(decode_npy(stored[key][LATENT]))
        cached_clip = torch.from_numpy(decode_npy(stored[key][CLIP]))
        assert cached_latent.dtype == torch.float16 and cached_latent.shape == (16, 3, 3)
        assert stored[key]["txt"].decode() == batch["captions"][i]
        # float16 storage: relative error 2^-11 plus rounding
        torch.testing.assert_close(cached_latent.float(), latents[i], rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(cached_clip.float(), clip[i], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(torch.from_numpy(decode_npy((cached / EMPTY_CAPTION).read_bytes())).float(), empty,
                               rtol=2e-3, atol=2e-3)


def test_cache_resumes_per_shard(cached: Path, shards: Path, chain: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cache"
    out.mkdir()
    (out / "00001.tar").write_bytes((cached / "00001.tar").read_bytes())  # finished before: kept as it is
    (out / "00001.tar").touch()
    before = (out / "00001.tar").stat().st_mtime_ns
    (out / "00000.tar.partial").write_bytes(b"interrupted")  # an interrupted shard: written again
    log = output(cache(shards, chain["b"] / "checkpoints" / "last.ckpt", out))
    assert "1 of 2 shards to cache (1 done before)" in log
    assert (out / "00001.tar").stat().st_mtime_ns == before
    assert not (out / "00000.tar.partial").exists()
    assert (out / "00000.tar").read_bytes() == (cached / "00000.tar").read_bytes()  # deterministic bytes


def test_stage_c_trains_from_the_cache(cached: Path, shards: Path, chain: dict[str, Path], tmp_path: Path) -> None:
    overrides = [o for o in common(shards, tmp_path / "c", 30, every=30) if not o.startswith("data.")]
    stage_b = chain["b"] / "checkpoints" / "last.ckpt"
    result = run("train.py", "experiment=demo_stage_c", "data=cached", f"data.urls={cached}", "data.num_workers=0",
                 "data.batch_size=16", "data.batches_per_epoch=10", "data.image_size=64", f"stage_b_ckpt={stage_b}",
                 *overrides)
    values = losses(tmp_path / "c")
    assert len(values) == 30 and np.isfinite(values).all()
    assert np.mean(values[-10:]) < np.mean(values[:10])  # it learns from the cached latents
    assert "Stage C latent 16x3x3 cached" in output(result)
    assert checkpoint_info(tmp_path / "c" / "checkpoints" / "last.ckpt")["effnet_scale"] == 1.5  # from the cache
    # a cache written with another compressor is refused before training
    other = chain["effnet"] / "checkpoints" / "last.ckpt"
    refused = run("train.py", "experiment=demo_stage_c", "data=cached", f"data.urls={cached}", "data.num_workers=0",
                  "data.batch_size=16", "data.image_size=64", f"stage_b_ckpt={other}",
                  *[o.replace(str(tmp_path / "c"), str(tmp_path / "refused")) for o in overrides], check=False)
    assert refused.returncode != 0 and "another compressor" in output(refused)
