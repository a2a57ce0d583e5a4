"""Lightning wiring of the WebDataset pipeline: per-rank batch size, fixed batch counts, stream state, data logs."""

from __future__ import annotations

import logging
import os
import signal
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import lightning as L
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.utilities import rank_zero_info
import torch
from torch.utils.data import DataLoader

from .buckets import BASE_MULTIPLE, resolve_multiple
from .cached import CachedDataset, cache_root
from .crashes import InFlight, LoaderCrashes, dead_worker_pids
from .filters import LaionFilter
from .pipeline import ERROR_PREFIX, REJECT_REASONS, WebImageTextDataset
from .shards import ShardSpec
from .transforms import ImageTransform, to_model_inputs

log = logging.getLogger(__name__)


def _plain(spec: Any) -> ShardSpec | None:
    """A shard spec as a str or a list of str (Hydra hands over ListConfig, which pickles slowly into workers)."""
    if spec is None or isinstance(spec, str):
        return spec
    return [str(s) for s in spec]


def loader_worker_init(worker_id: int, rank: int = 0) -> None:
    """``worker_init_fn`` of our loaders: Lightning's worker seeding (under ``seed_everything(workers=True)``), and
    SIGUSR1 / SIGTERM ignored. Slurm signals every process of a job step; the workers must survive them so that the
    training process (``training.preemption``) can finish its step, save and stop them itself."""
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id, rank)
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


