"""Text-to-image through Stage C -> B -> A from our checkpoints or converted released weights.

    python scripts/sample.py stage_b_ckpt=runs/demo/stage_b/checkpoints/last.ckpt \
        stage_c_ckpt=runs/demo/stage_c/checkpoints/last.ckpt prompt="a red circle in the top left" height=128 width=128

Writes one PNG per image, ``grid.png`` and ``samples.json`` (prompt, seed and file of every image) to ``out``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image

from wuerstchen.diffusion import linear_timesteps, stage_c_timesteps
from wuerstchen.pipeline import Pipeline

log = logging.getLogger(__name__)


def prompts(cfg: DictConfig) -> list[str]:
    if cfg.prompts_file:
        lines = [line.strip() for line in Path(cfg.prompts_file).read_text().splitlines()]
        return [line for line in lines if line]
    if cfg.prompt:
        return [str(cfg.prompt)]
    raise ValueError("set prompt=... or prompts_file=...")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60]


@hydra.main(version_base="1.3", config_path="../configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    options = OmegaConf.to_container(cfg, resolve=True)
    pipeline = Pipeline.from_checkpoints(
        cfg.stage_c_ckpt, cfg.stage_b_ckpt, cfg.stage_a_ckpt, text_encoder=options["text_encoder"],
        decoder_text_encoder=options["decoder_text_encoder"], effnet_scale=cfg.effnet_scale, ema=bool(cfg.ema),
        device=device)
    jobs = [p for p in prompts(cfg) for _ in range(cfg.num_images)]
    grid = stage_c_timesteps() if cfg.steps == 29 else linear_timesteps(cfg.steps)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    images, records = [], []
    for start in range(0, len(jobs), cfg.batch_size):
        batch = jobs[start:start + cfg.batch_size]
        generated = pipeline(batch, cfg.height, cfg.width, grid, cfg.cfg, cfg.decoder_steps, cfg.decoder_cfg,
                             generator).cpu()
        for offset, (caption, image) in enumerate(zip(batch, generated)):
            path = out / f"{start + offset:04d}_{slug(caption)}.png"
            save_image(image, path)
            records.append({"prompt": caption, "file": path.name, "index": start + offset})
        images.append(generated)
        log.info("%d / %d images", min(start + cfg.batch_size, len(jobs)), len(jobs))
    save_image(torch.cat(images), out / "grid.png", nrow=cfg.num_images)
    (out / "samples.json").write_text(json.dumps({"seed": cfg.seed, "images": records}, indent=1) + "\n")
    print(f"wrote {len(jobs)} images and grid.png to {out}")


if __name__ == "__main__":
    main()
