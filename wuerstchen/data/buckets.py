"""Multi-aspect buckets of constant area (StableCascade's design: the buckets keep the area, sides snap to 32)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

# Landscape ratios (width / height); their reciprocals are added for portrait images.
DEFAULT_RATIOS = (1.0, 5 / 4, 4 / 3, 3 / 2, 16 / 9, 2.0)


def snap(value: float, multiple: int = 32) -> int:
    """Nearest positive multiple of ``multiple`` (halves round up)."""
    return max(multiple, int(math.floor(value / multiple + 0.5)) * multiple)


class AspectBuckets:
    """Image shapes (width, height) of about ``image_size**2`` pixels, sides multiples of ``multiple``.

    Every ratio ``r`` in ``ratios`` and its reciprocal gives one bucket ``(snap(sqrt(A*r)), snap(sqrt(A/r)))``.
    An image goes to the bucket whose ratio is nearest in log space, or, with probability ``random_ratio_prob``, to a
    random bucket (a little shape augmentation). ``ratios=[1]`` is the square crop.
    """

    def __init__(self, image_size: int, ratios: Sequence[float] = DEFAULT_RATIOS, multiple: int = 32,
                 random_ratio_prob: float = 0.0) -> None:
        if image_size <= 0 or image_size % multiple:
            raise ValueError(f"image_size={image_size} must be a positive multiple of {multiple}")
        if not ratios or any(float(r) <= 0 for r in ratios):
            raise ValueError(f"aspect ratios must be positive, got {list(ratios)}")
        if not 0.0 <= random_ratio_prob <= 1.0:
            raise ValueError(f"random_ratio_prob={random_ratio_prob} must be in [0, 1]")
        self.image_size = int(image_size)
        self.multiple = int(multiple)
        self.random_ratio_prob = float(random_ratio_prob)
        area = float(image_size) ** 2
        shapes = set()
        for ratio in ratios:
            for r in (float(ratio), 1.0 / float(ratio)):
                shapes.add((snap(math.sqrt(area * r), multiple), snap(math.sqrt(area / r), multiple)))
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
        return f"AspectBuckets(image_size={self.image_size}, shapes={self.shapes})"
