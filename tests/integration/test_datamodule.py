"""The Lightning DataModule under a real Trainer: batch split, epochs, logged reject counts, resume, ranks."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from conftest import GOOD_META, good_sample, image_bytes, write_tar
from wuerstchen.data import LaionFilter
from wuerstchen.data.datamodule import DataStatsMonitor, WebDataModule
from wuerstchen.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from wuerstchen.training.checkpointing import Checkpointing


class Recorder(L.LightningModule):
    """Consumes batches with a one-parameter model and writes what it saw, per rank, to ``out``."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.out = out

    def training_step(self, batch, batch_idx):
        images, effnet = batch["images"], batch["effnet_images"]
        assert images.dtype == torch.float32 and 0.0 <= images.min() and images.max() <= 1.0
        lowest = (0.0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD)
        assert effnet.min() >= lowest - 1e-4 and effnet.min() < 0.0  # normalised, not in [0, 1]
        record = {"rank": self.global_rank, "epoch": self.current_epoch, "step": self.global_step,
                  "batch_size": len(batch["captions"]), "captions": batch["captions"]}
        with open(self.out / f"rank{self.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return (self.weight - images.mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def records(out: Path, rank: int = 0) -> list[dict]:
    return [json.loads(line) for line in (out / f"rank{rank}.jsonl").read_text().splitlines()]


def datamodule(urls: str, **kwargs) -> WebDataModule:
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("batches_per_epoch", 3)
    kwargs.setdefault("num_workers", 1)
    kwargs.setdefault("shuffle_buffer", 8)
    return WebDataModule(urls, image_size=64, filter=LaionFilter(), **kwargs)


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    kwargs.setdefault("max_steps", 6)
    return L.Trainer(accelerator="cpu", devices=kwargs.pop("devices", 1), logger=CSVLogger(tmp_path, name="logs"),
                     callbacks=[DataStatsMonitor()], log_every_n_steps=1, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, **kwargs)


@pytest.fixture
def mixed_shards(tmp_path: Path) -> str:
    """Good samples with one bad image and one unsafe sample in every shard."""
    root = tmp_path / "mixed"
    root.mkdir()
    meta = json.dumps(GOOD_META).encode()
    unsafe = json.dumps(dict(GOOD_META, punsafe=1.0)).encode()
    for shard in range(4):
        samples = {f"{shard}{i:03d}": good_sample(shard * 10 + i) for i in range(6)}
        samples[f"{shard}bad"] = {"jpg": b"garbage", "txt": b"bad", "json": meta}
        samples[f"{shard}unsafe"] = {"jpg": image_bytes(), "txt": b"unsafe", "json": unsafe}
        write_tar(root / f"{shard}.tar", samples)
    return str(root)


def test_global_batch_split_epochs_and_logged_rejects(mixed_shards: str, tmp_path: Path, caplog) -> None:
    out = tmp_path / "seen"
    out.mkdir()
    dm = datamodule(mixed_shards, batch_size=8, batches_per_epoch=4)
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, accumulate_grad_batches=2, max_steps=3).fit(Recorder(out), datamodule=dm)
    assert re.search(r"data after epoch 0: 16 samples accepted, \d+ rejected \{.*'bad_image'", caplog.text)
    seen = records(out)
    # global 8 = 1 rank x 2 accumulated micro-batches x 4; 3 optimizer steps = 6 micro-batches, 4 per epoch
    assert [r["batch_size"] for r in seen] == [4] * 6
    assert [r["epoch"] for r in seen] == [0, 0, 0, 0, 1, 1]
    assert [r["step"] for r in seen] == [0, 0, 1, 1, 2, 2]
    epoch0 = [c for r in seen[:2] for c in r["captions"]]
    epoch1 = [c for r in seen[4:] for c in r["captions"]]
    assert epoch0 != epoch1  # each epoch draws a new stream
    with open(Path(trainer_log_dir(tmp_path)) / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("data/accepted")]
    assert rows, "no data metrics logged"
    last = rows[-1]
    assert float(last["data/accepted"]) >= 16
    assert float(last["data/rejected/bad_image"]) >= 1 and float(last["data/rejected/unsafe"]) >= 1
    assert float(last["data/rejected"]) == float(last["data/rejected/bad_image"]) + float(
        last["data/rejected/unsafe"])


def trainer_log_dir(tmp_path: Path) -> str:
    versions = sorted((tmp_path / "logs").glob("version_*"))
    return str(versions[-1])


@pytest.mark.parametrize(("config", "key"), [({"batch_size": 5}, r"data\.batch_size=5"),
                                             ({"batches_per_epoch": 3}, r"data\.batches_per_epoch=3")])
