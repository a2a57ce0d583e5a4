"""Bad data at LAION scale: exceptions nobody anticipated, shards without sizes, all-bad and stalled shards, and a
resumed pass that skips batches without decoding them."""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from conftest import GOOD_META, good_sample, image_bytes, write_tar
from wuerstchen.data import ImageTransform, LaionFilter, NoUsableSamplesError, WebImageTextDataset


def totals(batches) -> Counter:
    out: Counter = Counter()
    for batch in batches:
        out.update(batch["data_stats"])
    return out


def captions(batches) -> list[str]:
    return [c for b in batches for c in b["captions"]]


# -- any exception in one sample skips that sample, counted by its type, inside real loader workers ----------------
class BoomError(Exception):
    """What a third-party decoder might raise: no PIL error type, no OSError."""


class BoomImageFile(ImageFile.ImageFile):
    """A PIL plugin for b"BOOM" + width + height: the header reads, decoding raises BoomError."""

    format = "BOOM"

    def _open(self) -> None:
        width, height = struct.unpack(">HH", self.fp.read(8)[4:])
        self._size, self._mode = (width, height), "RGB"

    def load(self):
        raise BoomError("the decoder gave up")


Image.register_open(BoomImageFile.format, BoomImageFile, lambda prefix: prefix[:4] == b"BOOM")


class PlanError(Exception):
    pass


class PickyTransform(ImageTransform):
    """A transform subclass that fails on images 97 px wide."""

    def plan(self, width, height, rng=None):
        if width == 97:
            raise PlanError(f"{width}x{height}")
        return super().plan(width, height, rng)


class FragileFilter(LaionFilter):
    """A filter subclass that trips over one json key (outside the json, caption and image steps)."""

    def reason(self, meta, image_size=None):
        if "trip" in meta:
            raise KeyError("trip")
        return super().reason(meta, image_size)


def test_unknown_exceptions_are_counted_by_type_and_workers_survive(tmp_path: Path) -> None:
    meta = json.dumps(GOOD_META).encode()
    for shard in range(2):
        samples = {f"{shard}g{i}": good_sample(10 * shard + i) for i in range(6)}
        samples.update({f"{shard}boom{i}": {"jpg": b"BOOM" + struct.pack(">HH", 96, 64), "txt": b"boom", "json": meta}
                        for i in range(2)})
        samples[f"{shard}picky"] = {"jpg": image_bytes(97, 64), "txt": b"picky", "json": meta}
        samples[f"{shard}trip"] = {"jpg": image_bytes(), "txt": b"trip", "json": json.dumps(dict(GOOD_META, trip=1))
                                   .encode()}
        write_tar(tmp_path / f"{shard}.tar", samples)
    dataset = WebImageTextDataset(str(tmp_path), batch_size=2, transform=PickyTransform(64), filter=FragileFilter(),
                                  resample=False, shuffle_buffer=0)
    batches = list(DataLoader(dataset, batch_size=None, num_workers=2))
    assert sorted(captions(batches)) == sorted(f"sample {i}" for i in list(range(6)) + list(range(10, 16)))
    got = totals(batches)
    assert got["accepted"] == 12
    assert (got["bad_image"], got["error/BoomError"], got["error/PlanError"]) == (2 * 3, 2 * 2, 2)
    assert (got["bad_sample"], got["error/KeyError"]) == (2, 2)


