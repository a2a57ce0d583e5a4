"""The WebDataset stream: shards -> samples -> LAION filter -> decode -> transform -> per-bucket batches.

Each (rank, dataloader worker) runs this pipeline on its own. Every random choice (which shard next, the shuffle
buffer, crop positions, random buckets) comes from generators seeded by ``(seed, restart_index, epoch, rank, worker)``,
so a run is reproducible, a resumed run either continues the same stream (``skip_batches``) or draws a fresh but
reproducible one (``restart_index + 1``), and ranks need no shard split. Broken input never stops the stream: it is
skipped and counted by reason, and the counts travel with the batches (``batch["data_stats"]``) to the training
process, which logs them.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import random
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from .filters import LaionFilter
from .shards import ShardSpec, expand_shard_spec, resampled_shards, split_shards
from .transforms import ImageTransform

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# Every reason a sample or a shard is skipped; fixed so that counts from all ranks can be summed as one tensor.
REJECT_REASONS = (
    # shard level
    "unreadable_shard", "truncated_tar", "empty_shard", "tar_error",
    # sample level
    "bad_json", "missing_json", "missing_caption", "bad_caption", "missing_image", "bad_image",
    # LAION filter (filters.LaionFilter.reason)
    "missing_size", "too_small", "too_large", "missing_aesthetic", "low_aesthetic", "missing_punsafe", "unsafe",
    "missing_pwatermark", "watermark",
    # caches of frozen networks' outputs (data.cached.CachedDataset)
    "missing_cache", "bad_cache",
)
_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)


class NoUsableSamplesError(RuntimeError):
    """The stream produced no usable sample within the allowed number of tries."""


class RejectCounter:
    """Counts accepted samples and rejects by reason, and how many tries failed since the last good sample."""

    def __init__(self, spec: ShardSpec, max_tries: int) -> None:
        self.spec = spec
        self.max_tries = max_tries
        self.totals: Counter[str] = Counter()
        self._delta: Counter[str] = Counter()
        self.since_good = 0

    def accept(self) -> None:
        self.since_good = 0
        self._delta["accepted"] += 1
        self.totals["accepted"] += 1

    def reject(self, reason: str, detail: str = "") -> None:
        """Count a reject (returns None, so ``return counter.reject(...)`` ends a decode with no sample)."""
        assert reason in REJECT_REASONS, reason
        self._delta[reason] += 1
        self.totals[reason] += 1
        self.since_good += 1
        if self.totals[reason] <= 3 and detail:
            log.warning("skipping (%s): %s", reason, detail)
        if self.since_good > self.max_tries:
            seen = {k: v for k, v in self.totals.items() if k != "accepted"}
            raise NoUsableSamplesError(
                f"no usable sample from shard spec {self.spec!r} in {self.max_tries} tries in a row "
                f"(accepted so far: {self.totals['accepted']}); rejects by reason: {seen}. Check the shards and the "
                f"filter thresholds (data.filter.*), or raise data.max_tries."
            )

    def take_delta(self) -> dict[str, int]:
        """Counts since the previous call (what one batch reports)."""
        delta, self._delta = dict(self._delta), Counter()
        return delta


def _classify_tar_error(exn: BaseException) -> str:
    message = str(exn)
    if isinstance(exn, FileNotFoundError | PermissionError | IsADirectoryError) or "empty file" in message:
        return "unreadable_shard"
    if isinstance(exn, tarfile.ReadError | EOFError) or "unexpected end" in message:
        return "truncated_tar"
    if isinstance(exn, OSError):
        return "unreadable_shard"
    return "tar_error"


class _ShardReader:
    """Reads one shard's samples with webdataset's tar iterators; counts at most one error per shard."""

    def __init__(self, counter: RejectCounter) -> None:
        self.counter = counter
        self._failed = False

    def _on_error(self, exn: BaseException) -> bool:
        if not self._failed:
            self._failed = True
            self.counter.reject(_classify_tar_error(exn), f"{type(exn).__name__}: {exn}")
        return True  # keep going: the rest of the stream is still good

    def __call__(self, url: str) -> Iterator[dict[str, Any]]:
        self._failed = False
        streams = url_opener([{"url": url}], handler=self._on_error)
        files = tar_file_expander(streams, handler=self._on_error)
        num_samples = 0
        for sample in group_by_keys(files, handler=self._on_error):
            num_samples += 1
            yield sample
        if num_samples == 0 and not self._failed:
            self.counter.reject("empty_shard", url)


def _shuffle(samples: Iterator[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    """Sample-level shuffle through a buffer of ``buffer_size`` raw samples."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[dict] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= buffer_size:
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


