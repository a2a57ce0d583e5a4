"""The WebDataset stream: shards -> samples -> checks and plan -> per-bucket batches -> decode and transform.

Each (rank, dataloader worker) runs this pipeline on its own. Every random choice (which shard next, the shuffle
buffer, crop positions, random buckets) comes from generators seeded by ``(seed, restart_index, epoch, rank, worker)``,
so a run is reproducible, a resumed run either continues the same stream (``skip_batches``) or draws a fresh but
reproducible one (``restart_index + 1``), and ranks need no shard split.

Broken input never stops the stream. A sample that fails a check, or raises anything while it is read, planned or
decoded, is skipped and counted by reason, plus ``error/<ExceptionType>`` when an exception caused it. A shard that
cannot be read, stalls (``read_timeout``) or gives ``max_tries_per_shard`` rejects in a row is counted, and the stream
goes on with the next one. The counts travel with the batches (``batch["data_stats"]``) to the training process,
which logs them.

A sample goes through two steps. Its *plan* makes every check that needs no decoding (json, LAION filter, caption,
image header) and every random draw (bucket, crop position), which decides the batch it joins; its *render* decodes
and resamples. Batches form from plans, so a resumed pass replays the batches it skips from headers alone.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .crashes import InFlight
from .filters import LaionFilter
from .shards import ShardReader, ShardSpec, expand_shard_spec, resampled_shards, split_shards
from .transforms import ImageTransform

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# Every reason a sample or a shard is skipped; fixed so that counts from all ranks can be summed as one tensor.
REJECT_REASONS = (
    # shard level: unreadable, cut short, empty, malformed, stalled (read_timeout), only rejects (max_tries_per_shard)
    "unreadable_shard", "truncated_tar", "empty_shard", "tar_error", "stalled_shard", "bad_shard",
    # sample level; bad_sample: an exception outside the json, caption and image steps
    "bad_json", "missing_json", "missing_caption", "bad_caption", "missing_image", "bad_image", "bad_sample",
    # LAION filter (filters.LaionFilter.reason)
    "missing_size", "too_small", "too_large", "missing_aesthetic", "low_aesthetic", "missing_punsafe", "unsafe",
    "missing_pwatermark", "watermark",
    # caches of frozen networks' outputs (data.cached.CachedDataset)
    "missing_cache", "bad_cache", "wrong_cache_shape",
)
SHARD_REASONS = frozenset(REJECT_REASONS[:6])  # rare, and each names a shard to look at: always logged
# A reject that an exception caused is also counted under this prefix and the exception's type, e.g.
# ``error/UnidentifiedImageError``. These keys are open-ended and duplicate their reason's count: not a reason.
ERROR_PREFIX = "error/"


class NoUsableSamplesError(RuntimeError):
    """The stream produced no usable sample within the allowed number of tries."""


class Rejected(Exception):
    """Raised by a plan step: skip the sample and count it under ``reason``; ``detail`` None logs nothing (the
    filter's rejects are most of LAION and need no log line), ``error`` is the exception behind it, if any."""

    def __init__(self, reason: str, detail: str | None = "", error: BaseException | None = None) -> None:
        super().__init__(reason, detail)
        self.reason, self.detail, self.error = reason, detail, error


def describe(exn: BaseException) -> str:
    return f"{type(exn).__name__}: {exn}"


class RejectCounter:
    """Counts accepted samples and rejects by reason, and the tries that failed in a row: in the whole stream (over
    ``max_tries``: :class:`NoUsableSamplesError`) and per shard (at ``max_tries_per_shard``: the reader skips the rest
    of that shard, counted as ``bad_shard``)."""

    def __init__(self, spec: ShardSpec, max_tries: int, max_tries_per_shard: int | None = None) -> None:
        self.spec = spec
        self.max_tries = max_tries
        self.max_tries_per_shard = max_tries_per_shard
        self.totals: Counter[str] = Counter()
        self._delta: Counter[str] = Counter()
        self.since_good = 0
        self._shard_runs: dict[str, int] = {}  # rejects in a row, per shard
        self._given_up: set[str] = set()

    def start_shard(self, url: str) -> None:
        """A new read of ``url`` begins: its run of rejects starts over."""
        self._shard_runs[url] = 0
        self._given_up.discard(url)

    def gave_up(self, url: str) -> bool:
        return url in self._given_up

    def _count(self, key: str) -> None:
        self._delta[key] += 1
        self.totals[key] += 1

    def accept(self, shard: str | None = None) -> None:
        self.since_good = 0
        if shard is not None:
            self._shard_runs[shard] = 0
        self._count("accepted")

    def reject(self, reason: str, detail: str | None = "", shard: str | None = None,
               error: BaseException | None = None) -> None:
        """Count a reject (returns None, so ``return counter.reject(...)`` ends a step with no sample)."""
        assert reason in REJECT_REASONS, reason
        self._count(reason)
        if error is not None:
            self._count(ERROR_PREFIX + type(error).__name__)
        self.since_good += 1
        if detail and (reason in SHARD_REASONS or self.totals[reason] <= 3):
            log.warning("skipping (%s): %s", reason, detail)
        if shard is not None and reason not in SHARD_REASONS:
            self._count_in_shard(shard, reason)
        if self.since_good > self.max_tries:
            seen = {k: v for k, v in self.totals.items() if k != "accepted" and not k.startswith(ERROR_PREFIX)}
            raise NoUsableSamplesError(
                f"no usable sample from shard spec {self.spec!r} in {self.max_tries} tries in a row "
                f"(accepted so far: {self.totals['accepted']}); rejects by reason: {seen}. Check the shards and the "
                f"filter thresholds (data.filter.*), or raise data.max_tries."
            )

    def _count_in_shard(self, shard: str, reason: str) -> None:
        run = self._shard_runs[shard] = self._shard_runs.get(shard, 0) + 1
        if run == self.max_tries_per_shard:
            self._given_up.add(shard)
            self.reject("bad_shard", f"{shard}: {run} samples in a row rejected (the last as {reason}); skipping the "
                                     f"rest of this shard (data.max_tries_per_shard)")

    def take_delta(self) -> dict[str, int]:
        """Counts since the previous call (what one batch reports)."""
        delta, self._delta = dict(self._delta), Counter()
        return delta


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


def _with_tail_counts(batches: Iterator[dict[str, Any]], counter: RejectCounter) -> Iterator[dict[str, Any]]:
    """Hold each batch until the next one is formed, so that the last batch of a single pass also carries the counts
    made after it (the rejects at the end of the last shard would otherwise reach no batch)."""
    last = None
    for batch in batches:
        if last is not None:
            yield last
        last = batch
    if last is not None:
        for key, count in counter.take_delta().items():
            last["data_stats"][key] = last["data_stats"].get(key, 0) + count
        yield last


@dataclass
class Planned:
    """A sample that passed every check made without decoding, and what decoding it needs."""

    key: str
    shard: str | None
    group: Hashable  # the samples of one batch share it: the aspect bucket (a cache's: the exact array shapes)
    caption: str
    meta: dict[str, Any]
    source: Any  # what ``_render`` reads: (image bytes, CropPlan) here
    outputs: dict[str, torch.Tensor] | None = None  # set once rendered

    @property
    def where(self) -> str:
        return f"{self.key} in {self.shard}"


def read_json(raw: dict[str, Any], required: bool) -> dict[str, Any]:
    """The sample's json object ({} when absent and not ``required``)."""
    if "json" not in raw:
        if required:
            raise Rejected("missing_json")
        return {}
    try:
        meta = json.loads(raw["json"])
    except Exception as exn:  # not UTF-8, not JSON, nested beyond the recursion limit
        raise Rejected("bad_json", describe(exn), exn) from exn
    if not isinstance(meta, dict):
        raise Rejected("bad_json", f"json is a {type(meta).__name__}, not an object")
    return meta


def read_caption(raw: dict[str, Any], required: bool) -> str:
    caption = ""
    if "txt" in raw:
        try:
            caption = raw["txt"].decode("utf-8").strip()
        except Exception as exn:
            raise Rejected("bad_caption", describe(exn), exn) from exn
    if required and not caption:
        raise Rejected("missing_caption")
    return caption


class WebImageTextDataset(IterableDataset):
    """Batches of (image crops, compressor views, captions) from img2dataset-style WebDataset shards.

    Args:
        urls: shard spec (see :func:`~wuerstchen.data.shards.expand_shard_spec`).
        batch_size: samples per batch on one rank; batches hold one aspect bucket each.
        transform: the stage's :class:`~wuerstchen.data.transforms.ImageTransform`.
        filter: LAION metadata filter; ``None`` or a filter with every bound off accepts all. Its size check reads the
            json's sizes, else the image header (shards written without re-encoding store no size).
        resample: infinite stream of shards drawn with replacement (training); else each shard once, split over
            ranks and workers (validation).
        num_batches: batches per pass on this rank (``with_epoch``): split over the workers so the dataloader
            yields exactly this many, and finite streams repeat their shards to reach it. ``None`` with
            ``resample=False`` reads each shard once and emits the last partial batches.
        shuffle_buffer: raw samples held for the sample-level shuffle.
        require_caption: reject samples with a missing or empty caption (off for Stage A).
        max_tries: rejected samples or failed shards in a row before :class:`NoUsableSamplesError`.
        max_tries_per_shard: rejected samples in a row within one shard after which the rest of it is skipped and
            counted as ``bad_shard`` (a shard without metadata among good ones); None never gives up on a shard.
        read_timeout: seconds a ``pipe:`` shard may send nothing before it counts as ``stalled_shard``.
        seed, rank, world_size: stream identity; ``restart_index``, ``epoch`` and ``skip_batches`` are set per pass.

    ``skip_keys`` (``"KEY in SHARD"``) are rejected as ``bad_sample`` without being read: the samples a loader worker
    died on in an earlier attempt (``in_flight``, an :class:`InFlight` the loader sets, records what each worker reads).

    ``skip_batches`` resumes a pass at an exact position. Worker ids are rotated so the batches after the skipped ones
    come in the same worker order as in the uninterrupted pass, and each worker replays its share of the skipped
    batches from plans alone: it reads the tar members, makes every check and random draw a sample would make, reads
    the image header, and drops the sample without decoding it. The batches after the skip are those of the
    uninterrupted pass, bit for bit, and so are the counts they carry. The one exception: an image whose header
    reads but whose pixels are corrupt counts as accepted while skipped, where decoding would have rejected it, and
    the batches after it can then differ from the uninterrupted pass's.
    """

    _render_reason = "bad_image"  # what a sample counts as when decoding it raises

    def __init__(self, urls: ShardSpec, batch_size: int, transform: ImageTransform | None,
                 filter: LaionFilter | None = None, resample: bool = True, num_batches: int | None = None,
                 shuffle_buffer: int = 1000, require_caption: bool = True, max_tries: int = 10_000,
                 max_tries_per_shard: int | None = 1000, read_timeout: float = 120.0, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"num_batches must be >= 1 or None, got {num_batches}")
        if max_tries_per_shard is not None and max_tries_per_shard < 1:
            raise ValueError(f"max_tries_per_shard must be >= 1 or None, got {max_tries_per_shard}")
        if read_timeout <= 0:
            raise ValueError(f"read_timeout must be > 0 seconds, got {read_timeout}")
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
        self.max_tries_per_shard = None if max_tries_per_shard is None else int(max_tries_per_shard)
        self.read_timeout = float(read_timeout)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.restart_index = 0
        self.epoch = 0
        self.skip_batches = 0
        self.skip_keys: frozenset[str] = frozenset()
        self.in_flight: InFlight | None = None
        self._slot = 0

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
        self._slot = worker
        # The loader takes batches round-robin from worker 0 on: after k skipped batches, the next one belongs to
        # the uninterrupted pass's worker k % num_workers, so loader worker w plays that pass's worker (w + k) % n.
        worker = (worker + self.skip_batches) % num_workers
        skip = len(range(worker, self.skip_batches, num_workers))  # of this worker's own batches
        key = self.stream_key(worker)
        counter = RejectCounter(self.spec, self.max_tries, self.max_tries_per_shard)
        budget = None
        if self.num_batches is not None:
            budget = self.num_batches // num_workers + (worker < self.num_batches % num_workers)
            if budget == 0:
                return
        raw = self._raw_samples(worker, num_workers, random.Random(f"{key}/shards"), counter, repeat=budget is not None)
        raw = _shuffle(raw, self.shuffle_buffer, random.Random(f"{key}/shuffle"))
        augment_rng = random.Random(f"{key}/augment")
        plans = (p for p in (self._plan_or_reject(r, augment_rng, counter) for r in raw) if p is not None)
        batches = self._batches(plans, counter, budget, skip)
        # only a single pass can end with rejects after its last batch (a budget ends on a batch)
        yield from _with_tail_counts(batches, counter) if budget is None and not self.resample else batches

    def _raw_samples(self, worker: int, num_workers: int, rng: random.Random, counter: RejectCounter,
                     repeat: bool) -> Iterator[dict[str, Any]]:
        read_shard = ShardReader(counter, self.read_timeout)
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

    # -- plan: every check without decoding, and every random draw ------------------------------------------------
    def _plan_or_reject(self, raw: dict[str, Any], rng: random.Random, counter: RejectCounter) -> Planned | None:
        shard = raw.get("__url__")
        where = f"{raw.get('__key__')} in {shard}"
        if where in self.skip_keys:
            counter.reject("bad_sample", f"{where}: a loader worker died reading it in an earlier attempt", shard=shard)
            return None
        if self.in_flight is not None:
            self.in_flight.note(self._slot, where)
        try:
            return self._plan(raw, rng)
        except Rejected as rejected:
            detail = None if rejected.detail is None else f"{where}: {rejected.detail}" if rejected.detail else where
            counter.reject(rejected.reason, detail, shard=shard, error=rejected.error)
        except Exception as exn:  # input that no step anticipated: the sample goes, the worker stays
            counter.reject("bad_sample", f"{where}: {describe(exn)}", shard=shard, error=exn)
        finally:
            if self.in_flight is not None:
                self.in_flight.clear(self._slot)
        return None

    def _plan(self, raw: dict[str, Any], rng: random.Random) -> Planned:
        """Json, LAION filter, caption and image header, then the bucket and the crop box."""
        meta = read_json(raw, required=self.filter is not None)
        size_in_json = self.filter is not None and self.filter.json_size(meta) is not None
        if size_in_json:
            self._check_filter(meta)  # all from the json: no image access for the many filtered samples
        caption = read_caption(raw, self.require_caption)
        extension = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if extension is None:
            raise Rejected("missing_image")
        try:
            with Image.open(io.BytesIO(raw[extension])) as image:  # lazy: parses the header, decodes nothing
                size = image.size
        except Exception as exn:
            raise Rejected("bad_image", describe(exn), exn) from exn
        if self.filter is not None and not size_in_json:
            self._check_filter(meta, size)
        try:
            crop = self.transform.plan(*size, rng=rng)
        except Exception as exn:
            raise Rejected("bad_image", describe(exn), exn) from exn
        return Planned(raw["__key__"], raw.get("__url__"), crop.bucket, caption, meta, (raw[extension], crop))

    def _check_filter(self, meta: dict[str, Any], image_size: tuple[int, int] | None = None) -> None:
        if (reason := self.filter.reason(meta, image_size)) is not None:
            raise Rejected(reason, None)

    # -- render: decode and resample ------------------------------------------------------------------------------
    def _render(self, planned: Planned) -> dict[str, torch.Tensor]:
        data, crop = planned.source
        with Image.open(io.BytesIO(data)) as image:
            outputs = self.transform.render(image, crop)
        expected = {key: (3, h, w) for key, (w, h) in self.transform.output_sizes(crop.bucket).items()}
        got = {key: tuple(value.shape) for key, value in outputs.items()}
        if got != expected:  # a batch stacks them: a transform that broke its contract must not kill the worker
            raise ValueError(f"the transform gave {got} for bucket {crop.bucket}, expected {expected}")
        return outputs

    def _render_error(self, planned: Planned) -> Exception | None:
        """Render in place; the exception it raised, if any."""
        if self.in_flight is not None:
            self.in_flight.note(self._slot, planned.where)
        try:
            planned.outputs = self._render(planned)
        except Exception as exn:
            return exn
        finally:
            if self.in_flight is not None:
                self.in_flight.clear(self._slot)
        return None

    def _rendered(self, planned: Planned, counter: RejectCounter) -> bool:
        """Render and count: accepted, or rejected by what rendering raised."""
        error = self._render_error(planned)
        if error is None:
            counter.accept(planned.shard)
            return True
        counter.reject(self._render_reason, f"{planned.where}: {describe(error)}", shard=planned.shard, error=error)
        return False

    # -- batches --------------------------------------------------------------------------------------------------
    def _batches(self, plans: Iterator[Planned], counter: RejectCounter, budget: int | None,
                 skip: int = 0) -> Iterator[dict[str, Any]]:
        """Group samples by bucket and emit full batches; a finite single pass also emits the partial ones.

        The first ``skip`` batches form from plans and are dropped unrendered; each planned sample is counted as
        accepted where the uninterrupted pass counts it after rendering, and a dropped batch's counts go with it
        (the checkpointed totals of the pass that trained on it hold them).
        """
        pending: dict[Hashable, list[Planned]] = {}
        emitted = 0
        for planned in plans:
            if emitted < skip:
                counter.accept(planned.shard)
            elif not self._rendered(planned, counter):
                continue
            group = pending.setdefault(planned.group, [])
            group.append(planned)
            if len(group) < self.batch_size:
                continue
            del pending[planned.group]
            if emitted < skip:
                counter.take_delta()
                emitted += 1
                if emitted == skip:
                    self._render_waiting(pending)
            else:
                yield self._collate(group, counter)
                emitted += 1
            if budget is not None and emitted >= budget:
                return
        groups = list(pending.values())
        if emitted < skip:  # the pass ends inside the skipped part: so do some of its partial batches
            groups = groups[skip - emitted:]
            self._render_waiting({i: g for i, g in enumerate(groups)})
        for group in groups:
            if group:
                yield self._collate(group, counter)

    def _render_waiting(self, pending: dict[Hashable, list[Planned]]) -> None:
        """At the end of a skip, render the samples that wait in their groups for later batches. One that fails was
        counted as a reject before the resume point by the uninterrupted pass: it goes without a count."""
        for group in pending.values():
            group[:] = [p for p in group if self._render_error(p) is None]

    def _collate(self, group: Sequence[Planned], counter: RejectCounter) -> dict[str, Any]:
        batch: dict[str, Any] = {key: torch.stack([p.outputs[key] for p in group]) for key in group[0].outputs}
        batch["captions"] = [p.caption for p in group]
        batch["keys"] = [p.key for p in group]
        batch["meta"] = [p.meta for p in group]
        batch["data_stats"] = counter.take_delta()
        return batch


def world_from_env() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment, for use outside a Trainer."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