# -- shards that real tools write: no sizes in the json ------------------------------------------------------------
def test_shards_without_sizes_in_the_json_use_laion_columns_or_the_header(tmp_path: Path, monkeypatch) -> None:
    """img2dataset --disable_all_reencoding stores no width/height: the filter reads WIDTH/HEIGHT when saved, else
    the header, and a sample it rejects by size is never decoded."""
    scores = {k: v for k, v in GOOD_META.items() if not k.startswith("original")}
    samples = {}
    for i in range(6):  # header 96x64: passes min_size 64
        samples[f"ok{i}"] = {"jpg": image_bytes(96, 64, seed=i), "txt": f"ok {i}".encode(),
                             "json": json.dumps(scores).encode()}
    samples["small"] = {"jpg": image_bytes(60, 40), "txt": b"small", "json": json.dumps(scores).encode()}
    samples["laion_small"] = {"jpg": image_bytes(96, 64), "txt": b"laion small",  # LAION's columns win
                              "json": json.dumps(dict(scores, WIDTH=50, HEIGHT=50)).encode()}
    samples["laion_ok"] = {"jpg": image_bytes(60, 40), "txt": b"laion ok",
                           "json": json.dumps(dict(scores, WIDTH=800, HEIGHT=600)).encode()}
    write_tar(tmp_path / "0.tar", samples)
    loads = count_decodes(monkeypatch)
    dataset = WebImageTextDataset(str(tmp_path), batch_size=1, transform=ImageTransform(64),
                                  filter=LaionFilter(min_size=64), resample=False, shuffle_buffer=0)
    batches = list(dataset)
    assert sorted(captions(batches)) == sorted([f"ok {i}" for i in range(6)] + ["laion ok"])
    got = totals(batches)
    assert got["too_small"] == 2 and got["missing_size"] == 0 and got["accepted"] == 7
    assert loads["count"] == 7  # the two small ones: header only


# -- one all-bad shard among good ones is skipped; an all-bad stream still fails ------------------------------------
@pytest.fixture
def one_bad_shard(tmp_path: Path) -> tuple[str, Path]:
    """Three good shards of 8 and one of 60 samples whose json has no aesthetic score (the filter rejects them all)."""
    root = tmp_path / "mixed"
    root.mkdir()
    for shard in range(3):
        write_tar(root / f"{shard}.tar", {f"{shard}{i:03d}": good_sample(shard * 8 + i) for i in range(8)})
    no_scores = json.dumps({k: v for k, v in GOOD_META.items() if k != "aesthetic"}).encode()
    bad = write_tar(root / "3.tar", {f"3{i:03d}": {"jpg": image_bytes(), "txt": b"x", "json": no_scores}
                                     for i in range(60)})
    return str(root), bad


def test_an_all_bad_shard_is_reported_and_skipped(one_bad_shard, caplog) -> None:
    root, bad = one_bad_shard
    kwargs = dict(batch_size=4, transform=ImageTransform(64), filter=LaionFilter(), shuffle_buffer=4, max_tries=40)
    with caplog.at_level(logging.WARNING):
        batches = list(WebImageTextDataset(root, num_batches=20, max_tries_per_shard=10, **kwargs))
    got = totals(batches)
    assert len(batches) == 20 and got["accepted"] == 80 and got["bad_shard"] >= 1
    # each read of the bad shard stops after 10 rejects in a row, plus what the shuffle buffer already held
    assert got["missing_aesthetic"] <= got["bad_shard"] * (10 + 4)
    assert f"{bad}: 10 samples in a row rejected" in caplog.text and "max_tries_per_shard" in caplog.text
    # without the per-shard limit the same stream dies at its first read of the bad shard
    with pytest.raises(NoUsableSamplesError):
        list(WebImageTextDataset(root, num_batches=20, max_tries_per_shard=None, **kwargs))
    # a single pass: every good sample, exactly 10 rejects of the bad shard
    single = list(WebImageTextDataset(root, resample=False, max_tries_per_shard=10,
                                      **dict(kwargs, shuffle_buffer=0)))
    got = totals(single)
    assert got["accepted"] == 24 and got["missing_aesthetic"] == 10 and got["bad_shard"] == 1


def test_a_stream_of_only_bad_shards_still_fails(one_bad_shard) -> None:
    _, bad = one_bad_shard
    dataset = WebImageTextDataset([str(bad)], batch_size=4, transform=ImageTransform(64), filter=LaionFilter(),
                                  max_tries=40, max_tries_per_shard=10)
    with pytest.raises(NoUsableSamplesError, match="'bad_shard'") as excinfo:
        next(iter(dataset))
    assert "40 tries" in str(excinfo.value)


# -- stalled pipe: streams ------------------------------------------------------------------------------------------
STALL = "sleep 987.654"  # a command line no other process has, to find leftovers


