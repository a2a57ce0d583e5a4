"""Train one stage: ``python scripts/train.py experiment=NAME [overrides]``.

Common overrides: ``data.urls=...``, ``trainer.max_steps=N``, ``seed=N``, ``run_dir=DIR``, ``stage_a_ckpt=...``
(Stage B), ``stage_b_ckpt=...`` (Stage C), ``init_from=...``, ``ckpt_path=...``, ``trainer=gpu``, ``logger=wandb``.

Re-running the same command resumes: with ``resume=true`` (the default), training continues from the newest complete
checkpoint in ``<run_dir>/checkpoints`` (model, EMA, optimizers, LR schedule, step, RNG states, data-stream position,
and the wandb run). ``ckpt_path=X`` is where the first attempt starts; requeued attempts and re-runs continue from
the newest checkpoint descending from X (see ``wuerstchen/training/resume.py``).

Exit status: 0 when the run reached its end or was stopped by a signal and requeued; 128 + the signal's number when
a signal stopped it and nothing will continue it (outside SLURM, ``requeue: false``, or a failed ``scontrol
requeue``): re-running the same command continues it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from wuerstchen.training.checkpointing import Checkpointing, find_resume_checkpoint
from wuerstchen.training.preemption import Preemption
from wuerstchen.training.resume import PLAN_ENV, ResumePlan, RunLock, agree_on_plan
from wuerstchen.weights import checkpoint_info
from wuerstchen.weights.formats import clear_cache

log = logging.getLogger(__name__)


def check_config(cfg: DictConfig) -> None:
    """Stop before any work on a config that cannot run, naming the key."""
    size = cfg.data.get("image_size")
    if size is None or int(size) <= 0 or int(size) % 32:
        key = "resolution" if cfg.get("resolution") is not None else "data.image_size"  # what the user typed
        raise ValueError(f"{key}={size} must be a positive multiple of 32")
    if cfg.trainer.get("max_steps", -1) in (None, -1) and cfg.trainer.get("max_epochs") is None:
        raise ValueError("set trainer.max_steps (or trainer.max_epochs): the training stream is endless")


def resume_plan(cfg: DictConfig, checkpointing: Checkpointing | None, lock: RunLock) -> ResumePlan:
    """Where this attempt starts (rank 0 takes ``lock`` and decides, the other ranks follow; see
    ``resume.agree_on_plan``)."""
    dirpath = lock.path.parent
    requeued = int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0  # its own checkpoints: it must continue them
    if not cfg.ckpt_path and not cfg.resume and not requeued and (found := find_resume_checkpoint(dirpath)):
        raise ValueError(f"run_dir={cfg.run_dir} already holds checkpoints ({found.name}); resume=true continues "
                         f"that run, or choose a new run_dir")
    return agree_on_plan(dirpath, str(cfg.ckpt_path) if cfg.ckpt_path else None, lock)


def build_trainer(cfg: DictConfig, module: L.LightningModule, callbacks: list[L.Callback],
                  ckpt_path: str | None = None) -> L.Trainer:
    """The trainer of a run starting at ``ckpt_path`` (or fresh: then ``init_from`` gives the first weights)."""
    if cfg.init_from and ckpt_path is None:  # a resumed run has its weights in the checkpoint
        module.init_from(cfg.init_from)
        log.info("initialised %s from %s", type(module.network).__name__, cfg.init_from)
    logger_cfgs = dict(cfg.get("logger") or {})
    wandb_id = checkpoint_info(ckpt_path).get("wandb_run_id") if ckpt_path else None
    loggers = []
    for name, logger_cfg in logger_cfgs.items():
        if not logger_cfg:
            continue
        extra = {"id": wandb_id, "resume": "allow"} if wandb_id and "Wandb" in logger_cfg.get("_target_", "") else {}
        loggers.append(hydra.utils.instantiate(logger_cfg, **extra))
    plugins = []
    if SLURMEnvironment.detect():
        # our Preemption callback saves at a step boundary and requeues; Lightning's own handler would save inside
        # the signal handler, which can deadlock collectives
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins or None)


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # the recipe's TF32 matmuls under bf16 autocast
        torch.backends.cudnn.allow_tf32 = True
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    preemption = next((c for c in callbacks if isinstance(c, Preemption)), None)
    if preemption is not None:
        preemption.install()  # from now on until exit a SIGUSR1/SIGTERM only sets its flag
    datamodule = hydra.utils.instantiate(cfg.data)  # config errors stop the run before it touches run_dir
    module = hydra.utils.instantiate(cfg.stage)
    checkpointing = next((c for c in callbacks if isinstance(c, Checkpointing)), None)
    lock = checkpointing.lock if checkpointing is not None else RunLock(Path(cfg.run_dir) / "checkpoints")
    try:
        plan = resume_plan(cfg, checkpointing, lock)
        if plan.path is not None:
            log.info("resuming from %s (%s)", plan.path, plan.reason)
        if checkpointing is not None:
            checkpointing.resume_from(plan)
        trainer = build_trainer(cfg, module, callbacks, plan.path)
        clear_cache()  # the frozen networks hold their weights now: drop the memory maps of the files read
        trainer.fit(module, datamodule=datamodule, ckpt_path=plan.path)
    finally:
        lock.release()
        os.environ.pop(PLAN_ENV, None)  # only for the ranks Lightning launched from this process
        for worker in multiprocessing.active_children():  # loader workers ignore SIGTERM: don't wait on one at exit
            worker.kill()
    if preemption is not None and preemption.unfinished:
        signum = preemption.received or 0
        log.error("stopped at step %d by a signal and NOT requeued: nothing will continue this run by itself; "
                  "re-run the same command to resume it", preemption.stopped_at)
        sys.exit(128 + signum)


if __name__ == "__main__":
    main()
