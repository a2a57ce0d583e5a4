"""Aspect buckets that the stages' networks can take: Stage B's U-Net needs 64-px sides, Stage C's prior any 32 px.

The tiny Stage B keeps the released level structure (patch 2, 4 levels: configs/model/stage_b/full.yaml) at tiny
widths, so it down-samples exactly like the released one.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import good_sample, write_tar
from omegaconf import OmegaConf

from wuerstchen.data.buckets import BASE_MULTIPLE, AspectBuckets, resolve_multiple
from wuerstchen.data.datamodule import WebDataModule
from wuerstchen.models.compressor import latent_size
from wuerstchen.models import StageA, StageB, StageC
from wuerstchen.models.stage_b import RELEASED_PIXEL_MULTIPLE, pixel_multiple

ROOT = Path(__file__).resolve().parents[2]
RATIOS = [float(r) for r in OmegaConf.load(ROOT / "configs" / "data" / "laion_buckets.yaml").ratios]
CLIP_EMBD = 8
# the released Stage B's levels at tiny widths
TINY_RELEASED = dict(c_cond=16, c_hidden=[8, 16, 32, 32], nhead=[-1, 2, 2, 2], blocks=[1, 1, 1, 1],
                     level_config=["CT", "CTA", "CTA", "CTA"], inject_effnet=[False, True, True, True],
                     clip_embd=CLIP_EMBD, dropout=0.0)


def tiny_stage_b() -> StageB:
    torch.manual_seed(0)
    network = StageB(**TINY_RELEASED)
    torch.nn.init.normal_(network.clf[1].weight, std=0.02)  # zero at init: no gradient would reach the rest
    return network


def stage_b_step(network: StageB, width: int, height: int) -> None:
    """Forward and backward at one bucket's Stage A latent (image / 4) with the matching compressor latent."""
    x = torch.randn(1, 4, height // 4, width // 4)
    effnet = torch.randn(1, 16, latent_size(height), latent_size(width))  # the 0.75 view / 32
    out = network(x, torch.rand(1), effnet, torch.randn(1, 77, CLIP_EMBD))
    assert out.shape == x.shape
    out.square().mean().backward()
    grads = [p.grad for p in network.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert network.embedding[1].weight.grad.abs().sum() > 0
    network.zero_grad(set_to_none=True)


def test_stage_multiples_follow_the_network_configs() -> None:
    full = OmegaConf.load(ROOT / "configs" / "model" / "stage_b" / "full.yaml")
    tiny = OmegaConf.load(ROOT / "configs" / "model" / "stage_b" / "tiny.yaml")
    assert pixel_multiple(full.patch_size, len(full.c_hidden)) == RELEASED_PIXEL_MULTIPLE == 64
    assert pixel_multiple(tiny.patch_size, len(tiny.c_hidden)) == 32
    assert StageB(**TINY_RELEASED).pixel_multiple == 64
    assert StageA(levels=2, bottleneck_blocks=1, c_hidden=16, codebook_size=8).pixel_multiple == 4
    assert resolve_multiple(None, 64) == 64 and resolve_multiple(None, 4) == resolve_multiple(None, 1) == 32
    assert resolve_multiple(128, 64) == 128


def test_a_multiple_the_stage_cannot_take_is_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match="data.multiple=32: StageBModule needs .* multiples of 64"):
        resolve_multiple(32, 64, "StageBModule")
    with pytest.raises(ValueError, match="data.image_size=544 must be a positive multiple of 64"):
        AspectBuckets(544, RATIOS, multiple=64)


@pytest.mark.parametrize("image_size", [512, 1024])
@pytest.mark.parametrize("multiple", [BASE_MULTIPLE, RELEASED_PIXEL_MULTIPLE])
def test_buckets_keep_the_area_on_the_stage_grid(image_size: int, multiple: int) -> None:
    buckets = AspectBuckets(image_size, RATIOS, multiple=multiple)
    area = image_size**2
    assert (image_size, image_size) in buckets.shapes and len(buckets) >= 5
    for width, height in buckets.shapes:
        assert width % multiple == 0 and height % multiple == 0
        assert abs(width * height / area - 1) <= 0.035
        if multiple > BASE_MULTIPLE:  # the short side snapped, the long one fitted: the documented bound
            assert abs(width * height / area - 1) <= multiple / (2 * image_size)
        assert (height, width) in buckets.shapes


@pytest.mark.parametrize("image_size", [512, pytest.param(1024, marks=pytest.mark.slow)])
def test_tiny_released_stage_b_trains_on_every_stage_b_bucket(image_size: int) -> None:
    network = tiny_stage_b()
    shapes = AspectBuckets(image_size, RATIOS, multiple=network.pixel_multiple).shapes
    for width, height in shapes:
        stage_b_step(network, width, height)


def test_the_32_px_buckets_break_the_released_stage_b() -> None:
    """What the 64-px grid fixes: every 32-px bucket with a side off the 64 grid fails in the U-Net's up path."""
    network = tiny_stage_b()
    failing = 0
    for image_size in (512, 1024):
        for width, height in AspectBuckets(image_size, RATIOS, multiple=32).shapes:
            x = torch.randn(1, 4, height // 4, width // 4)
            if width % 64 == 0 and height % 64 == 0:
                continue
            with pytest.raises(RuntimeError, match="Expected size"):
                network(x, torch.rand(1), torch.randn(1, 16, 4, 4), torch.randn(1, 77, CLIP_EMBD))
            failing += 1
    assert failing == 16  # of the 20 buckets at 512 and 1024 px (640x416 among them)


@pytest.mark.parametrize("image_size", [512, 1024])
def test_tiny_prior_trains_on_every_stage_c_bucket(image_size: int) -> None:
    torch.manual_seed(0)
    prior = StageC(c_in=16, c=32, c_cond=CLIP_EMBD, c_r=16, depth=1, nhead=2, dropout=0.0)
    torch.nn.init.normal_(prior.out[1].weight, std=0.02)
    for width, height in AspectBuckets(image_size, RATIOS, multiple=BASE_MULTIPLE).shapes:
        x = torch.randn(1, 16, latent_size(height), latent_size(width))  # the compressor's view / 32
        out = prior(x, torch.rand(1), torch.randn(1, 77, CLIP_EMBD))
        assert out.shape == x.shape
        out.square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in prior.parameters() if p.grad is not None)
        assert prior.projection.weight.grad.abs().sum() > 0
        prior.zero_grad(set_to_none=True)


# -- end to end: the real Stage B module sets the data's multiple --------------------------------------------------
class BatchShapes(L.Callback):
    def __init__(self) -> None:
        self.shapes: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.shapes.append(tuple(batch["images"].shape[-2:]))


def stage_b_module():
    """``stage=b`` with tiny networks: the released Stage B levels, the tiny compressor and text tower, a tiny f4
    Stage A handed over instead of a checkpoint."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    overrides = ["stage=b", "model/effnet@stage.effnet=tiny", "model/text_encoder@stage.text_encoder=tiny",
                 "stage.sync_batchnorm=false"]
    overrides += [f"stage.stage_b.{k}={v}" for k, v in dict(TINY_RELEASED, clip_embd=32).items()]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    torch.manual_seed(0)
    stage_a = StageA(levels=2, bottleneck_blocks=1, c_hidden=16, codebook_size=8)
    return instantiate(cfg.stage, stage_a=stage_a)


def test_data_module_driven_by_stage_b_yields_only_64_px_sides(tmp_path: Path) -> None:
    sizes = [(400, 200), (200, 400), (300, 300), (390, 260), (260, 390), (480, 270)]
    samples = {f"{i:03d}": good_sample(i, width=w, height=h) for i, (w, h) in enumerate(sizes * 4)}
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "0.tar", samples)
    module = stage_b_module()
    assert module.pixel_multiple == 64
    data = WebDataModule(str(tmp_path / "shards"), batch_size=2, image_size=256, ratios=RATIOS, filter=None,
                         batches_per_epoch=4, num_workers=0, shuffle_buffer=0, require_caption=True)
    assert any(w % 64 or h % 64 for w, h in data.train_transform.buckets.shapes)  # 32-px until the stage asks
    recorder = BatchShapes()
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert data.train_transform.buckets.multiple == 64
    assert len(recorder.shapes) == 4 and len(set(recorder.shapes)) >= 2  # several buckets, all on the 64 grid
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in recorder.shapes), recorder.shapes

    refused = WebDataModule(str(tmp_path / "shards"), batch_size=2, image_size=256, ratios=RATIOS, filter=None,
                            num_workers=0, multiple=32)
    refused.trainer = trainer
    with pytest.raises(ValueError, match="data.multiple=32: StageBModule needs"):
        refused.setup("fit")


def test_cache_shapes_follow_the_recorded_multiple(tmp_path: Path) -> None:
    """A Stage B cache records its sides' multiple; one from before the key has 32-px buckets, and a folder of those
    does not take shards on another grid."""
    import json

    from wuerstchen.data.cached import INFO, STAGE_A, expected_shapes, prepare_cache_info

    info = {"stage": "b", "image_size": 512, "ratios": RATIOS, "effnet_scale": 0.75}
    old = {shapes[STAGE_A] for shapes in expected_shapes(info, (77, 8))}
    new = {shapes[STAGE_A] for shapes in expected_shapes({**info, "multiple": 64}, (77, 8))}
    assert (4, 104, 160) in old  # 640x416
    assert len(new) == 5 and all(4 * h % 64 == 0 and 4 * w % 64 == 0 for _, h, w in new)
    (tmp_path / INFO).write_text(json.dumps(info))
    with pytest.raises(ValueError, match="multiple: 32 there, 64 now"):
        prepare_cache_info(tmp_path, {**info, "multiple": 64}, ["/src/00000.tar"])
    assert prepare_cache_info(tmp_path, {**info, "multiple": 32}, ["/src/00000.tar"])["multiple"] == 32