def leftover_stalls(wait: float = 5.0) -> list[int]:
    """Live processes of the stalled commands, once SIGKILL had up to ``wait`` seconds to land (it is asynchronous:
    the shell that was waited for can be gone while its ``sleep`` is still being killed)."""
    deadline = time.monotonic() + wait
    while (pids := _stall_pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def _stall_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"987.654" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # gone meanwhile
            pass
    return pids


def test_stalled_pipes_are_timed_out_counted_and_skipped(good_shards, tmp_path: Path, caplog) -> None:
    g0, g1, g2 = good_shards[:3]
    half = g2.stat().st_size // 2  # about 4 complete samples of 8, then silence
    sid_file = tmp_path / "sid"
    urls = [f"pipe:{sys.executable} -c 'import os; open(\"{sid_file}\", \"w\").write(str(os.getsid(0)))'; cat {g0}",
            f"pipe:{STALL}", f"pipe:cat {g1}", f"pipe:head -c {half} {g2}; {STALL}"]
    dataset = WebImageTextDataset(urls, batch_size=1, transform=ImageTransform(64), filter=LaionFilter(),
                                  resample=False, shuffle_buffer=0, read_timeout=0.5)
    with caplog.at_level(logging.WARNING):
        batches = list(dataset)  # before the read timeout, this waited for the first stalled command forever
    got = totals(batches)
    names = captions(batches)
    assert got["stalled_shard"] == 2
    assert set(names) >= {f"sample {i}" for i in range(16)}  # g0 and g1 whole
    assert 2 <= len(names) - 16 < 8  # and the complete samples g2 sent before it stalled
    assert f"pipe:{STALL}: no data for 0.5 s (data.read_timeout)" in caplog.text
    assert leftover_stalls() == []  # the stalled commands were killed, children and all
    # pipe: commands run in a session of their own: a signal to the training job's process group misses them
    assert int(sid_file.read_text()) != os.getsid(0)


# -- exact resume: skipped batches come from plans, undecoded -------------------------------------------------------
@pytest.fixture
def varied_shards(tmp_path: Path) -> str:
    """Three shards of wide, tall and square images, with a few samples the checks reject."""
    root = tmp_path / "varied"
    root.mkdir()
    sizes = [(96, 64), (64, 96), (80, 80), (128, 64), (64, 128), (70, 90)]
    unsafe = json.dumps(dict(GOOD_META, punsafe=1.0)).encode()
    for shard in range(3):
        samples = {f"{shard}{i:03d}": good_sample(30 * shard + i, *sizes[(i + shard) % len(sizes)])
                   for i in range(24)}
        samples[f"{shard}unsafe"] = {"jpg": image_bytes(), "txt": b"unsafe", "json": unsafe}
        samples[f"{shard}broken"] = {"jpg": b"\xff\xd8 no jpeg", "txt": b"broken",
                                     "json": json.dumps(GOOD_META).encode()}
        samples[f"{shard}nocaption"] = {"jpg": image_bytes(), "json": json.dumps(GOOD_META).encode()}
        write_tar(root / f"{shard}.tar", samples)
    return str(root)


def skip_dataset(urls: str, multi_aspect: bool) -> WebImageTextDataset:
    transform = (ImageTransform.multi_aspect(64, random_ratio_prob=0.3) if multi_aspect else ImageTransform(64))
    return WebImageTextDataset(urls, batch_size=3, transform=transform, filter=LaionFilter(), num_batches=12,
                               shuffle_buffer=8, seed=5)


@pytest.mark.parametrize("multi_aspect", [False, True])
def test_skipped_batches_leave_the_rest_of_the_pass_bitwise_unchanged(varied_shards: str, multi_aspect: bool) -> None:
    def loader(skip: int) -> list[dict]:
        dataset = skip_dataset(varied_shards, multi_aspect)
        dataset.epoch, dataset.skip_batches = 1, skip
        return list(DataLoader(dataset, batch_size=None, num_workers=2))

    full = loader(0)
    assert len(full) == 12 and totals(full)["accepted"] >= 36  # and those still waiting for their bucket to fill
    assert totals(full)["unsafe"] > 0  # rejects happen inside the skipped part too
    if multi_aspect:
        assert len({tuple(b["images"].shape[2:]) for b in full}) >= 3
    for skip in (1, 5):
        resumed = loader(skip)
        assert len(resumed) == 12 - skip
        for got, want in zip(resumed, full[skip:]):
            assert got["keys"] == want["keys"] and got["captions"] == want["captions"]
            assert torch.equal(got["images"], want["images"]) and torch.equal(got["effnet_images"],
                                                                              want["effnet_images"])
            assert got["data_stats"] == want["data_stats"]


def count_decodes(monkeypatch) -> dict[str, int]:
    """Count PIL's pixel decoding (``ImageFile.load``) in this process; it still decodes."""
    counts = {"count": 0}
    load = ImageFile.ImageFile.load

    def counting_load(self):
        counts["count"] += bool(self.tile)  # loading a loaded image (convert() and copy() do) decodes nothing
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    return counts


def test_skipping_decodes_nothing_it_drops(varied_shards: str, monkeypatch) -> None:
    loads = count_decodes(monkeypatch)
    full = list(skip_dataset(varied_shards, multi_aspect=True))
    decoded_full = loads["count"]
    loads["count"] = 0
    dataset = skip_dataset(varied_shards, multi_aspect=True)
    dataset.skip_batches = 7
    resumed = list(dataset)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in full[7:]]
    # every sample of the 7 dropped batches was planned from its header and never decoded
    assert loads["count"] == decoded_full - 7 * 3


