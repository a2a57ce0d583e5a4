"""Aspect buckets, the 0.75 compressor rule, crops and normalisation."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from wuerstchen.data import DEFAULT_RATIOS, AspectBuckets, ImageTransform
from wuerstchen.data.transforms import IMAGENET_MEAN, IMAGENET_STD, CropPlan, to_model_inputs
from wuerstchen.models.compressor import latent_size, prior_latent_size, view_size


@pytest.mark.parametrize("image_size", [256, 512, 768, 1024, 1536, 2048])
def test_buckets_are_multiples_of_32_with_the_configured_area(image_size: int) -> None:
    buckets = AspectBuckets(image_size, DEFAULT_RATIOS)
    area = image_size**2
    assert (image_size, image_size) in buckets.shapes
    for width, height in buckets.shapes:
        assert width % 32 == 0 and height % 32 == 0
        # snapping each side to 32 moves the area by at most about 32/side per side
        assert abs(width * height - area) / area <= 2 * 32 / min(width, height)
        assert (height, width) in buckets.shapes  # reciprocals are there
    # one bucket per ratio and orientation, minus duplicates (1 is its own reciprocal)
    assert len(buckets) <= 2 * len(DEFAULT_RATIOS) - 1
    ratios = [w / h for w, h in buckets.shapes]
    for r in DEFAULT_RATIOS:
        assert min(abs(math.log(x / r)) for x in ratios) < 0.1


def test_nearest_ratio_and_random_ratio_probability() -> None:
    buckets = AspectBuckets(1024, [1.0, 2.0])
    assert buckets.shapes == [(736, 1440), (1024, 1024), (1440, 736)]
    assert buckets.nearest(1000, 1000) == (1024, 1024)
    assert buckets.nearest(3000, 1600) == (1440, 736)
    assert buckets.nearest(500, 1000) == (736, 1440)
    noisy = AspectBuckets(1024, [1.0, 2.0], random_ratio_prob=0.25)
    rng = random.Random(0)
    picks = [noisy.assign(1000, 1000, rng) for _ in range(4000)]
    off = sum(p != (1024, 1024) for p in picks) / len(picks)
    assert abs(off - 0.25 * 2 / 3) < 0.03  # a random bucket is the nearest one a third of the time
    assert noisy.assign(1000, 1000) == (1024, 1024)  # no rng: deterministic nearest (validation)


@pytest.mark.parametrize("bad", [dict(image_size=1000), dict(image_size=0), dict(image_size=512, ratios=[0]),
                                 dict(image_size=512, random_ratio_prob=1.5)])
def test_bad_bucket_config_is_rejected(bad: dict) -> None:
    with pytest.raises(ValueError):
        AspectBuckets(**bad)


@pytest.mark.parametrize(("side", "effnet", "latent"), [(1024, 768, 24), (1536, 1152, 36), (2048, 1536, 48),
                                                         (512, 384, 12), (256, 192, 6), (128, 96, 3)])
def test_compressor_rule_square(side: int, effnet: int, latent: int) -> None:
    assert view_size(side) == effnet
    assert latent_size(side) == latent


@pytest.mark.parametrize(("resolution", "wide", "effnet", "latent"), [
    (1024, (1376, 768), (1024, 576), (32, 18)),
    (1536, (2048, 1152), (1536, 864), (48, 27)),
    (2048, (2720, 1536), (2048, 1152), (64, 36)),
])
def test_finetune_resolution_buckets_and_latents(resolution: int, wide: tuple, effnet: tuple, latent: tuple) -> None:
    """A fine-tune at `resolution` (experiment=stage_c_finetune): square and 16:9 buckets of area ~resolution^2, the
    compressor at 0.75 x each side snapped to 32, latent = view / 32 (W x H)."""
    transform = ImageTransform(resolution, ratios=DEFAULT_RATIOS)
    shapes = transform.buckets.shapes
    assert (resolution, resolution) in shapes and wide in shapes and wide[::-1] in shapes
    assert all(abs(w * h / resolution**2 - 1) < 0.06 for w, h in shapes)
    assert transform.output_sizes(wide)["effnet_images"] == effnet
    assert tuple(latent_size(side) for side in wide) == latent
    square = transform.output_sizes((resolution, resolution))["effnet_images"]
    assert square == (resolution * 3 // 4,) * 2 and latent_size(resolution) == resolution * 3 // 128


def test_sampling_latent_size_follows_the_training_rule() -> None:
    # released weights: ceil(side / 42.67); it equals the 0.75 training rule on every multiple of 128
    assert [prior_latent_size(side) for side in (1024, 1536, 2048)] == [24, 36, 48]
    assert all(prior_latent_size(side) == prior_latent_size(side, 0.75) == latent_size(side)
               for side in range(128, 4097, 128))
    # elsewhere they can differ, and a prior samples at the size it trained on (96 px at 0.75: 72 -> 64 -> 2)
    assert (prior_latent_size(96), prior_latent_size(96, 0.75)) == (3, 2)
    assert prior_latent_size(64, 1.5) == 3  # the demo: a 96 px compressor view of 64 px images


@pytest.mark.parametrize("image_size", [1024, 1536, 2048])
def test_compressor_rule_for_every_bucket(image_size: int) -> None:
    transform = ImageTransform(image_size, ratios=DEFAULT_RATIOS)
    for bucket in transform.buckets.shapes:
        sizes = transform.output_sizes(bucket)
        assert sizes["images"] == bucket
        for got, side in zip(sizes["effnet_images"], bucket):
            assert got % 32 == 0 and abs(got - 0.75 * side) <= 16
    # a non-square target: 1152x896 at 1024^2 area gives a 27x21 latent
    assert ImageTransform(1024).output_sizes((1152, 896))["effnet_images"] == (864, 672)


def _jpeg_bytes(width: int, height: int) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _jpeg(width: int, height: int) -> Image.Image:
    return Image.open(io.BytesIO(_jpeg_bytes(width, height)))


def test_transform_outputs_per_stage_and_crop_geometry() -> None:
    stage_b = ImageTransform(256, outputs=("images", "effnet_images"), random_crop=False)
    bucket, out = stage_b(_jpeg(400, 300))
    assert bucket == (256, 256)
    assert out["images"].shape == (3, 256, 256) and out["images"].dtype == torch.uint8
    assert out["effnet_images"].shape == (3, 192, 192)
    # the centre crop of a horizontal gradient keeps the middle: red at the left edge is ~ (400-300)/2/400*255
    assert abs(float(out["images"][0, :, 0].float().mean()) - 50 / 400 * 255) < 6
    stage_c = ImageTransform(256, outputs=("effnet_images",))
    _, out = stage_c(_jpeg(400, 300), random.Random(0))
    assert set(out) == {"effnet_images"}
    with pytest.raises(ValueError, match="outputs"):
        ImageTransform(256, outputs=("latents",))


def test_random_crops_follow_the_rng() -> None:
    transform = ImageTransform(64, outputs=("images",))
    crops = [transform(_jpeg(300, 100), random.Random(seed))[1]["images"] for seed in (0, 0, 1)]
    assert torch.equal(crops[0], crops[1])
    assert not torch.equal(crops[0], crops[2])


def _photo_jpeg_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A JPEG with detail at every scale (gradients, an 8 px checkerboard, sharp boxes, noise): a plain gradient
    survives any decode scale and would let a too-small draft pass."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 200 // width, y * 200 // height, (x // 8 + y // 8) % 2 * 60 + 80], axis=-1).astype(np.int16)
    for _ in range(30):
        left, top = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(width // 40, width // 6)), int(rng.integers(height // 40, height // 6))
        array[top:top + h, left:left + w] = rng.integers(0, 256, 3)
    array += rng.integers(-8, 9, array.shape, dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of two uint8 images in [0, 1]."""
    mse = float((a.float() / 255.0 - b.float() / 255.0).pow(2).mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


@pytest.mark.parametrize(("crop", "draft_size"), [(128, (256, 192)), (256, (512, 384))])
def test_jpeg_draft_matches_full_decoding_and_can_be_turned_off(crop: int, draft_size: tuple[int, int]) -> None:
    """Stage B's outputs of one random crop plan from a 1024x768 JPEG: draft mode decodes at 1/4 or 1/2 scale,
    ``jpeg_draft=False`` at the stored size, and the outputs agree to resampling noise.

    Measured with Pillow 13.0.0: 41.4 / 41.7 dB (crop) and 43.8 / 43.9 dB (view); decoding one more halving too small
    (1/8) gives 36.9 / 30.9 dB and 28.6 / 32.2 dB, below the bound."""
    data = _photo_jpeg_bytes(1024, 768)
    outputs, decoded = {}, {}
    for draft in (True, False):
        transform = ImageTransform(crop, outputs=("images", "effnet_images"), jpeg_draft=draft)
        plan = transform.plan(1024, 768, random.Random(0))  # the same random crop in both passes
        assert plan.box[0] not in (0.0, 128.0)  # neither edge nor centre: the box must map into the smaller decode
        with Image.open(io.BytesIO(data)) as image:
            outputs[draft] = transform.render(image, plan)
            decoded[draft] = image.size  # draft shrinks the image in place before decoding
    assert ImageTransform(crop).jpeg_draft  # the default
    assert decoded == {True: draft_size, False: (1024, 768)}
    for key in ("images", "effnet_images"):
        assert outputs[True][key].shape == outputs[False][key].shape
        assert 39.0 < _psnr(outputs[True][key], outputs[False][key]) < math.inf  # < inf: the draft path really ran


def test_to_model_inputs_ranges() -> None:
    batch = {"images": torch.full((2, 3, 4, 4), 255, dtype=torch.uint8),
             "effnet_images": torch.zeros((2, 3, 4, 4), dtype=torch.uint8), "captions": ["a", "b"]}
    out = to_model_inputs(batch)
    assert out["images"].dtype == torch.float32 and torch.all(out["images"] == 1.0)
    expected = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out["effnet_images"][0, :, 0, 0], expected)
    assert out["captions"] == ["a", "b"]


