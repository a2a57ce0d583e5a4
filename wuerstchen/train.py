"""Train one stage from a composed config: ``train(compose(["experiment=demo_stage_a", ...]))``.

``scripts/train.py`` is this behind ``@hydra.main``. Called in-process (tests, notebooks) it trains single-process runs
only: Lightning's DDP launcher starts the other ranks by re-running this process's command line, which is only the
training command when that is ``scripts/train.py`` (or ``torchrun``/``srun`` of it).

Re-running the same config resumes: with ``resume=true`` (the default), training continues from the newest complete
checkpoint in ``<run_dir>/checkpoints`` (model, EMA, optimizers, LR schedule, step, RNG states, data-stream position,
and the wandb run). ``ckpt_path=X`` is where the first attempt starts; requeued attempts and re-runs continue from
the newest checkpoint descending from X (see ``wuerstchen/training/resume.py``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf, open_dict

from .training.checkpointing import Checkpointing, find_resume_checkpoint
from .training.preemption import Preemption
from .training.resume import PLAN_ENV, ResumePlan, RunLock, agree_on_plan
from .weights import checkpoint_info
from .weights.formats import clear_cache

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # the repository's configs/, beside the package

# config keys that have moved: an override of the old one stops with the new name rather than Hydra's struct error
MOVED_KEYS = {
    "stage.effnet_init": "effnet_init",  # Stage B's compressor weights (stage.init.effnet reads it)
    "stage.stage_a_ckpt": "stage_a_ckpt",
    "stage.stage_b_ckpt": "stage_b_ckpt",
}


def check_overrides(overrides: Sequence[str]) -> None:
    """Stop on a command-line override of a moved key (``MOVED_KEYS``), naming the key that replaced it."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in MOVED_KEYS:
            raise ValueError(f"{key} has moved: write {MOVED_KEYS[key]}={override.split('=', 1)[-1]} instead")


@dataclass
class TrainResult:
    """What a run left: its trainer and module, its newest complete checkpoint and the process's exit status."""

    trainer: L.Trainer
    module: L.LightningModule
    checkpoint: Path | None  # the newest complete checkpoint in <run_dir>/checkpoints (None: none written)
    exit_status: int  # 0, or 128 + the signal's number when a signal stopped the run and nothing will continue it


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """The config ``scripts/<config_name>.py overrides...`` runs with, from the repository's ``configs/``.

    Values that read Hydra's runtime node (``stage_name: ${hydra:runtime.choices.stage}``) are resolved here, so the
    config resolves without ``@hydra.main`` having run; the ``hydra`` node itself is dropped."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    check_overrides(overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    hydra_node = HydraConfig.instance()
    previous = hydra_node.cfg
    hydra_node.set_config(cfg)
    try:
        resolved = {key: OmegaConf.select(cfg, key) for key in _hydra_reads(OmegaConf.to_container(cfg))}
    finally:
        hydra_node.cfg = previous
    with open_dict(cfg):
        del cfg["hydra"]
        for key, value in resolved.items():
            OmegaConf.update(cfg, key, value)
    return cfg


def _hydra_reads(node: object, prefix: str = "") -> list[str]:
    """Dotted keys (outside ``hydra``) whose value interpolates ``${hydra:...}``."""
    if isinstance(node, dict):
        return [key for name, value in node.items() if name != "hydra" or prefix
                for key in _hydra_reads(value, f"{prefix}{name}.")]
    return [prefix[:-1]] if isinstance(node, str) and "${hydra:" in node else []


def check_config(cfg: DictConfig) -> None:
    """Stop before any work on a config that cannot run, naming the key."""
    size = cfg.data.get("image_size")
    if size is None or int(size) <= 0 or int(size) % 32:
        key = "resolution" if cfg.get("resolution") is not None else "data.image_size"  # what the user typed
        raise ValueError(f"{key}={size} must be a positive multiple of 32")
    if cfg.trainer.get("max_steps", -1) in (None, -1) and cfg.trainer.get("max_epochs") is None:
        raise ValueError("set trainer.max_steps (or trainer.max_epochs): the training stream is endless")


def resume_plan(cfg: DictConfig, lock: RunLock) -> ResumePlan:
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
    """The trainer of a run starting at ``ckpt_path`` (or fresh: then ``stage.init`` gives the first weights)."""
    if ckpt_path is None:  # a resumed run has its weights in the checkpoint
        module.load_initial_weights()
    wandb_id = checkpoint_info(ckpt_path).get("wandb_run_id") if ckpt_path else None
    loggers = []
    for logger_cfg in (cfg.get("logger") or {}).values():
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


def train(cfg: DictConfig, keep_signal_handlers: bool = False) -> TrainResult:
    """Train the stage ``cfg`` describes, resuming its run where one exists.

    The preemption handler (SIGUSR1/SIGTERM only set a flag) is installed before anything is built. A process that
    exits after this (``scripts/train.py``) keeps it, ``keep_signal_handlers=True``, so a signal during shutdown still
    lands harmlessly; otherwise the previous handlers come back when the run ends."""
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # the recipe's TF32 matmuls under bf16 autocast
        torch.backends.cudnn.allow_tf32 = True
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    preemption = next((c for c in callbacks if isinstance(c, Preemption)), None)
    handlers = {signum: signal.getsignal(signum) for signum in (preemption.signals if preemption else ())}
    children = {child.pid for child in multiprocessing.active_children()}  # the caller's, left alone
    if preemption is not None:
        preemption.install()  # from now on a SIGUSR1/SIGTERM only sets its flag
    try:
        datamodule = hydra.utils.instantiate(cfg.data)  # config errors stop the run before it touches run_dir
        module = hydra.utils.instantiate(cfg.stage)
        checkpointing = next((c for c in callbacks if isinstance(c, Checkpointing)), None)
        lock = checkpointing.lock if checkpointing is not None else RunLock(Path(cfg.run_dir) / "checkpoints")
        try:
            plan = resume_plan(cfg, lock)
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
            for worker in multiprocessing.active_children():  # loader workers ignore SIGTERM: don't wait on one
                if worker.pid not in children:
                    worker.kill()
    finally:
        if not keep_signal_handlers:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
    status = 0
    if preemption is not None and preemption.unfinished:
        status = 128 + (preemption.received or 0)
        log.error("stopped at step %d by a signal and NOT requeued: nothing will continue this run by itself; "
                  "re-run the same command to resume it", preemption.stopped_at)
    return TrainResult(trainer, module, find_resume_checkpoint(lock.path.parent), status)