class StreamLoader(DataLoader):
    """DataLoader that tells its stream which (restart index, epoch, batches to skip) a pass belongs to.

    An IterableDataset replays the same stream every time it is iterated; the epoch must reach the worker processes
    for each pass to differ. Workers receive a fresh copy of the dataset at every ``iter()`` (which is why
    ``persistent_workers`` stays off), so setting the attributes just before is enough.
    """

    def __init__(self, dataset: WebImageTextDataset, position: Callable[[], tuple[int, int, int]], rank: int = 0,
                 **kwargs: Any) -> None:
        if kwargs.get("persistent_workers"):
            raise ValueError("persistent_workers would freeze the stream's epoch; leave it off")
        kwargs.setdefault("worker_init_fn", partial(loader_worker_init, rank=rank))
        # worker base seeds from a private generator: iterating must not advance the global RNG that training
        # draws noise from, or a resumed run (which iterates once more) would diverge from an uninterrupted one
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        super().__init__(dataset, batch_size=None, **kwargs)
        self._position = position

    def __iter__(self):
        self.dataset.restart_index, self.dataset.epoch, self.dataset.skip_batches = self._position()
        if self.num_workers and self.dataset.in_flight is None:  # before the workers fork, so they share it
            self.dataset.in_flight = InFlight()
        return super().__iter__()

    # Resumable (Lightning's _Stateful protocol): the stream position itself is checkpointed by WebDataModule (which
    # also knows the epoch and the batches already trained), so the loader has nothing of its own to store.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class WebDataModule(L.LightningDataModule):
    """Train and validation loaders over img2dataset-style shards for one stage.

    Args:
        urls / val_urls: shard specs (brace pattern, list, directory, ``pipe:`` command); no validation loader when
            ``val_urls`` is None.
        batch_size: the global batch; each rank takes ``batch_size / (world_size * accumulate_grad_batches)``.
        image_size: training side (square crops) or the side of the bucket area (multi-aspect), a multiple of
            ``multiple``.
        multiple: the buckets' sides are multiples of it. None asks the stage when the trainer sets up
            (``StageModule.pixel_multiple``, at least 32: 64 for the released Stage B, whose U-Net halves the f4
            latent's patches three times); a value must be a multiple of the stage's. A cache keeps the multiple it
            was written with (``cache_info.json``), which must satisfy the stage.
        outputs: what the stage needs: ``images`` (Stage A/B crops in [0, 1]) and/or ``effnet_images`` (the
            compressor's ImageNet-normalised view at ``effnet_scale`` x the side).
        ratios / random_ratio_prob: aspect buckets (``[1]``: square crops) and the chance of a random bucket.
        jpeg_draft: let the JPEG decoder decode large sources at 1/2, 1/4 or 1/8 scale when the crop allows
            (``ImageTransform``; 2-6x more samples per worker on 2048-4096 px sources at 47-53 dB PSNR against a full
            decode, docs/benchmarks.md); false decodes every image at full size.
        filter: LAION metadata filter for both splits; None accepts everything.
        batches_per_epoch: batches per rank and epoch of the resampled training stream (``with_epoch``); every rank
            gets the same count, so no rank waits at an epoch end. None gives an endless epoch (stop on max_steps).
        val_batches: batches per rank in one validation pass (the shards repeat to reach it); None reads each
            validation shard once, which is only hang-free on a single rank.
        restart_index: the stream's restart counter (part of its seed).
        cached: the shards are a cache written by ``scripts/cache_latents.py`` (frozen networks' outputs; the
            transform ran when it was written): batches hold what the cache holds (``latents``, ``clip``,
            ``stage_a_latents``, ``effnet_images``; see ``data.cached``) and ``empty_clip``.
        max_tries: rejected samples in a row (over all shards) before the run stops with the reasons seen.
        max_tries_per_shard: rejected samples in a row within one shard before the rest of that shard is skipped
            (counted as ``bad_shard``, with a warning naming it): one shard without metadata is not fatal.
        read_timeout: seconds a ``pipe:`` shard may send nothing before it counts as ``stalled_shard``.
        resume: what a checkpoint restores. ``exact``: the stream continues at the batch after the last trained one
            (the skipped part of the epoch is replayed from tar members and image headers, nothing decoded);
            ``restart``: the restart index goes up by one, a fresh stream still set by the seed, no skipping.
    """

    def __init__(self, urls: ShardSpec, batch_size: int, image_size: int,
                 outputs: Sequence[str] = ("images", "effnet_images"), ratios: Sequence[float] = (1.0,),
                 random_ratio_prob: float = 0.0, effnet_scale: float | None = 0.75, val_urls: ShardSpec | None = None,
                 filter: LaionFilter | None = None, batches_per_epoch: int | None = None,
                 val_batches: int | None = None, val_batch_size: int | None = None, num_workers: int = 4,
                 shuffle_buffer: int = 1000, require_caption: bool = True, max_tries: int = 10_000,
                 max_tries_per_shard: int | None = 1000, read_timeout: float = 120.0, seed: int = 0,
                 pin_memory: bool | None = None, prefetch_factor: int | None = None, restart_index: int = 0,
                 resume: str = "exact", cached: bool = False, multiple: int | None = None,
                 jpeg_draft: bool = True) -> None:
        super().__init__()
        self.cached = bool(cached)
        self.multiple = None if multiple is None else int(multiple)
        self.urls = _plain(urls)
        self.val_urls = _plain(val_urls)
        self.batch_size = int(batch_size)
        self.train_transform = self.val_transform = None  # a cache holds the transform's results already
        self._transform = dict(image_size=int(image_size), outputs=tuple(outputs), ratios=[float(r) for r in ratios],
                               effnet_scale=None if effnet_scale is None else float(effnet_scale),
                               random_ratio_prob=float(random_ratio_prob), jpeg_draft=bool(jpeg_draft))
        if not self.cached:  # until the stage says what it needs (setup): data.multiple or 32
            self._build_transforms(resolve_multiple(self.multiple, 1))
        self.filter = filter
        self.batches_per_epoch, self.val_batches = batches_per_epoch, val_batches
        self.val_batch_size = val_batch_size
        self.num_workers = int(num_workers)
        self.shuffle_buffer, self.require_caption, self.max_tries = shuffle_buffer, require_caption, max_tries
        self.max_tries_per_shard, self.read_timeout = max_tries_per_shard, float(read_timeout)
        self.seed = int(seed)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self.restart_index = int(restart_index)
        if resume not in ("exact", "restart"):
            raise ValueError(f"data.resume={resume!r}: expected 'exact' or 'restart'")
        self.resume = resume
        self._epoch = 0  # the training pass in progress and the batches it has handed to training
        self._epoch_batches = 0
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches) restored from a checkpoint
        self._started = False  # whether a training pass has started in this process
        self.crashes = LoaderCrashes()  # samples that killed a loader worker in an earlier attempt (crashes.py)
        self.data_stats: Counter[str] = Counter()  # training stream, cumulative over the run
        self.val_data_stats: Counter[str] = Counter()
        self.train_set: WebImageTextDataset | None = None
        self.val_set: WebImageTextDataset | None = None

    # -- topology -------------------------------------------------------------------------------------------------
    def _world(self) -> tuple[int, int, int]:
        """(rank, world size, gradient accumulation) from the trainer, or a single process without one."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1, 1
        return trainer.global_rank, trainer.world_size, trainer.accumulate_grad_batches

    def per_rank_batch_size(self) -> int:
        _, world_size, accumulate = self._world()
        divisor = world_size * accumulate
        if self.batch_size % divisor:
            raise ValueError(
                f"data.batch_size={self.batch_size} (global) is not divisible by world size {world_size} x "
                f"accumulate_grad_batches {accumulate}"
            )
        if self.batches_per_epoch is not None and self.batches_per_epoch % accumulate:
            # Lightning steps on a partial accumulation at an epoch end, which would shrink that step's batch
            raise ValueError(
                f"data.batches_per_epoch={self.batches_per_epoch} is not a multiple of accumulate_grad_batches "
                f"{accumulate}"
            )
        return self.batch_size // divisor

    # -- datasets -------------------------------------------------------------------------------------------------
    def _build_transforms(self, multiple: int) -> None:
        args = dict(self._transform, multiple=multiple)
        self.train_transform = ImageTransform(random_crop=True, **args)
        args.pop("random_ratio_prob")
        self.val_transform = ImageTransform(random_crop=False, **args)

    def use_multiple(self, required: int, what: str = "the stage") -> int:
        """Snap the image buckets to what the stage's networks need (``required`` px, e.g. ``pixel_multiple``):
        ``data.multiple`` when it satisfies it, else the smallest multiple of ``required`` and 32. Returns it."""
        multiple = resolve_multiple(self.multiple, required, what)
        if not self.cached and multiple != self.train_transform.buckets.multiple:
            self._build_transforms(multiple)
            rank_zero_info(f"aspect buckets snap to {multiple} px for {what}: {self.train_transform.buckets.shapes}")
        return multiple

    def _check_cache_multiple(self, dataset: CachedDataset, required: int, what: str) -> None:
        """A cache's buckets were snapped when it was written: they must satisfy the stage and ``data.multiple``."""
        cached = int(dataset.info.get("multiple", BASE_MULTIPLE))  # caches from before the key: 32-px sides
        if cached % required:
            raise ValueError(f"the cache {cache_root(dataset.urls)} holds image sides in multiples of {cached} px, but "
                             f"{what} needs multiples of {required}: re-cache with scripts/cache_latents.py "
                             f"data.multiple={required} (or null)")
        if self.multiple is not None and self.multiple != cached:
            raise ValueError(f"data.multiple={self.multiple}, but the cache {cache_root(dataset.urls)} was written "
                             f"with {cached}-px sides: set data.multiple=null (the cache's) or re-cache")

    def _stage_requirement(self) -> tuple[int, str]:
        """(pixel multiple, name) of the stage being trained; 1 without one (no trainer, or a plain module)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        return int(getattr(module, "pixel_multiple", 1)), type(module).__name__ if module is not None else "the stage"

    def setup(self, stage: str | None = None) -> None:
        required, what = self._stage_requirement()
        self.use_multiple(required, what)
        if self.trainer is not None and (record := LoaderCrashes.read(self.trainer.default_root_dir)) is not None:
            self.crashes = record
            self.restart_index = max(self.restart_index, record.restart_index)
            log.warning("an earlier attempt's loader worker died (%s): skipping %d sample(s) it was reading: %s",
                        record.errors[-1] if record.errors else "?", len(record.skip_keys),
                        ", ".join(sorted(record.skip_keys)[:5]))
        rank, world_size, _ = self._world()
        batch_size = self.per_rank_batch_size()
        common = dict(filter=self.filter, require_caption=self.require_caption, max_tries=self.max_tries,
                      max_tries_per_shard=self.max_tries_per_shard, read_timeout=self.read_timeout, seed=self.seed,
                      rank=rank, world_size=world_size)
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._dataset(self.urls, batch_size, self.train_transform, resample=True,
                                     num_batches=self.batches_per_epoch, shuffle_buffer=self.shuffle_buffer, **common)
        if stage in (None, "fit", "validate") and self.val_urls is not None and self.val_set is None:
            self.val_set = self._dataset(self.val_urls, self.val_batch_size or batch_size, self.val_transform,
                                   resample=False, num_batches=self.val_batches, shuffle_buffer=0, **common)
        for dataset in (self.train_set, self.val_set) if self.cached else ():
            if dataset is not None:
                self._check_cache_multiple(dataset, required, what)

    def _dataset(self, urls: ShardSpec, batch_size: int, transform: ImageTransform | None,
                 **kwargs: Any) -> WebImageTextDataset:
        if self.cached:  # the transform ran when the cache was written
            return CachedDataset(urls, batch_size, **kwargs)
        return WebImageTextDataset(urls, batch_size, transform, **kwargs)

    def _loader(self, dataset: WebImageTextDataset, position: Callable[[], tuple[int, int, int]]) -> StreamLoader:
        extra = {"prefetch_factor": self.prefetch_factor} if self.num_workers and self.prefetch_factor else {}
        return StreamLoader(dataset, position, rank=self._world()[0], num_workers=self.num_workers,
                            pin_memory=self.pin_memory, **extra)

    def train_dataloader(self) -> StreamLoader:
        if self.train_set is None:
            self.setup("fit")
        return self._loader(self.train_set, self._train_position)

    def val_dataloader(self) -> StreamLoader | list:
        if self.val_urls is None:
            return []
        if self.val_set is None:
            self.setup("validate")
        return self._loader(self.val_set, self._val_position)

    def _train_position(self) -> tuple[int, int, int]:
        """(restart index, epoch, batches to skip) of the training pass about to start.

        The datamodule counts its passes itself (Lightning's ``current_epoch`` jumps by two after a resume from a
        checkpoint at an epoch's last batch): a fresh run starts at pass 0, a resumed one continues the pass its
        checkpoint was in after the batches already trained (an empty remainder for a checkpoint at the pass's last
        batch), and every later ``iter()`` starts the next pass.
        """
        if self._resume_at is not None:
            epoch, skip = self._resume_at
            self._resume_at = None
            if skip:
                rank_zero_info(f"data stream resumes epoch {epoch} after batch {skip} (skipping it on each rank)")
        elif self._started:
            epoch, skip = self._epoch + 1, 0
        else:
            epoch, skip = 0, 0
        self._started = True
        self._epoch, self._epoch_batches = epoch, skip
        self.train_set.skip_keys = frozenset(self.crashes.skip_keys)
        return self.restart_index, epoch, skip

    def _val_position(self) -> tuple[int, int, int]:
        return 0, 0, 0  # validation reads the same samples every time, so its metrics are comparable

    # -- batches --------------------------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        training = self.trainer is None or self.trainer.training
        (self.data_stats if training else self.val_data_stats).update(batch.pop("data_stats", {}))
        if training:
            self._epoch_batches += 1
        return batch

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        return to_model_inputs(batch)

    # -- checkpointed stream state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"restart_index": self.restart_index, "epoch": self._epoch, "epoch_batches": self._epoch_batches,
                "data_stats": dict(self.data_stats)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.data_stats = Counter(state_dict.get("data_stats", {}))
        restart_index = int(state_dict["restart_index"])
        if restart_index < self.crashes.restart_index:  # skipping the crash's samples did not help: a fresh stream
            self.restart_index = self.crashes.restart_index
            log.warning("data stream restarts with restart_index=%d after repeated loader crashes", self.restart_index)
        elif self.resume == "exact" and "epoch_batches" in state_dict:
            self.restart_index = restart_index
            self._resume_at = (int(state_dict["epoch"]), int(state_dict["epoch_batches"]))
        else:
            self.restart_index = restart_index + 1
            log.info("data stream restarts with restart_index=%d", self.restart_index)

    def on_exception(self, exception: BaseException) -> None:
        """A loader worker that died outside Python: record what it was reading, so the next attempt skips it."""
        pids = dead_worker_pids(exception)
        if pids is None or self.trainer is None or self.train_set is None:
            return
        in_flight = self.train_set.in_flight
        suspects = in_flight.suspects(pids) if in_flight is not None else []
        crashes = LoaderCrashes.read(self.trainer.default_root_dir) or self.crashes  # another rank's, meanwhile
        crashes.skip_keys |= self.crashes.skip_keys
        crashes.add(suspects, self.restart_index, f"{type(exception).__name__}: {exception}")
        path = crashes.write(self.trainer.default_root_dir)
        log.error("a loader worker died while reading %s; the next attempt skips %s (%s)",
                  ", ".join(suspects) or "no sample (between samples)",
                  "them" if suspects else "to a fresh stream", path)


class DataStatsMonitor(L.Callback):
    """Logs the data pipeline's counts, summed over ranks: ``data/accepted``, ``data/rejected/<reason>`` and, for the
    rejects an exception caused, ``data/errors/<ExceptionType>`` (these duplicate their reason's count).

    The counts are cumulative over the run (checkpointed with the datamodule). The fixed reasons are reduced across
    ranks every ``trainer.log_every_n_steps`` steps, at the same step on every rank, as one tensor; the open-ended
    exception types only at each epoch end, where the ranks first agree on their names. Each epoch end also prints a
    summary line.
    """

    def _totals(self, trainer: L.Trainer, pl_module: L.LightningModule,
                names: Sequence[str] = ("accepted", *REJECT_REASONS)) -> dict[str, float] | None:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, WebDataModule):
            return None
        counts = torch.tensor([float(datamodule.data_stats[n]) for n in names], dtype=torch.float64,
                              device=pl_module.device)  # exact beyond 2^24 samples
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        return dict(zip(names, counts.tolist()))

    def _error_totals(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        local = sorted(k for k in trainer.datamodule.data_stats if k.startswith(ERROR_PREFIX))
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, local)
            local = sorted(set().union(*gathered))
        if not local:
            return {}
        totals = self._totals(trainer, pl_module, local) or {}
        return {name[len(ERROR_PREFIX):]: count for name, count in totals.items()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % trainer.log_every_n_steps or (totals := self._totals(trainer, pl_module)) is None:
            return
        rejects = {name: count for name, count in totals.items() if name != "accepted"}
        metrics = {"data/accepted": totals["accepted"], "data/rejected": sum(rejects.values())}
        metrics.update({f"data/rejected/{name}": count for name, count in rejects.items() if count > 0})
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (totals := self._totals(trainer, pl_module)) is None:
            return
        errors = self._error_totals(trainer, pl_module)
        if errors:
            pl_module.log_dict({f"data/errors/{name}": count for name, count in errors.items()}, on_step=False,
                               on_epoch=True, reduce_fx="max")
        rejects = {name: int(count) for name, count in totals.items() if name != "accepted" and count > 0}
        rank_zero_info(f"data after epoch {trainer.current_epoch}: {int(totals['accepted'])} samples accepted, "
                       f"{sum(rejects.values())} rejected {rejects or ''}".rstrip()
                       + (f"; exceptions behind them: { {k: int(v) for k, v in errors.items()} }" if errors else ""))
