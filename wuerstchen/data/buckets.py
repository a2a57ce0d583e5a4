"""Multi-aspect buckets of constant area (StableCascade's design: the buckets keep the area, sides snap to a multiple).

The multiple is what the stage's network needs of an image side (``StageModule.pixel_multiple``): 32 for Stage C's
compressor views, 64 for the released Stage B v2 (f4 latents, PixelUnshuffle(2), three halvings). StableCascade's
training snaps every stage's buckets to 32 (``core/data/bucketeer.py``, ``factor=32``); its Stage B gets away with
it by resizing the up path to each skip when they differ (``modules/stage_b.py``, ``_up_decode``), which the v2
DiffNeXt we train (and diffusers' ``WuerstchenDiffNeXt``) does not do.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

# Landscape ratios (width / height); their reciprocals are added for portrait images.
DEFAULT_RATIOS = (1.0, 5 / 4, 4 / 3, 3 / 2, 16 / 9, 2.0)
# The sides' multiple when the stage needs no coarser one: StableCascade's buckets (``factor=32``), and the sizes
# scripts/train.py and the sampling pipeline accept.
BASE_MULTIPLE = 32


def snap(value: float, multiple: int = BASE_MULTIPLE) -> int:
    """Nearest positive multiple of ``multiple`` (halves round up)."""
    return max(multiple, int(math.floor(value / multiple + 0.5)) * multiple)


def bucket_shape(area: float, ratio: float, multiple: int) -> tuple[int, int]:
    """(width, height) of about ``area`` pixels and aspect ``ratio``: the short side is snapped to ``multiple``, then
    the long side is the multiple that brings the area nearest ``area``.

    Choosing the long side from the snapped short one keeps the area within ``multiple / (2 * sqrt(area))`` of the
    target (3.1 % at 1024 px with 64-px sides) where snapping both sides on their own can add the two errors (640x448
    at 512 px and 64: +9.4 %).
    """
    long_over_short = max(ratio, 1.0 / ratio)
    short = snap(math.sqrt(area / long_over_short), multiple)
    long = snap(area / short, multiple)
    return (long, short) if ratio >= 1.0 else (short, long)


def rounded_bucket_shape(area: float, ratio: float, multiple: int = BASE_MULTIPLE) -> tuple[int, int]:
    """Each side snapped on its own (StableCascade's Bucketeer, which floors instead): the 32-px buckets' rule."""
    return snap(math.sqrt(area * ratio), multiple), snap(math.sqrt(area / ratio), multiple)


def resolve_multiple(requested: int | None, required: int, what: str = "the stage") -> int:
    """The sides' multiple of a run: ``requested`` (``data.multiple``) when it satisfies ``required`` (the stage's
    ``pixel_multiple``), else a clear error; None gives the smallest multiple of both ``required`` and 32."""
    required = int(required)
    if requested is None:
        return math.lcm(BASE_MULTIPLE, required)
    if int(requested) <= 0 or int(requested) % required:
        raise ValueError(f"data.multiple={requested}: {what} needs image sides in multiples of {required} px; set "
                         f"data.multiple to a multiple of {required} (or null to ask the stage)")
    return int(requested)


class AspectBuckets:
    """Image shapes (width, height) of about ``image_size**2`` pixels, sides multiples of ``multiple``.

    Every ratio ``r`` in ``ratios`` and its reciprocal gives one bucket. On the 32-px grid each side is rounded on
    its own (:func:`rounded_bucket_shape`, the rule every 32-px run and cache so far used); on a coarser grid, where
    rounding both sides compounds their errors (640x448 at 512 px on 64: +9.4 %), the short side is snapped and the
    long side fitted to the area (:func:`bucket_shape`: within ``multiple / (2 * image_size)``). ``keep_area`` forces
    one rule. An image goes to the bucket whose ratio is nearest in log space, or, with probability
    ``random_ratio_prob``, to a random bucket (a little shape augmentation). ``ratios=[1]`` is the square crop.
    Ratios that snap to one shape give one bucket.
    """

    def __init__(self, image_size: int, ratios: Sequence[float] = DEFAULT_RATIOS, multiple: int = BASE_MULTIPLE,
                 random_ratio_prob: float = 0.0, keep_area: bool | None = None) -> None:
        if multiple <= 0:
            raise ValueError(f"data.multiple={multiple} must be positive")
        if image_size <= 0 or image_size % multiple:
            raise ValueError(f"data.image_size={image_size} must be a positive multiple of {multiple} (data.multiple:"
                             f" the image side multiple the stage's network needs)")
        if not ratios or any(float(r) <= 0 for r in ratios):
            raise ValueError(f"aspect ratios must be positive, got {list(ratios)}")
        if not 0.0 <= random_ratio_prob <= 1.0:
            raise ValueError(f"random_ratio_prob={random_ratio_prob} must be in [0, 1]")
        self.image_size = int(image_size)
        self.multiple = int(multiple)
        self.random_ratio_prob = float(random_ratio_prob)
        area = float(image_size) ** 2
        if keep_area is None:
            keep_area = self.multiple > BASE_MULTIPLE
        shape_of = bucket_shape if keep_area else rounded_bucket_shape
        shapes = {shape_of(area, r, self.multiple) for ratio in ratios for r in (float(ratio), 1.0 / float(ratio))}
        self.shapes: list[tuple[int, int]] = sorted(shapes, key=lambda wh: wh[0] / wh[1])
        self._log_ratios = [math.log(w / h) for w, h in self.shapes]

    def __len__(self) -> int:
        return len(self.shapes)

    def nearest(self, width: int, height: int) -> tuple[int, int]:
        """The bucket whose aspect ratio is closest to ``width / height``."""
        target = math.log(width / height)
        index = min(range(len(self.shapes)), key=lambda i: abs(self._log_ratios[i] - target))
        return self.shapes[index]

    def assign(self, width: int, height: int, rng: random.Random | None = None) -> tuple[int, int]:
        """Bucket for an image of this size; random with probability ``random_ratio_prob`` when ``rng`` is given."""
        if rng is not None and self.random_ratio_prob > 0 and rng.random() < self.random_ratio_prob:
            return self.shapes[rng.randrange(len(self.shapes))]
        return self.nearest(width, height)

    def __repr__(self) -> str:
        return f"AspectBuckets(image_size={self.image_size}, multiple={self.multiple}, shapes={self.shapes})"
