"""Checkpoints that survive preemption and crashes: atomic, fsynced step checkpoints, a ``last`` link, pruning that
spares an attempt's start points, RNG state, and the run directory's lock (where a run resumes from: ``resume.py``).

Layout under ``<run_dir>/checkpoints``::

    step=0001000.ckpt      complete checkpoints (a file, or a folder when sharded)
    last.ckpt -> step=0001000.ckpt
    .step=0002000.ckpt.partial   a save in progress (or killed mid-way): never loaded, removed at the next start
    lineage.json                 start points behind each checkpoint (resume.py)
    .lock                        host, pid and SLURM job of the run writing here

A checkpoint is written under its ``.partial`` name, fsynced, and renamed once every rank has finished writing, so a
process or node killed mid-save leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import WandbLogger

from ..weights import checkpoint as schema
from .resume import RunLock, ResumePlan, read_lineages, write_lineages

log = logging.getLogger(__name__)

STEP_PATTERN = re.compile(r"^step=(\d+)\.ckpt$")
PARTIAL_SUFFIX = ".partial"


def checkpoint_name(step: int) -> str:
    return f"step={step:07d}.ckpt"


def is_final_step(trainer: L.Trainer) -> bool:
    """Whether the optimizer step just taken is the run's last (``trainer.max_steps``): the final checkpoint's."""
    return trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step


def complete_checkpoints(dirpath: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete step checkpoint in ``dirpath``, oldest first."""
    dirpath = Path(dirpath)
    if not dirpath.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in dirpath.iterdir() if (m := STEP_PATTERN.match(p.name))]
    return sorted(found)