# -- valid images are never rejected: the crop box over real sizes, every bucket, both crop modes ------------------
# Sides from 200 to 4096: odd ones, powers of two and their neighbours, and common LAION sizes (1333, 2731, ...).
SIDES = [200, 201, 255, 256, 257, 299, 333, 375, 480, 499, 500, 511, 512, 513, 600, 640, 683, 720, 767, 768, 800, 853,
         956, 1000, 1023, 1024, 1080, 1200, 1280, 1333, 1365, 1440, 1500, 1600, 1920, 2000, 2047, 2048, 2560, 2731,
         3000, 3072, 3840, 4000, 4095, 4096]


def laion_bucket_ratios() -> list[float]:
    from omegaconf import OmegaConf

    from helpers import ROOT

    return [float(r) for r in OmegaConf.load(ROOT / "configs" / "data" / "laion_buckets.yaml").ratios]


class EdgeRandom(random.Random):
    """A generator whose every draw is ``u``: crops flush with the left/top (0) or right/bottom (1 - 2^-53) edge."""

    def __init__(self, u: float) -> None:
        super().__init__(0)
        self.u = u

    def random(self) -> float:
        return self.u


def crop_rngs(random_crop: bool) -> list[random.Random | None]:
    return [random.Random(7), EdgeRandom(0.0), EdgeRandom(1.0 - 2.0**-53)] if random_crop else [None]