# -- a sample that kills its loader worker outside Python is skipped by the next attempt --------------------------
POISON = """
import os, runpy, signal, sys
from pathlib import Path
from torch.utils.data import get_worker_info
from wuerstchen.data.pipeline import WebImageTextDataset

record = Path(os.environ["POISON_FILE"])  # the poisoned sample: the 12th one a worker renders in the first attempt
original = WebImageTextDataset._render
renders = 0

def render(self, planned):
    global renders
    renders += 1
    info = get_worker_info()
    if not record.exists() and renders == 12 and info is not None and info.id == 0:  # one worker picks it
        record.write_text(planned.where)
    if record.exists() and record.read_text() == planned.where:
        os.kill(os.getpid(), signal.SIGSEGV)  # what a decoder's segfault does to the worker
    return original(self, planned)

WebImageTextDataset._render = render
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_sample_that_kills_its_worker_is_skipped_by_the_next_attempt(shards: Path, tmp_path: Path) -> None:
    import subprocess

    from helpers import ROOT, SIZE, metric_rows

    from wuerstchen.training.checkpointing import complete_checkpoints

    wrapper, poison = tmp_path / "poison.py", tmp_path / "poisoned_sample"
    wrapper.write_text(POISON)
    run_dir = tmp_path / "run"
    args = [str(wrapper), str(ROOT / "scripts" / "train.py"), "experiment=demo_stage_a", "stage.stage_a.c_hidden=16",
            "stage.latent_scale_images=32", "data.batch_size=4", f"data.image_size={SIZE}",
            f"data.urls={shards / 'train'}", "data.val_urls=null", "data.num_workers=2", "data.batches_per_epoch=10", "trainer.max_steps=24", "trainer.log_every_n_steps=1",
            "callbacks.checkpoint.every_n_steps=4", "callbacks.preview=null", "callbacks.progress.refresh_rate=0",
            f"run_dir={run_dir}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "POISON_FILE": str(poison)}
    first = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    first_log = first.stderr + first.stdout
    assert first.returncode != 0 and "DataLoader worker" in first_log, first_log[-3000:]
    where = poison.read_text()
    assert (run_dir / "data_crash.json").is_file(), first_log[-3000:]
    record = json.loads((run_dir / "data_crash.json").read_text())
    assert record["skip_keys"] == [where], record
    second = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    assert "skipping 1 sample(s) it was reading" in log and where in log
    assert complete_checkpoints(run_dir / "checkpoints")[-1][0] == 24
    rejected = [float(r["data/rejected/bad_sample"]) for r in metric_rows(run_dir) if r.get("data/rejected/bad_sample")]
    assert rejected and max(rejected) == 1.0
