"""Preemption and time limits on SLURM: SIGUSR1 / SIGTERM end a run at a step boundary with one complete checkpoint,
a ``scontrol requeue``, and a clean exit, wherever the signal lands.

Who sees the signal. Slurm signals every process of a job step: the training ranks, their data loader workers and any
``pipe:`` command the workers run. The ranks only set a flag: ``scripts/train.py`` installs the handler
(:meth:`Preemption.install`) before it builds anything, and it stays until the process exits, so a signal during
set-up, checkpoint loading, the exact-resume skip or the shutdown is caught. Loader workers ignore both signals
(``data.datamodule.loader_worker_init``) and ``pipe:`` commands run in a session of their own, so none of them dies
and takes the run with it.

Lightning's own SIGTERM handling is switched off while this callback runs: it runs a collective inside the signal
handler and raises ``SIGTERMException`` at the end of the batch, which ends the run without a checkpoint or requeue.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

from .checkpointing import Checkpointing
from .resume import slurm_job_id

log = logging.getLogger(__name__)


class _SignalsHandledByPreemption(_SignalConnector):
    """Lightning's signal connector without its handlers: :class:`Preemption` owns SIGUSR1 and SIGTERM."""

    def register_signal_handlers(self) -> None:
        self.received_sigterm = False
        self._original_handlers = {}


class Preemption(L.Callback):
    """SIGUSR1 / SIGTERM set a flag; at the next optimizer step boundary the ranks agree on it, save one checkpoint
    together, rank 0 runs ``scontrol requeue`` (``requeue: true`` inside a SLURM job), and the run stops.

    - The ranks agree every ``check_every_n_steps`` optimizer steps, and once before the first step. At a step the
      flag travels in the stage module's one all-reduce before the optimizer step (its ``step_flags``, with the
      gradients' norm: no collective or host synchronisation of its own); a signal after that is acted on at the
      next step. Before the first step (and for a module without ``step_flags``) one scalar all-reduce: a signal
      during set-up or checkpoint loading stops the run before it trains. (The exact-resume skip runs in the loader
      workers while the first batch is awaited, after that check: a signal then stops the run after its first
      step.)
    - A run that stops skips the validation pass Lightning would otherwise run first; a signal during validation or
      during a checkpoint save is acted on at the next step boundary. A signal at the last step changes nothing:
      the run ends there anyway, with its final checkpoint.
    - The handler stays installed after training, so Slurm's SIGTERM to a requeued job step lands while the process
      shuts down and it exits 0. ``scripts/train.py`` exits non-zero when a stopped run was not requeued
      (:attr:`unfinished`), so a job never shows COMPLETED unfinished.
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
        self.requeued = False
        self.stopped_at: int | None = None
        self._step = -1

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signum  # only a flag: no I/O, no collectives

    @property
    def unfinished(self) -> bool:
        """The run stopped for a signal before its end and no requeue will continue it."""
        return self.stopping and not self.requeued

    # -- hooks ------------------------------------------------------------------------------------------------------
    def install(self) -> None:
        """Set the flag-only handler for the configured signals (idempotent); it stays until the process exits."""
        for signum in self.signals:
            if signal.getsignal(signum) != self._handler:
                signal.signal(signum, self._handler)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.install()  # already done by scripts/train.py; here for trainers built elsewhere
            trainer._signal_connector = _SignalsHandledByPreemption(trainer)
            if isinstance(getattr(pl_module, "step_flags", None), dict):
                pl_module.step_flags["preemption"] = lambda: self.received is not None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step = trainer.global_step
        self._check(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._step or step % self.check_every_n_steps:  # accumulation: decide at optimizer steps only
            return
        self._step = step
        self._check(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.stopping:
            return
        # the last step's metrics reach the loggers after on_train_batch_end: flush them before `scontrol requeue`
        # (which ends this job) so the log of the run has no hole at the preemption point
        for logger in trainer.loggers:
            logger.save()
        requeued = requeue_slurm_job() if trainer.is_global_zero and self.requeue else False
        self.requeued = bool(trainer.strategy.broadcast(requeued, src=0))

    # -- the decision -----------------------------------------------------------------------------------------------
    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stopping or 0 < (trainer.max_steps or -1) <= trainer.global_step:
            return  # the last step: the run ends here with its final checkpoint, finished, whatever arrived
        if not self._agreed(trainer, pl_module):
            return
        what = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        checkpointing = next((c for c in trainer.callbacks if isinstance(c, Checkpointing)), None)
        if trainer.global_step == 0:  # the initial state follows from the config and seed: the next attempt rebuilds it
            log.warning("received %s before the first step: stopping, nothing to save", what)
        elif checkpointing is not None and checkpointing.last_saved_step == trainer.global_step:
            log.warning("received %s: step %d is saved already; stopping", what, trainer.global_step)
        else:
            log.warning("received %s: saving at step %d and stopping", what, trainer.global_step)
            if checkpointing is not None:
                checkpointing.save_now(trainer)
        self.stopping = True
        self.stopped_at = trainer.global_step
        trainer.should_stop = True
        trainer.limit_val_batches = 0  # Lightning validates before honouring should_stop; no time for that now

    def _agreed(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """Whether any rank received a signal: a single process reads its flag, several all-reduce it."""
        if trainer.world_size == 1:
            return self.received is not None
        agreed = getattr(pl_module, "agreed_flags", {})
        if "preemption" in agreed and agreed["step"] == trainer.global_step - 1:  # this step's optimizer step
            return agreed["preemption"]
        flag = torch.tensor(float(self.received is not None), device=pl_module.device)
        return bool(trainer.strategy.reduce(flag, reduce_op="max").item())


def _ignore_preemption_signals() -> None:
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this SLURM job; False (and the reason logged) outside SLURM or on any failure."""
    job = slurm_job_id()
    if job is None:
        log.error("not inside a SLURM job: the job was not requeued")
        return False
    if shutil.which("scontrol") is None:
        log.error("scontrol not found on PATH: SLURM job %s was not requeued", job)
        return False
    try:
        # the requeue makes Slurm signal every process of this job step, this scontrol among them: it must not die of
        # that before it has reported its result
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60,
                                preexec_fn=_ignore_preemption_signals)
    except (OSError, subprocess.TimeoutExpired) as exn:
        log.error("scontrol requeue %s failed: %s: the job was not requeued", job, exn)
        return False
    if result.returncode:
        log.error("scontrol requeue %s failed (%d): %s: the job was not requeued", job, result.returncode,
                  result.stderr.strip())
        return False
    log.warning("requeued SLURM job %s", job)
    return True