@pytest.mark.parametrize("image_size", [256, 1024])
@pytest.mark.parametrize("random_crop", [False, True])
def test_crop_boxes_over_real_sizes_pass_pils_checks(image_size: int, random_crop: bool) -> None:
    """For every size x bucket (square and the multi-aspect config's) x crop position, PIL's own resize accepts the
    box (before the clamp, 956x1333 at 256 px gave left = -5.7e-14: "box offset can't be negative"), the box spans
    the image along one side and has the bucket's aspect ratio."""
    transforms = [ImageTransform(image_size, ratios=ratios, random_crop=random_crop)
                  for ratios in ([1.0], laion_bucket_ratios())]
    num_buckets = 1 + len(transforms[1].buckets)
    assert num_buckets == {256: 1 + 7, 1024: 1 + 11}[image_size]  # at 256 px some ratios snap to one shape
    checked = 0
    for width in SIDES:
        for height in SIDES:
            # PIL checks a resize box before any work, the same for every mode; a "P" image resamples NEAREST into
            # an 8x8 output, so the check costs nothing at 4096 px
            image = Image.new("P", (width, height))
            for transform in transforms:
                for bucket in transform.buckets.shapes:
                    for rng in crop_rngs(random_crop):
                        left, top, right, bottom = box = transform.crop_box(width, height, bucket, rng)
                        image.resize((8, 8), box=box)
                        assert 0.0 <= left < right <= width and 0.0 <= top < bottom <= height
                        assert math.isclose(right - left, width) or math.isclose(bottom - top, height)
                        assert math.isclose((right - left) / (bottom - top), bucket[0] / bucket[1], rel_tol=1e-9)
                        checked += 1
    assert checked == len(SIDES) ** 2 * num_buckets * len(crop_rngs(random_crop))


