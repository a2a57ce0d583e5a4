"""Caches of frozen networks' outputs: scripts/cache_latents.py writes what the networks give online, resumes per
shard, and Stage C and Stage B train from a cache (data=cached) only with the frozen networks that wrote it; a cached
Stage B run follows the online one step for step."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_tar
from helpers import JOINT_COMPRESSOR, SIZE, common, losses, output, run, stage_c_inputs, train_here
from wuerstchen.data.cached import (CLIP, EFFNET_VIEW, EMPTY_CAPTION, INFO, LATENT, STAGE_A, CachedDataset,
                                    decode_npy, encode_npy, prepare_cache_info)
from wuerstchen.weights import checkpoint_info


def cache(shards: Path, stage_b: Path, out: Path, check: bool = True):
    return run("cache_latents.py", f"data.urls={shards / 'train'}", "data=synthetic", f"data.image_size={SIZE}",
               f"stage_b_ckpt={stage_b}", f"out={out}", "model/text_encoder@text_encoder=tiny", "batch_size=16",
               "num_workers=2", check=check)


def cache_b(shards: Path, chain: dict[str, Path], out: Path, *overrides: str):
    """Stage B's cache of the training and validation shards (``out/train``, ``out/val``)."""
    return run("cache_latents.py", "for_stage=b", f"data.urls={shards / 'train'}", f"data.val_urls={shards / 'val'}",
               "data=synthetic", f"data.image_size={SIZE}", f"stage_a_ckpt={chain['a'] / 'checkpoints' / 'last.ckpt'}",
               f"out={out / 'train'}", f"val_out={out / 'val'}", "model/text_encoder@text_encoder=tiny",
               "batch_size=16", "num_workers=1", *overrides)


