"""Per-stage image transforms: crops at the training resolution and the semantic compressor's 0.75x view.

Workers hand over uint8 tensors (4x less inter-process traffic than float32); :func:`to_model_inputs` turns a batch
into what the networks take, on the device, after the transfer.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..models.compressor import VIEW_SCALE, view_size
from .buckets import BASE_MULTIPLE, DEFAULT_RATIOS, AspectBuckets


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Output keys a transform can produce: Stage A/B images, and the semantic compressor's view.
IMAGES = "images"
EFFNET_IMAGES = "effnet_images"
OUTPUT_KEYS = (IMAGES, EFFNET_IMAGES)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "lanczos": Image.Resampling.LANCZOS}


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 tensor from an RGB PIL image."""
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class CropPlan:
    """Where one sample's outputs come from: its aspect bucket and the crop box in the stored image's pixels."""

    bucket: tuple[int, int]  # (width, height) of the ``images`` output
    box: tuple[float, float, float, float]  # (left, top, right, bottom) in source pixels
    source_size: tuple[int, int]  # (width, height) of the stored image, as its header gives it


def _clamp_box(box: tuple[float, float, float, float], width: int, height: int
               ) -> tuple[float, float, float, float]:
    """The box moved inside a width x height image (PIL checks 0 <= left <= right <= width, the same for y)."""
    left, top = min(max(box[0], 0.0), float(width)), min(max(box[1], 0.0), float(height))
    return left, top, min(max(box[2], left), float(width)), min(max(box[3], top), float(height))


def _scale_box(box: tuple[float, float, float, float], source: tuple[int, int], decoded: tuple[int, int]
               ) -> tuple[float, float, float, float]:
    """A box planned on the stored size, in the pixels of the decoded image (smaller when JPEG draft mode ran)."""
    if tuple(decoded) == tuple(source):
        return box
    sx, sy = decoded[0] / source[0], decoded[1] / source[1]
    return _clamp_box((box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy), *decoded)


