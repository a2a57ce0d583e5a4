"""Train one stage: ``python scripts/train.py experiment=NAME [overrides]`` (``wuerstchen.train.train``).

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

import sys

import hydra
from omegaconf import DictConfig

from wuerstchen.train import check_overrides, train


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    # the preemption handler stays until exit: Slurm's SIGTERM to a requeued job step lands during shutdown
    status = train(cfg, keep_signal_handlers=True).exit_status
    if status:
        sys.exit(status)


if __name__ == "__main__":
    try:
        check_overrides(sys.argv[1:])  # before Hydra parses them: its struct error would not name the new key
    except ValueError as error:
        sys.exit(f"error: {error}")
    main()
