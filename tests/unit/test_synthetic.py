"""Tests of the built-in synthetic shape dataset: renderer, shard writer, CLI, and its evaluation (the numpy scorer,
the held-out set, caption accuracy and captioned grids)."""

from __future__ import annotations

import io
import itertools
import json
import pathlib
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from wuerstchen.data import synthetic as syn
from wuerstchen.data.synthetic import (
    COLOURS, POSITIONS, SHAPES, SIZES, caption_for, make_sample, parse_caption, write_synthetic_shards,
)
from wuerstchen.evaluation import caption_accuracy, captioned_grid, held_out, predict_labels, score_batch, score_image

REPO = pathlib.Path(__file__).resolve().parents[2]
JSON_FIELDS = {"url", "caption", "key", "status", "error_message", "width", "height", "original_width",
               "original_height", "aesthetic", "punsafe", "pwatermark", "similarity", "labels"}


def _members(tar_path: pathlib.Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def _by_index(paths: list[pathlib.Path]) -> dict[int, dict[str, bytes]]:
    """Global sample index (from the synthetic:// url) -> {extension: bytes}, json minus its key."""
    out: dict[int, dict[str, bytes]] = {}
    for path in paths:
        files = _members(path)
        for name in files:
            if name.endswith(".json"):
                key = name[:-5]
                meta = json.loads(files[name])
                index = int(meta["url"].rsplit("/", 1)[1])
                del meta["key"]
                out[index] = {"jpg": files[key + ".jpg"], "txt": files[key + ".txt"], "json": json.dumps(meta)}
    return out


# ------------------------------------------------------------------------------------------ captions
def test_constants_and_captions_round_trip() -> None:
    assert len(COLOURS) == 6 and SHAPES == ("circle", "square", "triangle") and len(POSITIONS) == 9
    assert set(SIZES) == {"small", "large"}
    captions = set()
    for colour, shape, position, size in itertools.product(COLOURS, SHAPES, POSITIONS, SIZES):
        labels = {"colour": colour, "shape": shape, "position": position, "size": size}
        caption = caption_for(labels)
        assert parse_caption(caption) == labels
        captions.add(caption)
    assert len(captions) == 6 * 3 * 9 * 2
    assert caption_for({"colour": "red", "shape": "circle", "position": "top left", "size": "large"}) \
        == "a large red circle in the top left"
    with pytest.raises(ValueError):
        parse_caption("a photo of a dog")


# ------------------------------------------------------------------------------------------ renderer
def test_make_sample_is_deterministic_and_size_independent() -> None:
    img_a, cap_a, lab_a = make_sample(3, 17, 64)
    img_b, cap_b, lab_b = make_sample(3, 17, 64)
    assert img_a.tobytes() == img_b.tobytes() and cap_a == cap_b and lab_a == lab_b
    assert img_a.mode == "RGB" and img_a.size == (64, 64)
    for size in (32, 200, 1024):  # labels depend on (seed, index) only
        img, cap, lab = make_sample(3, 17, size)
        assert img.size == (size, size) and (cap, lab) == (cap_a, lab_a)
    assert caption_for(lab_a) == cap_a
    others = [make_sample(4, i, 64) for i in range(10)]
    mine = [make_sample(3, i, 64) for i in range(10)]
    assert sum(a[1] == b[1] for a, b in zip(mine, others)) < 5  # another seed, other samples
    with pytest.raises(ValueError):
        make_sample(0, 0, 16)


def test_labels_are_balanced_enough() -> None:
    labels = [make_sample(0, i, 32)[2] for i in range(600)]
    for key, values in (("colour", COLOURS), ("shape", SHAPES), ("position", POSITIONS), ("size", SIZES)):
        counts = [sum(lab[key] == v for lab in labels) for v in values]
        assert min(counts) > 0.5 * 600 / len(values), (key, counts)


def test_shape_lies_inside_its_cell_with_the_right_size() -> None:
    size = 192
    cell = size / 3
    for index in range(60):
        image, _, labels = make_sample(1, index, size)
        arr = np.asarray(image, dtype=np.float64) / 255
        fg = np.linalg.norm(arr - np.median(arr, axis=1, keepdims=True), axis=-1) > 0.25  # (H, W)
        ys, xs = np.nonzero(fg)
        row, col = divmod(POSITIONS.index(labels["position"]), 3)
        assert row * cell - 1 <= ys.min() and ys.max() <= (row + 1) * cell, (index, labels)
        assert col * cell - 1 <= xs.min() and xs.max() <= (col + 1) * cell, (index, labels)
        extent = max(np.ptp(ys), np.ptp(xs)) + 1
        assert abs(extent / cell - SIZES[labels["size"]]) < 0.08, (index, labels, extent / cell)


# ------------------------------------------------------------------------------------------ shards
def test_shards_are_byte_identical_for_identical_arguments(tmp_path: pathlib.Path) -> None:
    a = write_synthetic_shards(tmp_path / "a", 25, 32, seed=5, shard_size=10)
    b = write_synthetic_shards(tmp_path / "b", 25, 32, seed=5, shard_size=10)
    c = write_synthetic_shards(tmp_path / "c", 25, 32, seed=6, shard_size=10)
    assert [p.name for p in a] == ["00000.tar", "00001.tar", "00002.tar"]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    assert all(x.read_bytes() != z.read_bytes() for x, z in zip(a, c))


def test_shard_size_does_not_change_content(tmp_path: pathlib.Path) -> None:
    seven = _by_index(write_synthetic_shards(tmp_path / "s7", 20, 32, seed=2, shard_size=7))
    ten = _by_index(write_synthetic_shards(tmp_path / "s10", 20, 32, seed=2, shard_size=10))
    assert sorted(seven) == sorted(ten) == list(range(20))
    assert seven == ten


def test_shard_layout_and_metadata(tmp_path: pathlib.Path) -> None:
    paths = write_synthetic_shards(tmp_path, 23, 48, seed=1, shard_size=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json", "00002.tar", "00002_stats.json"]
    for shard, path in enumerate(paths):
        files = _members(path)
        keys = sorted({name.split(".")[0] for name in files})
        n = 10 if shard < 2 else 3
        assert keys == [f"{shard:05d}{i:04d}" for i in range(n)]
        assert sorted(files) == sorted(f"{k}.{e}" for k in keys for e in ("jpg", "json", "txt"))
        stats = json.loads(path.with_name(f"{shard:05d}_stats.json").read_text())
        assert stats["count"] == stats["successes"] == n and stats["status_dict"] == {"success": n}
        assert stats["failed_to_download"] == stats["failed_to_resize"] == 0
        assert stats["end_time"] >= stats["start_time"] > 0
        for key in keys:
            meta = json.loads(files[f"{key}.json"])
            caption = files[f"{key}.txt"].decode("utf-8")
            assert set(meta) == JSON_FIELDS
            assert meta["key"] == key and meta["status"] == "success" and meta["error_message"] is None
            assert meta["url"].startswith("synthetic://1/")
            assert meta["caption"] == caption and parse_caption(caption) == meta["labels"]
            assert caption_for(meta["labels"]) == caption
            image = Image.open(io.BytesIO(files[f"{key}.jpg"]))
            assert image.format == "JPEG" and image.size == (meta["width"], meta["height"]) == (48, 48)
            # the official LAION filters of the Würstchen configs must keep every sample
            assert 512 <= meta["original_width"] <= 2048 and 512 <= meta["original_height"] <= 2048
            assert 5.0 <= meta["aesthetic"] <= 7.5 and meta["punsafe"] <= 0.1 and meta["pwatermark"] <= 0.3
            assert 0.28 <= meta["similarity"] <= 0.4
            with tarfile.open(path) as tf:
                assert tf.getmember(f"{key}.jpg").mtime == tf.getmember(f"{key}.txt").mtime


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_other_image_formats(tmp_path: pathlib.Path, fmt: str) -> None:
    (path,) = write_synthetic_shards(tmp_path, 3, 40, seed=0, image_format=fmt)
    files = _members(path)
    image = Image.open(io.BytesIO(files[f"000000000.{fmt}"]))
    assert image.size == (40, 40)
    if fmt == "png":  # lossless: exactly what make_sample renders
        assert image.convert("RGB").tobytes() == make_sample(0, 0, 40)[0].tobytes()
    with pytest.raises(ValueError):
        write_synthetic_shards(tmp_path / "bad", 1, 32, image_format="gif")


def test_cli_writes_expected_shards(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_synthetic_shards.py"), "--out", str(out),
         "--num-samples", "25", "--size", "32", "--seed", "3", "--shard-size", "10"],
        capture_output=True, text=True, check=True, timeout=120,
    )
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    counts = [len(_members(p)) // 3 for p in sorted(out.glob("*.tar"))]
    assert counts == [10, 10, 5]
    assert len(result.stdout.strip().splitlines()) == 4 and "25 samples" in result.stdout


# ------------------------------------------------------------------------------------------ scorer
@pytest.mark.parametrize("size,n", [(32, 300), (64, 300), (128, 200), (256, 200)])
def test_scorer_recognises_fresh_renders(size: int, n: int) -> None:
    samples = [make_sample(11, i, size) for i in range(n)]
    acc = score_batch([s[0] for s in samples], [s[2] for s in samples])
    print(f"scorer accuracy at {size}px over {n}: {acc}")
    assert acc["colour"] >= 0.98 and acc["shape"] >= 0.98 and acc["position"] >= 0.98


def test_scorer_recognises_stored_jpegs(tmp_path: pathlib.Path) -> None:
    files = _members(write_synthetic_shards(tmp_path, 150, 32, seed=4)[0])
    keys = sorted(name[:-4] for name in files if name.endswith(".jpg"))
    images = [Image.open(io.BytesIO(files[f"{key}.jpg"])) for key in keys]
    labels = [json.loads(files[f"{key}.json"])["labels"] for key in keys]
    acc = score_batch(images, labels)
    assert min(acc.values()) >= 0.98, acc


def test_scorer_rejects_wrong_labels() -> None:
    wrong_colour, wrong_shape, total = 0, 0, 0
    for index in range(60):
        image, _, labels = make_sample(12, index, 64)
        assert all(score_image(image, labels).values())
        for colour in COLOURS:
            if colour != labels["colour"]:
                scores = score_image(image, {**labels, "colour": colour})
                wrong_colour += scores["colour"]
                assert scores["shape"] and scores["position"]
        for shape in SHAPES:
            if shape != labels["shape"]:
                wrong_shape += score_image(image, {**labels, "shape": shape})["shape"]
                total += 1
        other = POSITIONS[(POSITIONS.index(labels["position"]) + 4) % 9]
        assert not score_image(image, {**labels, "position": other})["position"]
    assert wrong_colour == 0
    assert wrong_shape <= 0.02 * total


def _blank_backgrounds(size: int) -> list[np.ndarray]:
    """Every background kind of the renderer, without a shape, plus a plain and a gradient array."""
    out = []
    for index in range(40):
        rng = np.random.default_rng([9, index])
        out.append(syn._background(rng, np.random.default_rng([9, index, 1]), size))
    ramp = np.linspace(0.1, 0.9, size)[:, None, None]
    out += [np.full((size, size, 3), 0.5), np.broadcast_to(ramp, (size, size, 3))]
    return out


@pytest.mark.parametrize("size", [32, 64, 256])
def test_scorer_says_false_on_empty_images(size: int) -> None:
    rng = np.random.default_rng(size)
    noise = [rng.uniform(0, 1, (size, size, 3)) for _ in range(5)]
    noise += [np.clip(0.5 + rng.normal(0, s, (size, size, 3)), 0, 1) for s in (0.03, 0.05, 0.08, 0.15)]
    blank = _blank_backgrounds(size) + [np.zeros((3, size, size)), np.ones((size, size, 3))]
    labels = {"colour": "red", "shape": "circle", "position": "center", "size": "large"}
    for image in noise + blank:
        assert predict_labels(image) is None
        assert not any(score_image(image, labels).values())


def test_scorer_accepts_tensors_arrays_and_pil() -> None:
    image, _, labels = make_sample(13, 5, 64)
    hwc = np.asarray(image, dtype=np.float32) / 255
    chw = torch.from_numpy(hwc).permute(2, 0, 1).contiguous()
    for variant in (image, hwc, hwc.transpose(2, 0, 1), np.asarray(image), chw, chw.double()):
        assert score_image(variant, labels) == {"colour": True, "shape": True, "position": True}
    batch = torch.stack([chw, chw, torch.zeros_like(chw)])
    acc = score_batch(batch, [labels] * 3)
    assert acc == pytest.approx({"colour": 2 / 3, "shape": 2 / 3, "position": 2 / 3, "all": 2 / 3})


def test_held_out_samples_score_as_their_captions(tmp_path: pathlib.Path) -> None:
    write_synthetic_shards(tmp_path / "val", 24, 64, seed=1, shard_size=24)
    samples = held_out(tmp_path / "val", 64, 20)
    assert len(samples) == 20 and all(parse_caption(s["caption"]) == s["labels"] for s in samples)
    images = torch.stack([s["image"] for s in samples])
    assert images.shape == (20, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    assert caption_accuracy(images, samples) == {"caption_color_accuracy": 1.0, "caption_shape_accuracy": 1.0,
                                                  "caption_position_accuracy": 1.0, "caption_all_accuracy": 1.0}
    # the captions name what is drawn: another sample's caption is mostly wrong
    wrong = caption_accuracy(images.roll(1, 0), samples)
    assert wrong["caption_all_accuracy"] < 0.2
    captioned_grid(images[:10], [s["caption"] for s in samples[:10]], tmp_path / "grid.png", columns=4)
    assert Image.open(tmp_path / "grid.png").size == (4 * 128, 3 * (128 + 28))  # 64 px upscaled so captions fit
