"""Measure a Stage A's latent scale over training images and record it as its ``scale_factor``.

    python scripts/measure_latent_scale.py ckpt=runs/stage_a/checkpoints/step=0100000.ckpt \
        data.urls='/data/laion/{00000..00099}.tar' data.image_size=256 [num_images=4096] [out=PATH]

``scale_factor`` is the RMS of the raw encoder output over ``num_images`` centre crops of the first samples of the
shards, with the weights ``load_network`` loads (the EMA's when the checkpoint has one); see
``wuerstchen/training/latent_scale.py`` for why the RMS. A Stage A run records it in its final checkpoint by itself
(``stage.latent_scale_images``); this command is for the others, e.g. an intermediate checkpoint to train Stage B on.
Our single-file checkpoint is rewritten atomically (in place, or to ``out=``) with only that value changed; a sharded
folder is refused (``scripts/consolidate_checkpoint.py`` first), so is a Stage B checkpoint (its Stage B learnt the
recorded scale). A released ``.pt`` or a diffusers folder is written as our safetensors export (``out=X.safetensors``);
the released VQGAN's own 0.3764 needs no measuring. Caches written with the old value are refused by Stage B
training: re-cache.
"""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig

from wuerstchen.training.latent_scale import check_rewritable, measure_latent_scale, write_scale_factor
from wuerstchen.weights import load_network


@hydra.main(version_base="1.3", config_path="../configs", config_name="measure_latent_scale")
def main(cfg: DictConfig) -> None:
    check_rewritable(cfg.ckpt, cfg.out)  # before minutes of measuring
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    stage_a, _ = load_network("a", cfg.ckpt)
    moments = measure_latent_scale(stage_a.to(device), hydra.utils.instantiate(cfg.data), int(cfg.num_images),
                                   int(cfg.batch_size))
    dst = write_scale_factor(cfg.ckpt, moments.scale_factor, cfg.out)
    print(f"{cfg.ckpt}: scale_factor {stage_a.scale_factor} -> {moments.scale_factor:.6g} (latent rms over "
          f"{moments.num_images} images; std {moments.std:.6g}, mean {moments.mean:.4g}); wrote {dst}")


if __name__ == "__main__":
    main()