@pytest.mark.parametrize("random_crop", [False, True])
def test_transform_renders_every_bucket_of_awkward_sizes(random_crop: bool) -> None:
    """The whole transform (JPEG draft, RGB decode, bicubic resample from the planned box) on odd sizes, the issue's
    956x1333 among them, into every multi-aspect bucket with crops at both edges: no error, every output at the
    bucket's size. JPEGs decode at a reduced scale, so the box must also map into the smaller decoded image."""
    transform = ImageTransform(256, ratios=laion_bucket_ratios(), random_crop=random_crop)
    rngs = [EdgeRandom(0.0), EdgeRandom(1.0 - 2.0**-53)] if random_crop else [None]
    sides = [201, 333, 683, 956, 1333]
    sources = {(w, h): lambda w=w, h=h: Image.new("RGB", (w, h), (200, 30, 90)) for w in sides for h in sides}
    for width, height in [(956, 1333), (1333, 956), (2047, 1535)]:
        data = _jpeg_bytes(width, height)
        sources[(width, height, "jpeg")] = lambda data=data: Image.open(io.BytesIO(data))
    for (width, height, *_), source in sources.items():
        for bucket in transform.buckets.shapes:
            for rng in rngs:
                plan = CropPlan(bucket, transform.crop_box(width, height, bucket, rng), (width, height))
                outputs = transform.render(source(), plan)
                assert {k: tuple(v.shape) for k, v in outputs.items()} == {
                    k: (3, h, w) for k, (w, h) in transform.output_sizes(bucket).items()}


def test_plan_makes_every_random_draw_and_render_none() -> None:
    """A skipped sample runs the plan only: it must leave the generator where plan + render would."""
    transform = ImageTransform(64, ratios=[1.0, 2.0], random_ratio_prob=0.5)
    full, planned = random.Random(3), random.Random(3)
    for width, height in [(300, 100), (100, 300), (128, 128), (957, 641)] * 5:
        bucket, outputs = transform(_jpeg(width, height), full)
        plan = transform.plan(width, height, planned)
        assert plan.bucket == bucket and full.getstate() == planned.getstate()
        assert torch.equal(transform.render(_jpeg(width, height), plan)["images"], outputs["images"])
    with pytest.raises(ValueError, match="no pixels"):
        transform.plan(0, 10)