def test_inconsistent_batch_config_names_the_key(good_shards, tmp_path: Path, config: dict, key: str) -> None:
    dm = datamodule(str(good_shards[0].parent), **config)
    with pytest.raises(ValueError, match=key):
        trainer(tmp_path, accumulate_grad_batches=2).fit(Recorder(tmp_path), datamodule=dm)


def captions_seen(out: Path, skip: int = 0) -> list[str]:
    return [c for r in records(out)[skip:] for c in r["captions"]]


def fit_and_save(urls: str, tmp_path: Path, name: str, steps: int, **dm_kwargs) -> Path:
    """Train ``steps`` steps; the checkpoint the training wrote at its last step (as a preempted run would)."""
    out = tmp_path / name
    out.mkdir()
    t = trainer(tmp_path / f"{name}_logs", max_steps=steps)
    t.callbacks.append(Checkpointing(str(tmp_path / f"{name}_ckpts"), every_n_steps=0))
    t.fit(Recorder(out), datamodule=datamodule(urls, **dm_kwargs))
    return tmp_path / f"{name}_ckpts" / f"step={steps:07d}.ckpt"


def resume_and_record(urls: str, tmp_path: Path, name: str, ckpt: Path, steps: int,
                      **dm_kwargs) -> tuple[WebDataModule, list[str]]:
    out = tmp_path / name
    out.mkdir()
    dm = datamodule(urls, **dm_kwargs)
    trainer(tmp_path / f"{name}_logs", max_steps=steps).fit(Recorder(out), datamodule=dm, ckpt_path=ckpt)
    return dm, captions_seen(out)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume_continues_the_stream_mid_epoch(good_shards, tmp_path: Path, num_workers: int) -> None:
    urls = str(good_shards[0].parent)
    kwargs = dict(num_workers=num_workers, batches_per_epoch=3)
    ckpt = fit_and_save(urls, tmp_path, "first", 4, **kwargs)  # stops after batch 1 of epoch 1
    state = torch.load(ckpt, weights_only=True)["WebDataModule"]
    assert (state["restart_index"], state["epoch"], state["epoch_batches"]) == (0, 1, 1)
    dm, resumed = resume_and_record(urls, tmp_path, "resumed", ckpt, 8, **kwargs)
    full = tmp_path / "full"
    full.mkdir()
    trainer(tmp_path / "full_logs", max_steps=8).fit(Recorder(full), datamodule=datamodule(urls, **kwargs))
    assert dm.restart_index == 0
    # batch 2 of epoch 1 onwards, in the uninterrupted order (with 2 workers: rotated worker ids)
    assert resumed == captions_seen(full, skip=4) and len(resumed) == 4 * 4


def test_restart_resume_draws_a_fresh_reproducible_stream(good_shards, tmp_path: Path) -> None:
    urls = str(good_shards[0].parent)
    ckpt = fit_and_save(urls, tmp_path, "first", 3, resume="restart")
    state = torch.load(ckpt, weights_only=True)["WebDataModule"]
    assert state["restart_index"] == 0 and state["data_stats"]["accepted"] >= 12
    resumed = []
    for name in ("r1", "r2"):
        dm, seen = resume_and_record(urls, tmp_path, name, ckpt, 6, resume="restart")
        assert dm.restart_index == 1
        resumed.append(seen)
    assert resumed[0] == resumed[1]  # a resumed stream is reproducible ...
    full = tmp_path / "full"
    full.mkdir()
    trainer(tmp_path / "full_logs", max_steps=6).fit(Recorder(full), datamodule=datamodule(urls))
    assert resumed[0] != captions_seen(full, skip=3)  # ... and fresh, not a replay of what would have come next


def test_two_ddp_ranks_read_different_samples_and_sum_their_counts(mixed_shards: str, tmp_path: Path) -> None:
    out = tmp_path / "seen"
    out.mkdir()
    dm = datamodule(mixed_shards, batch_size=8, num_workers=0)
    trainer(tmp_path, devices=2, strategy="ddp_spawn", max_steps=3).fit(Recorder(out), datamodule=dm)
    rank0, rank1 = records(out, 0), records(out, 1)
    assert [r["batch_size"] for r in rank0 + rank1] == [4] * 6  # 8 global over 2 ranks
    assert [c for r in rank0 for c in r["captions"]] != [c for r in rank1 for c in r["captions"]]
    with open(Path(trainer_log_dir(tmp_path)) / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("data/accepted")]
    # the logged count is the sum over both ranks: at least the 2 x 3 x 4 samples they consumed
    assert float(rows[-1]["data/accepted"]) >= 24
