"""The WebDataset stream: broken input, determinism, rank/worker separation, fixed counts and early errors."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import GOOD_META, good_sample, image_bytes, write_tar
from wuerstchen.data import (ImageTransform, LaionFilter, NoUsableSamplesError, ShardSpecError,
                             WebImageTextDataset)


def make_dataset(urls, **kwargs) -> WebImageTextDataset:
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("transform", ImageTransform(64))
    kwargs.setdefault("filter", LaionFilter())
    kwargs.setdefault("shuffle_buffer", 16)
    return WebImageTextDataset(urls, **kwargs)


def captions(batches) -> list[str]:
    return [c for b in batches for c in b["captions"]]


def totals(batches) -> Counter:
    out: Counter = Counter()
    for b in batches:
        out.update(b["data_stats"])
    return out


@pytest.fixture
def broken_shards(tmp_path: Path) -> tuple[str, int]:
    """Two shards with one broken sample of each kind among good ones, and one truncated shard.

    Returns the directory and the number of good samples.
    """
    root = tmp_path / "broken"
    root.mkdir()
    meta = json.dumps(GOOD_META).encode()
    shard0 = {f"g{i:03d}": good_sample(i) for i in range(6)}
    shard0.update({
        "x_badimage": {"jpg": b"\xff\xd8 this is no jpeg", "txt": b"broken image", "json": meta},
        "x_truncimage": {"jpg": image_bytes()[:200], "txt": b"truncated image", "json": meta},
        "x_nocaption": {"jpg": image_bytes(), "json": meta},
        "x_emptycaption": {"jpg": image_bytes(), "txt": b"   ", "json": meta},
        "x_badjson": {"jpg": image_bytes(), "txt": b"bad json", "json": b"{not json"},
        "x_listjson": {"jpg": image_bytes(), "txt": b"json list", "json": b"[1, 2]"},
        "x_nojson": {"jpg": image_bytes(), "txt": b"no json"},
        "x_noimage": {"txt": b"no image", "json": meta},
        "x_badutf8": {"jpg": image_bytes(), "txt": b"\xff\xfe\xfa", "json": meta},
        "x_small": {"jpg": image_bytes(), "txt": b"too small", "json": json.dumps(dict(GOOD_META,
                                                                                      original_width=100)).encode()},
    })
    write_tar(root / "00000.tar", shard0)
    write_tar(root / "00001.tar", {f"h{i:03d}": good_sample(100 + i) for i in range(6)})
    # a shard cut in the middle of its third sample: the first two are good, the rest is lost
    full = write_tar(root / "00002.tar", {f"t{i:03d}": good_sample(200 + i) for i in range(6)})
    size = full.stat().st_size
    write_tar(root / "00002.tar", {f"t{i:03d}": good_sample(200 + i) for i in range(6)}, truncate_to=size // 2)
    return str(root), 6 + 6


def test_broken_samples_are_skipped_and_counted_by_reason(broken_shards) -> None:
    root, _ = broken_shards
    batches = list(make_dataset(root, resample=False, batch_size=1, shuffle_buffer=0))
    got = totals(batches)
    expected = {"bad_image": 2, "missing_caption": 2, "bad_json": 2, "missing_json": 1, "missing_image": 1,
                "bad_caption": 1, "too_small": 1, "truncated_tar": 1}
    for reason, count in expected.items():
        assert got[reason] == count, (reason, got)
    names = captions(batches)
    assert all(not n.startswith(("broken", "truncated", "no ", "bad", "json", "too")) for n in names)
    # every good sample of the intact shards came through, and the truncated shard's complete samples too
    assert {f"sample {i}" for i in list(range(6)) + list(range(100, 106))} <= set(names)
    assert 12 + 1 <= got["accepted"] == len(names) < 12 + 6
    for batch in batches:
        assert batch["images"].shape[1:] == (3, 64, 64)


def test_training_stream_keeps_flowing_over_broken_shards(broken_shards) -> None:
    root, _ = broken_shards
    batches = list(make_dataset(root, num_batches=40, seed=3))
    assert len(batches) == 40
    got = totals(batches)
    assert got["accepted"] == 160
    assert got["bad_image"] > 0 and got["truncated_tar"] > 0


def test_a_missing_shard_in_an_explicit_list_is_counted(good_shards, tmp_path: Path) -> None:
    urls = [str(good_shards[0]), str(tmp_path / "gone.tar")]
    (tmp_path / "gone.tar").write_bytes(b"")  # exists at start-up, empty by the time it is read
    got = totals(make_dataset(urls, resample=False, batch_size=1))
    assert got["accepted"] == 8 and got["unreadable_shard"] == 1


def test_same_seed_same_stream_and_restart_index_changes_it(good_shards) -> None:
    root = str(good_shards[0].parent)

    def stream(seed: int = 0, restart_index: int = 0, epoch: int = 0) -> list[str]:
        ds = make_dataset(root, num_batches=8, seed=seed)
        ds.restart_index, ds.epoch = restart_index, epoch
        return captions(ds)

    def pixels(ds) -> torch.Tensor:
        return torch.cat([b["images"] for b in ds])

    base = stream()
    assert stream() == base
    assert stream(restart_index=1) != base
    assert stream(restart_index=1) == stream(restart_index=1)
    assert stream(epoch=1) != base
    assert stream(seed=1) != base
    # the crops are part of the stream too
    a, b = make_dataset(root, num_batches=4), make_dataset(root, num_batches=4)
    assert torch.equal(pixels(a), pixels(b))


def test_ranks_and_workers_draw_different_samples(good_shards) -> None:
    root = str(good_shards[0].parent)
    rank0 = captions(make_dataset(root, num_batches=6, rank=0, world_size=2))
    rank1 = captions(make_dataset(root, num_batches=6, rank=1, world_size=2))
    assert rank0 != rank1
    loader = DataLoader(make_dataset(root, num_batches=6), batch_size=None, num_workers=2)
    batches = list(loader)
    # the loader alternates workers: batches 0, 2, 4 from worker 0, 1, 3, 5 from worker 1
    worker0, worker1 = captions(batches[0::2]), captions(batches[1::2])
    assert worker0 != worker1


def test_fixed_batch_count_per_rank_with_workers(good_shards) -> None:
    root = str(good_shards[0].parent)
    for num_workers in (0, 1, 2):
        ds = make_dataset(root, num_batches=7)
        loader = DataLoader(ds, batch_size=None, num_workers=num_workers)
        assert len(loader) == 7
        assert len(list(loader)) == 7
    # a finite validation stream repeats its shards to give every rank the same count
    counts = [len(list(make_dataset(str(good_shards[0]), resample=False, num_batches=5, rank=r, world_size=3)))
              for r in range(3)]
    assert counts == [5, 5, 5]


def test_finite_mode_reads_every_sample_once_over_ranks_and_workers(good_shards) -> None:
    root = str(good_shards[0].parent)
    seen = []
    for rank in range(2):
        ds = make_dataset(root, resample=False, batch_size=3, rank=rank, world_size=2)
        seen += captions(DataLoader(ds, batch_size=None, num_workers=2))
    assert sorted(seen) == sorted(f"sample {i}" for i in range(32))


def test_multi_aspect_batches_hold_one_bucket(tmp_path: Path) -> None:
    shards = tmp_path / "mixed"
    shards.mkdir()
    samples = {f"w{i:03d}": good_sample(i, width=128, height=64) for i in range(12)}
    samples.update({f"t{i:03d}": good_sample(50 + i, width=64, height=128) for i in range(12)})
    write_tar(shards / "0.tar", samples)
    ds = make_dataset(str(shards), transform=ImageTransform(64, ratios=[1.0, 2.0]), resample=False)
    shapes = Counter(tuple(b["images"].shape[2:]) for b in ds)
    # 128x64 goes to the 2:1 bucket (96x32 at 64^2 area): H=32, W=96; the tall ones to 32x96
    assert shapes == Counter({(32, 96): 3, (96, 32): 3})


def test_all_rejected_stream_fails_early_with_spec_and_reasons(tmp_path: Path) -> None:
    root = tmp_path / "unsafe"
    root.mkdir()
    meta = json.dumps(dict(GOOD_META, punsafe=1.0)).encode()
    write_tar(root / "0.tar", {f"k{i}": {"jpg": image_bytes(), "txt": b"x", "json": meta} for i in range(5)})
    ds = make_dataset(str(root), max_tries=50)
    with pytest.raises(NoUsableSamplesError) as excinfo:
        next(iter(ds))
    message = str(excinfo.value)
    assert str(root) in message and "'unsafe'" in message and "50 tries" in message
    # the same through dataloader workers: the message reaches the main process
    with pytest.raises(NoUsableSamplesError, match="unsafe"):
        next(iter(DataLoader(make_dataset(str(root), max_tries=50), batch_size=None, num_workers=1)))


def test_unreadable_shards_fail_early_too(tmp_path: Path) -> None:
    ds = make_dataset("pipe:cat /nonexistent/{0..3}.tar", max_tries=20)
    with pytest.raises(NoUsableSamplesError, match="unreadable_shard"):
        next(iter(ds))
    empty = tmp_path / "empty"
    empty.mkdir()
    write_tar(empty / "0.tar", {})
    with pytest.raises(NoUsableSamplesError, match="empty_shard"):
        next(iter(make_dataset(str(empty), max_tries=20)))
    with pytest.raises(NoUsableSamplesError, match="hold no sample"):
        next(iter(make_dataset(str(empty), resample=False, num_batches=2)))


def test_no_match_fails_at_construction() -> None:
    with pytest.raises(ShardSpecError, match="nowhere"):
        make_dataset("/nowhere/{000..009}.tar")


def test_pipe_urls_and_pickling_for_worker_processes(good_shards) -> None:
    spec = "pipe:cat " + str(good_shards[0].parent) + "/{00000..00001}.tar"
    ds = make_dataset(spec, resample=False, batch_size=8)
    clone = pickle.loads(pickle.dumps(ds))
    assert sorted(captions(clone)) == sorted(f"sample {i}" for i in range(16))
