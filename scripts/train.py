"""Train one stage: ``python scripts/train.py experiment=NAME [overrides]``.

Common overrides: ``data.urls=...``, ``trainer.max_steps=N``, ``seed=N``, ``run_dir=DIR``, ``stage_a_ckpt=...``
(Stage B), ``stage_b_ckpt=...`` (Stage C), ``init_from=...``, ``ckpt_path=...``, ``trainer=gpu``, ``logger=wandb``.
"""

from __future__ import annotations

import logging

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def check_config(cfg: DictConfig) -> None:
    """Stop before any work on a config that cannot run, naming the key."""
    size = cfg.data.get("image_size")
    if size is None or int(size) <= 0 or int(size) % 32:
        raise ValueError(f"data.image_size={size} must be a positive multiple of 32")
    if cfg.trainer.get("max_steps", -1) in (None, -1) and cfg.trainer.get("max_epochs") is None:
        raise ValueError("set trainer.max_steps (or trainer.max_epochs): the training stream is endless")


def build(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer]:
    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.stage)
    if cfg.init_from:
        module.init_from(cfg.init_from)
        log.info("initialised %s from %s", type(module.network).__name__, cfg.init_from)
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c] or False
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    return module, datamodule, trainer


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # the recipe's TF32 matmuls under bf16 autocast
        torch.backends.cudnn.allow_tf32 = True
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    module, datamodule, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)


if __name__ == "__main__":
    main()