def members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def samples(cache_dir: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of a cache: key -> {file name: bytes}."""
    stored: dict[str, dict[str, bytes]] = {}
    for shard in sorted(cache_dir.glob("*.tar")):
        for name, data in members(shard).items():
            key, ext = name.split(".", 1)
            stored.setdefault(key, {})[ext] = data
    return stored


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
    stored = samples(cached)
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
    assert "1 of 2 shards to cache into" in log and "(1 done before)" in log
    assert (out / "00001.tar").stat().st_mtime_ns == before
    assert not (out / "00000.tar.partial").exists()
    assert (out / "00000.tar").read_bytes() == (cached / "00000.tar").read_bytes()  # deterministic bytes


def test_stage_c_trains_from_the_cache(cached: Path, shards: Path, chain: dict[str, Path], tmp_path: Path) -> None:
    overrides = [o for o in common(shards, tmp_path / "c", 30, every=30) if not o.startswith("data.")]
    stage_b = chain["b"] / "checkpoints" / "last.ckpt"
    _, log = train_here("experiment=demo_stage_c", "data=cached", f"data.urls={cached}", "data.num_workers=0",
                        "data.batch_size=16", "data.batches_per_epoch=10", "data.image_size=64",
                        f"stage_b_ckpt={stage_b}", *overrides)
    values = losses(tmp_path / "c")
    assert len(values) == 30 and np.isfinite(values).all()
    assert np.mean(values[-10:]) < np.mean(values[:10])  # it learns from the cached latents
    assert "Stage C latent 16x3x3 cached" in log
    assert checkpoint_info(tmp_path / "c" / "checkpoints" / "last.ckpt")["effnet_scale"] == 1.5  # from the cache
    # a cache written with another compressor is refused before training
    other = chain["effnet"] / "checkpoints" / "last.ckpt"
    with pytest.raises(Exception, match="another compressor"):
        train_here("experiment=demo_stage_c", "data=cached", f"data.urls={cached}", "data.num_workers=0",
                   "data.batch_size=16", "data.image_size=64", f"stage_b_ckpt={other}",
                   *[o.replace(str(tmp_path / "c"), str(tmp_path / "refused")) for o in overrides])


@pytest.fixture(scope="module")
def cached_b(shards: Path, chain: dict[str, Path], tmp_path_factory) -> Path:
    """Stage B's cache for a compressor that trains jointly: Stage A latents, token states, compressor views."""
    out = tmp_path_factory.mktemp("cache_b")
    cache_b(shards, chain, out)
    return out


def test_stage_b_cache_holds_what_stage_b_computes_online(cached_b: Path, shards: Path, chain: dict[str, Path],
                                                           tmp_path: Path) -> None:
    from PIL import Image

    from wuerstchen.data import ImageTransform, WebImageTextDataset, to_model_inputs
    from wuerstchen.models.text_encoder import TextEncoder
    from wuerstchen.weights import load_network

    info = json.loads((cached_b / "train" / INFO).read_text())
    assert info["stage"] == "b" and set(info["arrays"]) == {STAGE_A, EFFNET_VIEW, CLIP}
    stored = samples(cached_b / "train")
    assert len(stored) == 400 and all(set(v) == {STAGE_A, EFFNET_VIEW, CLIP, "txt", "json"} for v in stored.values())
    assert len(samples(cached_b / "val")) == 32

    stage_a, _ = load_network("a", chain["a"] / "checkpoints" / "last.ckpt")
    encoder = TextEncoder(**checkpoint_info(chain["b"] / "checkpoints" / "last.ckpt")["text_encoders"]["text_encoder"])
    dataset = WebImageTextDataset(str(shards / "train"), batch_size=32, resample=False, shuffle_buffer=0,
                                  transform=ImageTransform(SIZE, random_crop=False, effnet_scale=1.5))
    raw = next(iter(dataset))
    views = raw["effnet_images"].clone()
    batch = to_model_inputs(raw)
    with torch.no_grad():
        latents, clip = stage_a.eval().encode(batch["images"]), encoder(batch["captions"])
    for i, key in enumerate(batch["keys"]):
        cached_latent = torch.from_numpy(decode_npy(stored[key][STAGE_A]))
        assert cached_latent.dtype == torch.float16 and cached_latent.shape == (4, SIZE // 4, SIZE // 4)
        torch.testing.assert_close(cached_latent.float(), latents[i], rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(torch.from_numpy(decode_npy(stored[key][CLIP])).float(), clip[i], rtol=2e-3,
                                   atol=2e-3)
        with Image.open(io.BytesIO(stored[key][EFFNET_VIEW])) as view:  # lossless: the very pixels seen online
            assert torch.equal(torch.from_numpy(np.asarray(view)).permute(2, 0, 1), views[i])

    # with a frozen compressor the cache holds its latents instead of its views
    frozen = tmp_path / "frozen"
    cache_b(shards, chain, frozen, f"effnet_ckpt={chain['effnet'] / 'checkpoints' / 'last.ckpt'}")
    assert all(set(v) == {STAGE_A, LATENT, CLIP, "txt", "json"} for v in samples(frozen / "train").values())


def stage_b_run(shards: Path, chain: dict[str, Path], run_dir: Path, *overrides: str, steps: int = 12,
                stage_a: Path | None = None) -> str:
    """A tiny Stage B run in this process; what it logged."""
    stage_a = stage_a or chain["a"] / "checkpoints" / "last.ckpt"
    base = common(shards, run_dir, steps, every=steps)
    if any(o.startswith("data.urls=") for o in overrides):  # a cache instead of the shards
        base = [o for o in base if not o.startswith(("data.urls=", "data.val_urls="))]
    return train_here("experiment=demo_stage_b", *base, "data.batch_size=8", "data.shuffle_buffer=16",
                      f"stage_a_ckpt={stage_a}", f"effnet_init={chain['effnet'] / 'checkpoints' / 'last.ckpt'}",
                      *overrides)[1]


def test_cached_stage_b_follows_the_online_run(cached_b: Path, shards: Path, chain: dict[str, Path],
                                               tmp_path: Path) -> None:
    """Same seed, same stream order (the cache keeps shard names and sample order), same draws of t, noise and
    augmentation: the cached run's losses are the online run's up to float16 storage of latents and token states."""
    stage_b_run(shards, chain, tmp_path / "online", *JOINT_COMPRESSOR)
    log = stage_b_run(shards, chain, tmp_path / "cached", *JOINT_COMPRESSOR, "data=synthetic_cached",
                      f"data.urls={cached_b / 'train'}", f"data.val_urls={cached_b / 'val'}")
    online, cached = losses(tmp_path / "online"), losses(tmp_path / "cached")
    assert len(online) == len(cached) == 12 and np.isfinite(cached).all()
    np.testing.assert_allclose(cached, online, rtol=2e-2)
    assert not np.allclose(online[:6], online[6:])  # the comparison is over changing losses, not a constant
    assert (tmp_path / "cached" / "previews").is_dir() and "Error" not in log


def test_stage_b_cache_refuses_what_it_was_not_written_for(cached_b: Path, shards: Path, chain: dict[str, Path],
                                                           tmp_path: Path) -> None:
    frozen = tmp_path / "frozen_cache"
    effnet = chain["effnet"] / "checkpoints" / "last.ckpt"
    cache_b(shards, chain, frozen, f"effnet_ckpt={effnet}")
    data = ["data=cached", f"data.urls={frozen / 'train'}", f"data.val_urls={frozen / 'val'}"]
    # a frozen compressor's latents cannot train a compressor
    with pytest.raises(Exception, match="stage.freeze_effnet=true"):
        stage_b_run(shards, chain, tmp_path / "joint", *JOINT_COMPRESSOR, *data)
    # the demo's frozen compressor trains from them
    stage_b_run(shards, chain, tmp_path / "frozen", *data, "stage.freeze_effnet=true", steps=6)
    assert np.isfinite(losses(tmp_path / "frozen")).all()
    # another Stage A than the one that wrote the cache
    train_here("experiment=demo_stage_a", *common(shards, tmp_path / "a2", 1, every=1), "stage.stage_a.c_hidden=16",
               "data.batch_size=2", "stage.latent_scale_images=8")
    with pytest.raises(Exception, match="another Stage A"):
        stage_b_run(shards, chain, tmp_path / "other_a", *JOINT_COMPRESSOR, "data=cached",
                    f"data.urls={cached_b / 'train'}", f"data.val_urls={cached_b / 'val'}",
                    stage_a=tmp_path / "a2" / "checkpoints" / "last.ckpt")
    # Stage C needs the compressor's latents, which a joint Stage B cache does not hold
    with pytest.raises(Exception, match="latent.npy"):
        train_here("experiment=demo_stage_c", "data=cached", f"data.urls={cached_b / 'train'}", "data.val_urls=null",
                   "data.num_workers=0", f"run_dir={tmp_path / 'c'}", "trainer.max_steps=2",
                   f"stage_b_ckpt={chain['b'] / 'checkpoints' / 'last.ckpt'}")


# -- caches with unexpected shapes, exact-shape batches, skipping without reading arrays, adding to a folder --------
def write_cache(root: Path, shards: dict[str, dict[str, tuple[tuple[int, ...], str]]]) -> Path:
    """A Stage B cache (frozen compressor) written by hand at image size 64, ratios 1 and 2, views at 1.5x:
    ``shards`` maps a shard name to {key: (stage_a shape, latent shape[, clip shape[, latent dtype]])}."""
    root.mkdir()
    info = {"stage": "b", "image_size": 64, "ratios": [1.0, 2.0], "effnet_scale": 1.5, "dtype": "float16",
            "arrays": {STAGE_A: "", LATENT: "", CLIP: ""}, "effnet_config": {"c_latent": 16},
            "stage_a_config": {"levels": 2, "c_latent": 4}, "text_encoder": {"model_name": "tiny"}}
    (root / INFO).write_text(json.dumps(info))
    (root / EMPTY_CAPTION).write_bytes(encode_npy(np.zeros((1, 77, 8), np.float16)))
    rng = np.random.default_rng(0)
    for shard, samples in shards.items():
        files = {}
        for key, (stage_a, latent, *rest) in samples.items():
            clip, dtype = (rest + [(77, 8), "float16"][len(rest):])[:2]
            files[key] = {STAGE_A: encode_npy(rng.standard_normal(stage_a).astype(np.float16)),
                          LATENT: encode_npy(rng.standard_normal(latent).astype(dtype)),
                          CLIP: encode_npy(rng.standard_normal(clip).astype(np.float16)), "txt": key.encode(),
                          "json": b"{}"}
        write_tar(root / shard, files)
    return root


# (stage_a, latent) per bucket: 64x64 and 96x32 / 32x96 (W x H); the compressor view of 96 px is 160 px, of 32 px 64 px
SQUARE, WIDE, TALL = ((4, 16, 16), (16, 3, 3)), ((4, 8, 24), (16, 2, 5)), ((4, 24, 8), (16, 5, 2))


@pytest.fixture
def odd_cache(tmp_path: Path) -> Path:
    good = {f"s{i}": SQUARE for i in range(8)} | {f"w{i}": WIDE for i in range(4)} | {f"t{i}": TALL for i in range(4)}
    odd = {"bigger_latent": (SQUARE[0], (16, 4, 4)), "wider_clip": (*SQUARE, (77, 16)),
           "mixed_buckets": (SQUARE[0], WIDE[1]), "f32": (*SQUARE, (77, 8), "float32"),
           "f32b": (*SQUARE, (77, 8), "float32")}
    other_size = {f"x{i}": ((4, 32, 32), (16, 6, 6)) for i in range(12)}  # a shard cached at 128 px
    return write_cache(tmp_path / "cache", {"00000.tar": good | odd, "00001.tar": other_size})


def test_cache_batches_group_by_exact_shapes_and_odd_shapes_are_rejected(odd_cache: Path, caplog) -> None:
    dataset = CachedDataset(str(odd_cache), batch_size=2, resample=False, shuffle_buffer=0, max_tries_per_shard=5)
    with caplog.at_level(logging.WARNING):
        batches = list(dataset)
    stats = Counter()
    for batch in batches:
        stats.update(batch["data_stats"])
    assert stats["accepted"] == 16 + 2 and stats["wrong_cache_shape"] == 3 + 5 and stats["bad_shard"] == 1
    kinds = Counter((tuple(b["stage_a_latents"].shape[1:]), tuple(b["latents"].shape[1:]), b["latents"].dtype)
                    for b in batches)
    assert kinds == {(SQUARE[0], SQUARE[1], torch.float16): 4, (WIDE[0], WIDE[1], torch.float16): 2,
                     (TALL[0], TALL[1], torch.float16): 2, (SQUARE[0], SQUARE[1], torch.float32): 1}
    assert sorted(k for b in batches for k in b["keys"] if k.startswith("f32")) == ["f32", "f32b"]
    # the first odd samples are named with their shard and the file that differs; the other-size shard is given up
    assert (f"bigger_latent in {odd_cache / '00000.tar'}: latent.npy (16, 4, 4) where the cache's bucket has "
            f"(16, 3, 3) (cache_info.json: image_size 64" in caplog.text)
    assert f"{odd_cache / '00001.tar'}: 5 samples in a row rejected (the last as wrong_cache_shape)" in caplog.text


def test_cache_skip_reads_no_array_it_drops(odd_cache: Path, monkeypatch) -> None:
    import wuerstchen.data.cached as cached_module

    def stream(skip: int) -> tuple[list[dict], int]:
        dataset = cached_module.CachedDataset(str(odd_cache / "00000.tar"), batch_size=2, num_batches=6, seed=1,
                                              shuffle_buffer=4)
        dataset.skip_batches = skip
        calls = {"n": 0}
        decode = cached_module.decode_npy

        def counting_decode(data: bytes) -> np.ndarray:
            calls["n"] += 1
            return decode(data)

        monkeypatch.setattr(cached_module, "decode_npy", counting_decode)
        batches = list(dataset)
        monkeypatch.setattr(cached_module, "decode_npy", decode)
        return batches, calls["n"]

    full, decoded_full = stream(0)
    resumed, decoded = stream(2)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in full[2:]]
    for got, want in zip(resumed, full[2:]):
        assert all(torch.equal(got[k], want[k]) for k in ("latents", "clip", "stage_a_latents"))
    assert decoded == decoded_full - 2 * 2 * 3  # 2 batches x 2 samples x 3 arrays never read


def test_adding_to_a_cache_folder_checks_its_info_and_keeps_shard_names_apart(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    info = {"stage": "c", "text_encoder": {"model_name": "tiny", "width": 8}, "image_size": 64, "ratios": [1.0],
            "effnet_scale": 1.5, "dtype": "float16", "crop": "center", "arrays": {LATENT: "", CLIP: ""},
            "encoder_dtype": "float32", "effnet_ckpt": "/runs/b/last.ckpt", "effnet_sha1": "aa"}
    first = prepare_cache_info(out, {"source": "/a/{00000..00001}.tar", **info}, ["/a/00000.tar", "/a/00001.tar"])
    assert first["shards"] == {"00000.tar": "/a/00000.tar", "00001.tar": "/a/00001.tar"}
    (out / INFO).write_text(json.dumps(first))
    # the same networks from another path: /b's shards join under names of their own; /a's keep theirs
    urls = ["/b/00000.tar", "/a/00000.tar", "pipe:cat /b/00001.tar"]
    added = prepare_cache_info(out, {"source": "/b", **dict(info, effnet_ckpt="/copy/last.ckpt")}, urls)
    names = {url: name for name, url in added["shards"].items()}
    assert names["/a/00000.tar"] == "00000.tar" and names["/a/00001.tar"] == "00001.tar"
    assert len(set(names.values())) == 4 and names["/b/00000.tar"].startswith("00000-")
    assert added["sources"] == ["/a/{00000..00001}.tar", "/b"]
    # another compressor, text encoder, view scale or encoder precision: refused, naming the folder and the key
    for key, value in [("effnet_sha1", "bb"), ("text_encoder", {"model_name": "vit_h"}), ("effnet_scale", 0.75),
                       ("encoder_dtype", "bfloat16")]:
        with pytest.raises(ValueError, match=f"{out} holds a cache written with other settings \\({key}: "):
            prepare_cache_info(out, {"source": "/b", **dict(info, **{key: value})}, urls)
