"""The LAION metadata filter of the official training code, applied to a sample's json (and, for the size check, to
the image header when the json holds no size) before any decoding."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Keys under which img2dataset / LAION-5B releases store the aesthetic score.
AESTHETIC_KEYS = ("aesthetic", "AESTHETIC_SCORE")
# (width, height) keys in the order they are trusted: img2dataset's size before resizing, the stored size (written
# when it re-encodes without resizing), LAION's own parquet columns (saved with img2dataset's
# --save_additional_columns). With --disable_all_reencoding img2dataset writes none of the first two.
SIZE_KEYS = (("original_width", "original_height"), ("width", "height"), ("WIDTH", "HEIGHT"))


def _numbers(meta: Mapping[str, Any], *keys: str) -> list[float]:
    """The finite numeric values under ``keys``, skipping missing, null and non-numeric entries."""
    numbers = []
    for key in keys:
        value = meta.get(key)
        if isinstance(value, bool) or value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: a json integer beyond float range
            continue
        if math.isfinite(number):
            numbers.append(number)
    return numbers


def _number(meta: Mapping[str, Any], *keys: str) -> float | None:
    """The first usable value under ``keys`` (in order), or None."""
    numbers = _numbers(meta, *keys)
    return numbers[0] if numbers else None


@dataclass(frozen=True)
class LaionFilter:
    """Accept or reject a sample from its img2dataset json, as the official training code's ``WebdatasetFilter``.

    Defaults are the official ones: 512 <= original side <= 4096, aesthetic >= 5.0, punsafe <= 0.99,
    pwatermark <= 0.5. Every bound is inclusive and can be disabled with ``None``. A score that an enabled check needs
    but the json lacks (missing, null or not a number) rejects the sample, as in the official code, except that an
    explicit 0.0 counts as 0.0 (the official ``x or default`` turned a 0.0 watermark score into 1.0 and rejected it).
    The size check reads the first complete pair of ``SIZE_KEYS`` (``original_width``/``original_height``, then
    ``width``/``height``, then LAION's ``WIDTH``/``HEIGHT``) and, when the json has none, the size the caller read from
    the image header (``image_size``): shards written without re-encoding store the original bytes, so the header is
    the original size. The aesthetic check passes when ``aesthetic`` or ``AESTHETIC_SCORE`` passes.

    ``reason(meta, image_size)`` returns None for an accepted sample, else the reject reason used in the data logs;
    ``missing_size`` only when neither the json nor the caller gives a size.
    """

    min_size: int | None = 512
    max_size: int | None = 4096
    min_aesthetic: float | None = 5.0
    max_punsafe: float | None = 0.99
    max_pwatermark: float | None = 0.5

    @staticmethod
    def json_size(meta: Mapping[str, Any]) -> tuple[float, float] | None:
        """(width, height) of the original image from the json, or None when it stores no usable pair."""
        for width_key, height_key in SIZE_KEYS:
            width, height = _number(meta, width_key), _number(meta, height_key)
            if width is not None and height is not None:
                return width, height
        return None

    @property
    def checks_size(self) -> bool:
        return self.min_size is not None or self.max_size is not None

    def size_reason(self, width: float, height: float) -> str | None:
        if self.min_size is not None and min(width, height) < self.min_size:
            return "too_small"
        if self.max_size is not None and max(width, height) > self.max_size:
            return "too_large"
        return None

    def reason(self, meta: Mapping[str, Any], image_size: tuple[float, float] | None = None) -> str | None:
        if self.checks_size:
            size = self.json_size(meta) or image_size
            if size is None:
                return "missing_size"
            if (size_reason := self.size_reason(*size)) is not None:
                return size_reason
        if self.min_aesthetic is not None:
            # the official filter accepts when either key passes
            scores = _numbers(meta, *AESTHETIC_KEYS)
            if not scores:
                return "missing_aesthetic"
            if max(scores) < self.min_aesthetic:
                return "low_aesthetic"
        if self.max_punsafe is not None:
            punsafe = _number(meta, "punsafe")
            if punsafe is None:
                return "missing_punsafe"
            if punsafe > self.max_punsafe:
                return "unsafe"
        if self.max_pwatermark is not None:
            pwatermark = _number(meta, "pwatermark")
            if pwatermark is None:
                return "missing_pwatermark"
            if pwatermark > self.max_pwatermark:
                return "watermark"
        return None

    def __call__(self, meta: Mapping[str, Any], image_size: tuple[float, float] | None = None) -> bool:
        return self.reason(meta, image_size) is None

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.min_size, self.max_size, self.min_aesthetic, self.max_punsafe,
                                           self.max_pwatermark))