def find_resume_checkpoint(dirpath: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run (what re-running the same command resumes from), or None."""
    found = complete_checkpoints(dirpath)
    return found[-1][1] if found else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a file's contents, or a folder's entries, to stable storage (best effort: some file systems refuse
    fsync on a folder, and the rename that publishes a checkpoint is atomic either way)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path, rank: int) -> None:
    """Flush what this rank wrote of a checkpoint to stable storage before it is published: a sharded folder's
    ``__<rank>_*.distcp`` shards, and on rank 0 everything else (the single file, the metadata, the folder)."""
    if path.is_file():
        if rank == 0:
            _fsync(path)
        return
    for file in (p for p in path.rglob("*") if p.is_file()):
        shard_of = file.name[2:].split("_", 1)[0] if file.name.startswith("__") else None
        if shard_of == str(rank) or (shard_of is None and rank == 0):
            _fsync(file)
    if rank == 0:
        _fsync(path)


def rng_states() -> dict[str, Any]:
    """The global generators a training step draws from (torch CPU and CUDA, numpy, python), as tensors and plain
    Python values only, so checkpoints stay loadable with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    states = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class Checkpointing(Checkpoint):
    """Step checkpoints, written atomically, the newest ``keep_last`` kept, ``last.ckpt`` pointing at the newest.

    Saves every ``every_n_steps`` optimizer steps, at the final step (``trainer.max_steps``, so a later run with a
    larger ``max_steps`` continues from it) and on request (:meth:`save_now`, the preemption path). Also carries the
    per-rank RNG states and the wandb run id in every checkpoint.

    Args:
        dirpath: the run's checkpoint folder.
        every_n_steps: period in optimizer steps (0: only the final and preemption checkpoints).
        keep_last: complete step checkpoints kept (None keeps all); older ones are deleted after each save.
    """

    def __init__(self, dirpath: str, every_n_steps: int = 1000, keep_last: int | None = 3) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 0")
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last={keep_last} must be >= 1 or null")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self.last_saved_step = -1
        self.last_path: Path | None = None
        self.plan = ResumePlan(None)  # where this attempt started (scripts/train.py sets it)
        self.lock = RunLock(self.dirpath)

    def resume_from(self, plan: ResumePlan, lock: RunLock | None = None) -> None:
        """Record where this attempt starts (its checkpoints get the plan's lineage, and pruning spares its start),
        and the run directory's lock if the caller took it already."""
        self.plan = plan
        if lock is not None:
            self.lock = lock

    # -- hooks ------------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        error = None
        if trainer.is_global_zero:
            try:
                self.lock.acquire()  # before touching anything: another job's .partial files are not ours to remove
            except RuntimeError as exn:
                error = str(exn)
            else:
                for stale in self.dirpath.glob(f".*{PARTIAL_SUFFIX}"):  # a save that never completed
                    log.warning("removing incomplete checkpoint %s", stale)
                    _remove(stale)
        error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            raise RuntimeError(error)
        chosen = trainer.strategy.broadcast(self.plan.path, src=0)
        if chosen != self.plan.path:
            raise RuntimeError(f"rank {trainer.global_rank} would resume from {self.plan.path}, rank 0 from {chosen}: "
                               f"the ranks see different files in {self.dirpath} (a shared file system lagging?)")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size == 1:
            return
        steps = trainer.strategy.all_gather(torch.tensor(trainer.global_step, device=pl_module.device))
        if len(set(steps.flatten().tolist())) > 1:
            raise RuntimeError(f"the ranks restored different steps {steps.flatten().tolist()} from "
                               f"{self.plan.path}")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.lock.release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.lock.release()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.last_saved_step or step == 0:
            return
        periodic = self.every_n_steps and step % self.every_n_steps == 0
        if is_final_step(trainer) or periodic:
            self.save_now(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        states: list[Any] = [rng_states()]  # every rank's, in rank order
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, states[0])
            states = gathered
        wandb_id = next((lg.version for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        schema.write_run(checkpoint, states, self.plan.lineage, wandb_id)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(schema.RNG_STATES)
        if not states:
            return
        if len(states) == trainer.world_size:
            set_rng_states(states[trainer.global_rank])
        else:
            log.warning("checkpoint holds RNG states of %d ranks, this run has %d: random streams restart",
                        len(states), trainer.world_size)

    def state_dict(self) -> dict[str, Any]:
        return {"last_saved_step": self.last_saved_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_saved_step = int(state_dict.get("last_saved_step", -1))

    # -- saving -----------------------------------------------------------------------------------------------------
    def save_now(self, trainer: L.Trainer) -> Path:
        """Write the checkpoint of the current step on every rank (collective), then publish it atomically."""
        step = trainer.global_step
        final = self.dirpath / checkpoint_name(step)
        partial = self.dirpath / f".{final.name}{PARTIAL_SUFFIX}"
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            _remove(partial)
        trainer.strategy.barrier("Checkpointing.save_now:before")
        self.last_saved_step = step  # part of the checkpoint's own callback state
        trainer.save_checkpoint(partial)  # collective; returns once every rank has written its part
        if partial.exists():
            _fsync_tree(partial, trainer.global_rank)  # every rank flushes what it wrote
        trainer.strategy.barrier("Checkpointing.save_now:written")
        if trainer.is_global_zero:
            self._record_lineage(final)  # before it is published: a kill in between leaves no unindexed checkpoint
            _remove(final)  # re-saving a step (a resumed run that stopped at the same step)
            os.replace(partial, final)
            self._link_last(final)
            _fsync(self.dirpath)
            self._prune()
        trainer.strategy.barrier("Checkpointing.save_now:after")
        self.last_path = final
        log.info("saved checkpoint %s", final)
        return final

    def _link_last(self, target: Path) -> None:
        link = self.dirpath / "last.ckpt"
        tmp = self.dirpath / f".last.ckpt{PARTIAL_SUFFIX}"
        _remove(tmp)
        os.symlink(target.name, tmp)
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        os.replace(tmp, link)

    def _prune(self) -> None:
        """Delete all but the newest ``keep_last``, never the checkpoint this attempt started from (if a newer one
        proves unreadable, the resume falls back to it) nor an explicit start point (``ckpt_path``) of the live
        branch. Other branches were moved aside when the run started."""
        if self.keep_last is None:
            return
        kept = set(self.plan.lineage) | ({self.plan.path} if self.plan.path else set())
        kept = {name for path in kept for name in (os.path.abspath(path), os.path.realpath(path))}
        for _, path in complete_checkpoints(self.dirpath)[: -self.keep_last]:
            if not {os.path.abspath(path), os.path.realpath(path)} & kept:
                _remove(path)

    def _record_lineage(self, final: Path) -> None:
        present = {p.name for _, p in complete_checkpoints(self.dirpath)} | {final.name}
        lineages = {name: chain for name, chain in read_lineages(self.dirpath).items() if name in present}
        lineages[final.name] = list(self.plan.lineage)
        write_lineages(self.dirpath, lineages)