class WebImageTextDataset(IterableDataset):
    """Batches of (image crops, compressor views, captions) from img2dataset-style WebDataset shards.

    Args:
        urls: shard spec (see :func:`~wuerstchen.data.shards.expand_shard_spec`).
        batch_size: samples per batch on one rank; batches hold one aspect bucket each.
        transform: the stage's :class:`~wuerstchen.data.transforms.ImageTransform`.
        filter: LAION metadata filter; ``None`` or a filter with every bound off accepts all.
        resample: infinite stream of shards drawn with replacement (training); else each shard once, split over
            ranks and workers (validation).
        num_batches: batches per pass on this rank (``with_epoch``): split over the workers so the dataloader
            yields exactly this many, and finite streams repeat their shards to reach it. ``None`` with
            ``resample=False`` reads each shard once and emits the last partial batches.
        shuffle_buffer: raw samples held for the sample-level shuffle.
        require_caption: reject samples with a missing or empty caption (off for Stage A).
        max_tries: rejected samples or failed shards in a row before :class:`NoUsableSamplesError`.
        seed, rank, world_size: stream identity; ``restart_index``, ``epoch`` and ``skip_batches`` are set per pass.

    ``skip_batches`` resumes a pass at an exact position: the first ``skip_batches`` batches the data loader would
    yield are produced and dropped (they cost their decoding once), and worker ids are rotated so the batches after
    them come in the same worker order as in the uninterrupted pass.
    """

    def __init__(self, urls: ShardSpec, batch_size: int, transform: ImageTransform,
                 filter: LaionFilter | None = None, resample: bool = True, num_batches: int | None = None,
                 shuffle_buffer: int = 1000, require_caption: bool = True, max_tries: int = 10_000, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"num_batches must be >= 1 or None, got {num_batches}")
        self.spec = urls if isinstance(urls, str) else [str(u) for u in urls]
        self.urls = expand_shard_spec(self.spec)
        self.batch_size = int(batch_size)
        self.transform = transform
        self.filter = filter if filter is not None and filter.enabled else None
        self.resample = resample
        self.num_batches = num_batches
        self.shuffle_buffer = int(shuffle_buffer)
        self.require_caption = require_caption
        self.max_tries = int(max_tries)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.restart_index = 0
        self.epoch = 0
        self.skip_batches = 0

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("a stream without num_batches has no length")
        return self.num_batches

    def stream_key(self, worker: int) -> str:
        """Seed material of one worker's stream."""
        return f"{self.seed}/{self.restart_index}/{self.epoch}/{self.rank}/{worker}"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The loader takes batches round-robin from worker 0 on: after k skipped batches, the next one belongs to
        # the uninterrupted pass's worker k % num_workers, so loader worker w plays that pass's worker (w + k) % n.
        worker = (worker + self.skip_batches) % num_workers
        skip = len(range(worker, self.skip_batches, num_workers))  # of this worker's own batches
        key = self.stream_key(worker)
        counter = RejectCounter(self.spec, self.max_tries)
        budget = None
        if self.num_batches is not None:
            budget = self.num_batches // num_workers + (worker < self.num_batches % num_workers)
            if budget == 0:
                return
        raw = self._raw_samples(worker, num_workers, random.Random(f"{key}/shards"), counter, repeat=budget is not None)
        raw = _shuffle(raw, self.shuffle_buffer, random.Random(f"{key}/shuffle"))
        augment_rng = random.Random(f"{key}/augment")
        samples = (s for s in (self._decode(r, augment_rng, counter) for r in raw) if s is not None)
        yield from itertools.islice(self._batches(samples, counter, budget), skip, None)

    def _raw_samples(self, worker: int, num_workers: int, rng: random.Random, counter: RejectCounter,
                     repeat: bool) -> Iterator[dict[str, Any]]:
        read_shard = _ShardReader(counter)
        if self.resample:
            for url in resampled_shards(self.urls, rng):
                yield from read_shard(url)
            return
        urls = split_shards(self.urls, self.rank, self.world_size, worker, num_workers)
        while True:
            num_raw = 0
            for url in urls:
                for sample in read_shard(url):
                    num_raw += 1
                    yield sample
            if not repeat:
                return
            if num_raw == 0:  # repeating would spin forever; all-rejected samples hit max_tries instead
                raise NoUsableSamplesError(
                    f"shards {urls} of spec {self.spec!r} hold no sample; rejects by reason: "
                    f"{ {k: v for k, v in counter.totals.items() if k != 'accepted'} }"
                )

    def _decode(self, raw: dict[str, Any], rng: random.Random, counter: RejectCounter) -> dict[str, Any] | None:
        """Filter on the json, then decode caption and image; None (and a count) for anything unusable."""
        where = f"{raw.get('__key__')} in {raw.get('__url__')}"
        meta: dict[str, Any] = {}
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
                if not isinstance(meta, dict):
                    raise ValueError(f"json is a {type(meta).__name__}, not an object")
            except (ValueError, UnicodeDecodeError) as exn:
                return counter.reject("bad_json", f"{where}: {exn}")
        elif self.filter is not None:
            return counter.reject("missing_json", where)
        if self.filter is not None and (reason := self.filter.reason(meta)) is not None:
            return counter.reject(reason)
        caption = ""
        if "txt" in raw:
            try:
                caption = raw["txt"].decode("utf-8").strip()
            except UnicodeDecodeError as exn:
                return counter.reject("bad_caption", f"{where}: {exn}")
        if self.require_caption and not caption:
            return counter.reject("missing_caption", where)
        extension = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if extension is None:
            return counter.reject("missing_image", where)
        try:
            with Image.open(io.BytesIO(raw[extension])) as image:
                bucket, outputs = self.transform(image, rng)
        except _PIL_ERRORS as exn:
            return counter.reject("bad_image", f"{where}: {type(exn).__name__}: {exn}")
        counter.accept()
        return {"bucket": bucket, "outputs": outputs, "caption": caption, "key": raw["__key__"], "meta": meta}

    def _batches(self, samples: Iterator[dict[str, Any]], counter: RejectCounter,
                 budget: int | None) -> Iterator[dict[str, Any]]:
        """Group samples by bucket and emit full batches; a finite single pass also emits the partial ones."""
        pending: dict[tuple[int, int], list[dict[str, Any]]] = {}
        emitted = 0
        for sample in samples:
            group = pending.setdefault(sample["bucket"], [])
            group.append(sample)
            if len(group) == self.batch_size:
                yield self._collate(pending.pop(sample["bucket"]), counter)
                emitted += 1
                if budget is not None and emitted >= budget:
                    return
        for group in pending.values():
            yield self._collate(group, counter)

    @staticmethod
    def _collate(group: Sequence[dict[str, Any]], counter: RejectCounter) -> dict[str, Any]:
        batch: dict[str, Any] = {key: torch.stack([s["outputs"][key] for s in group]) for key in group[0]["outputs"]}
        batch["captions"] = [s["caption"] for s in group]
        batch["keys"] = [s["key"] for s in group]
        batch["meta"] = [s["meta"] for s in group]
        batch["data_stats"] = counter.take_delta()
        return batch


def world_from_env() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment, for use outside a Trainer."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
