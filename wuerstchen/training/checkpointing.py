"""Checkpoints that survive preemption: atomic step checkpoints, a ``last`` link, pruning, resume discovery, RNG
state, and a SLURM-aware preemption handler that saves at a step boundary and requeues the job.

Layout under ``<run_dir>/checkpoints``::

    step=0001000.ckpt      complete checkpoints (a file, or a folder when sharded)
    last.ckpt -> step=0001000.ckpt
    .step=0002000.ckpt.partial   a save in progress (or killed mid-way): never loaded, removed at the next start

A checkpoint is written under its ``.partial`` name and renamed once every rank has finished writing, so a process
killed mid-save leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)

STEP_PATTERN = re.compile(r"^step=(\d+)\.ckpt$")
PARTIAL_SUFFIX = ".partial"


def checkpoint_name(step: int) -> str:
    return f"step={step:07d}.ckpt"


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


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

    # -- hooks ------------------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero and self.dirpath.is_dir():
            for stale in self.dirpath.glob(f".*{PARTIAL_SUFFIX}"):  # a save that never completed
                log.warning("removing incomplete checkpoint %s", stale)
                _remove(stale)
        trainer.strategy.barrier("Checkpointing.setup")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.last_saved_step or step == 0:
            return
        final = trainer.max_steps is not None and 0 < trainer.max_steps <= step
        periodic = self.every_n_steps and step % self.every_n_steps == 0
        if final or periodic:
            self.save_now(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        states = rng_states()
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, states)
            checkpoint["rng_states"] = gathered
        else:
            checkpoint["rng_states"] = [states]
        wandb_id = next((lg.version for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        if wandb_id is not None:
            checkpoint["wandb_run_id"] = wandb_id

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
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
        if trainer.is_global_zero:
            _fsync_dir(partial if partial.is_dir() else self.dirpath)
            _remove(final)  # re-saving a step (a resumed run that stopped at the same step)
            os.replace(partial, final)
            self._link_last(final)
            _fsync_dir(self.dirpath)
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
        if self.keep_last is None:
            return
        for _, path in complete_checkpoints(self.dirpath)[: -self.keep_last]:
            _remove(path)


class Preemption(L.Callback):
    """Preemption and time limits: SIGUSR1 / SIGTERM set a flag, the next step boundary saves and (under SLURM)
    requeues, and the run stops cleanly.

    The handler itself only sets a flag (checkpointing inside it could deadlock collectives). Every
    ``check_every_n_steps`` optimizer steps the ranks agree on the flag with one all-reduce (a single process just
    reads it, every step), so all of them stop at the same step; rank 0 then runs
    ``scontrol requeue $SLURM_JOB_ID`` (``requeue: true`` and inside a SLURM job). The requeued job runs the same
    command, which resumes from the newest complete checkpoint in the run directory.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM"), requeue: bool = True,
                 check_every_n_steps: int = 1) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps={check_every_n_steps} must be >= 1")
        self.check_every_n_steps = check_every_n_steps
        self.signals = tuple(getattr(signal, name) for name in signals)
        self.requeue = requeue
        self.received: int | None = None
        self.stopping = False
        self._previous: dict[int, Any] = {}
        self._step = -1

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signum  # only a flag: no I/O, no collectives

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning registered its own handlers (its SIGTERM one ends the run with exit code 1)
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handler)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if not self.stopping:
            return
        # the last step's metrics reach the loggers after on_train_batch_end: flush them before `scontrol requeue`
        # (which ends this job) so the log of the run has no hole at the preemption point
        for logger in trainer.loggers:
            logger.save()
        if trainer.is_global_zero and self.requeue:
            requeue_slurm_job()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._step:  # gradient accumulation: decide at optimizer steps only
            return
        self._step = step
        if trainer.world_size == 1:
            if self.received is None:
                return
        else:  # one small all-reduce (and a device sync) every check_every_n_steps, not every step
            if step % self.check_every_n_steps:
                return
            flag = torch.tensor(float(self.received is not None), device=pl_module.device)
            if trainer.strategy.reduce(flag, reduce_op="max").item() == 0:
                return
        what = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        log.warning("received %s: saving at step %d and stopping", what, trainer.global_step)
        checkpointing = next((c for c in trainer.callbacks if isinstance(c, Checkpointing)), None)
        if checkpointing is not None and checkpointing.last_saved_step != trainer.global_step:
            checkpointing.save_now(trainer)
        self.stopping = True
        trainer.should_stop = True


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this SLURM job (array tasks included); False outside SLURM or on failure."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        log.info("not inside a SLURM job: nothing to requeue")
        return False
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode:
        log.error("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
        return False
    log.warning("requeued SLURM job %s", job)
    return True