class ImageTransform:
    """Crop an image to its aspect bucket and render the outputs one stage needs.

    The crop box is chosen once in the source image's coordinates (resize to cover the bucket, then a random crop for
    training or a centre crop for validation), and each output is resampled straight from that box: ``images`` at the
    bucket size (Stage A/B), ``effnet_images`` at ``view_size`` of each side (the semantic compressor). JPEGs are
    decoded at a reduced scale (``draft``) when the largest output allows, which makes small crops of large photos
    several times cheaper (``jpeg_draft=False`` decodes every image at full size).

    The work comes in two steps: :meth:`plan` picks the bucket and the box from the image's size (its header) and
    makes every random draw; :meth:`render` decodes and resamples, deterministically. ``transform(image, rng)`` does
    both.

    Args:
        image_size: training side (square) or the side of the bucket area (multi-aspect); multiple of ``multiple``.
        outputs: which of ``images`` / ``effnet_images`` to produce (Stage A: images; B: both; C: effnet_images).
        ratios: aspect ratios for buckets; ``[1]`` gives square crops.
        random_ratio_prob: probability of a random bucket instead of the nearest one.
        random_crop: random crop position (training) instead of the centre (validation).
        effnet_scale: compressor side / image side (0.75 in the paper).
        multiple: the buckets' sides are multiples of it, what the stage's networks need
            (``StageModule.pixel_multiple``; the compressor views are snapped to 32 on their own whatever it is).
        jpeg_draft: let the JPEG decoder shrink by 1/2, 1/4 or 1/8 while the crop keeps every output's detail; off,
            each JPEG decodes at its stored size (the reference for ``scripts/bench_data.py --draft-sources``).
    """

    def __init__(self, image_size: int, outputs: Sequence[str] = OUTPUT_KEYS, ratios: Sequence[float] = (1.0,),
                 random_ratio_prob: float = 0.0, random_crop: bool = True, effnet_scale: float = VIEW_SCALE,
                 interpolation: str = "bicubic", multiple: int = BASE_MULTIPLE, jpeg_draft: bool = True) -> None:
        unknown = set(outputs) - set(OUTPUT_KEYS)
        if unknown or not outputs:
            raise ValueError(f"transform outputs must be a non-empty subset of {OUTPUT_KEYS}, got {list(outputs)}")
        if interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation={interpolation!r} is not one of {sorted(_RESAMPLE)}")
        self.buckets = AspectBuckets(image_size, [float(r) for r in ratios], multiple=multiple,
                                     random_ratio_prob=random_ratio_prob)
        self.outputs = tuple(outputs)
        self.random_crop = bool(random_crop)
        self.effnet_scale = float(effnet_scale)
        self.resample = _RESAMPLE[interpolation]
        self.jpeg_draft = bool(jpeg_draft)

    @classmethod
    def multi_aspect(cls, image_size: int, **kwargs) -> "ImageTransform":
        """The multi-aspect default: StableCascade-like ratios and their reciprocals."""
        return cls(image_size, ratios=kwargs.pop("ratios", DEFAULT_RATIOS), **kwargs)

    def output_sizes(self, bucket: tuple[int, int]) -> dict[str, tuple[int, int]]:
        """(width, height) of every output for a bucket."""
        width, height = bucket
        sizes = {IMAGES: (width, height),
                 EFFNET_IMAGES: (view_size(width, self.effnet_scale), view_size(height, self.effnet_scale))}
        return {key: sizes[key] for key in self.outputs}

    def crop_box(self, width: int, height: int, bucket: tuple[int, int],
                 rng: random.Random | None) -> tuple[float, float, float, float]:
        """Box (left, top, right, bottom) in source pixels that covers the bucket's aspect ratio.

        The box is clamped to the image: computed in floating point, the side that spans the image can come out a
        hair longer than it (956x1333 at a 256 px square: left = -5.7e-14), which PIL refuses ("box offset can't be
        negative") and which would reject a valid image. Random crops draw two numbers whatever the size.
        """
        scale = max(bucket[0] / width, bucket[1] / height)
        box_w, box_h = min(bucket[0] / scale, float(width)), min(bucket[1] / scale, float(height))
        if self.random_crop and rng is not None:
            left, top = rng.uniform(0.0, width - box_w), rng.uniform(0.0, height - box_h)
        else:
            left, top = (width - box_w) / 2.0, (height - box_h) / 2.0
        return _clamp_box((left, top, left + box_w, top + box_h), width, height)

    def plan(self, width: int, height: int, rng: random.Random | None = None) -> CropPlan:
        """Bucket and crop box from the image's size alone (its header): every random draw the transform makes.

        Planning without rendering draws the same numbers in the same order, which lets a resumed stream replay the
        samples it skips without decoding them (``WebImageTextDataset.skip_batches``).
        """
        if width < 1 or height < 1:
            raise ValueError(f"image size {width}x{height} has no pixels")
        bucket = self.buckets.assign(width, height, rng=rng)
        return CropPlan(bucket, self.crop_box(width, height, bucket, rng), (int(width), int(height)))

    def render(self, image: Image.Image, plan: CropPlan) -> dict[str, torch.Tensor]:
        """Decode a (lazily opened) image and resample every output from the planned box; draws no random number."""
        sizes = self.output_sizes(plan.bucket)
        largest = max(sizes.values(), key=lambda wh: wh[0] * wh[1])
        if self.jpeg_draft:
            self._draft(image, plan.bucket, largest)
        image = image.convert("RGB")
        box = _scale_box(plan.box, plan.source_size, image.size)
        return {key: pil_to_uint8(image.resize(size, self.resample, box=box)) for key, size in sizes.items()}

    def __call__(self, image: Image.Image, rng: random.Random | None = None
                 ) -> tuple[tuple[int, int], dict[str, torch.Tensor]]:
        """Transform a (lazily opened) PIL image; returns the bucket and the uint8 (3, h, w) outputs."""
        plan = self.plan(*image.size, rng=rng)
        return plan.bucket, self.render(image, plan)

    @staticmethod
    def _draft(image: Image.Image, bucket: tuple[int, int], largest: tuple[int, int]) -> None:
        """Let the JPEG decoder shrink by a power of two while the crop still holds ``largest`` at full detail."""
        if image.format != "JPEG":
            return
        width, height = image.size
        cover = max(bucket[0] / width, bucket[1] / height) * max(largest[0] / bucket[0], largest[1] / bucket[1])
        if cover < 1.0:
            image.draft("RGB", (int(width * cover) + 1, int(height * cover) + 1))


def to_model_inputs(batch: dict, dtype: torch.dtype = torch.float32) -> dict:
    """Convert a collated batch in place: ``images`` to [0, 1], ``effnet_images`` ImageNet-normalised."""
    if IMAGES in batch:
        batch[IMAGES] = batch[IMAGES].to(dtype).div_(255.0)
    if EFFNET_IMAGES in batch:
        x = batch[EFFNET_IMAGES].to(dtype).div_(255.0)
        mean = torch.tensor(IMAGENET_MEAN, dtype=dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=dtype, device=x.device).view(1, 3, 1, 1)
        batch[EFFNET_IMAGES] = x.sub_(mean).div_(std)
    return batch
