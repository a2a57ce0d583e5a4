"""The LAION metadata filter of the official training code, applied to a sample's json before any decoding."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Keys under which img2dataset / LAION-5B releases store the aesthetic score.
AESTHETIC_KEYS = ("aesthetic", "AESTHETIC_SCORE")


def _numbers(meta: Mapping[str, Any], *keys: str) -> list[float]:
    """The finite numeric values under ``keys``, skipping missing, null and non-numeric entries."""
    numbers = []
    for key in keys:
        value = meta.get(key)
        if isinstance(value, bool) or value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
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
    """Accept or reject a sample from its img2dataset json (SPEC.md section 8).

    Defaults are the official ones: 512 <= original side <= 4096, aesthetic >= 5.0, punsafe <= 0.99,
    pwatermark <= 0.5. Every bound is inclusive and can be disabled with ``None``. A score that an enabled check needs
    but the json lacks (missing, null or not a number) rejects the sample, as in the official code, except that an
    explicit 0.0 counts as 0.0 (the official ``x or default`` turned a 0.0 watermark score into 1.0 and rejected it).
    The size check reads ``original_width``/``original_height`` and falls back to ``width``/``height`` for shards
    written without resizing. The aesthetic check passes when ``aesthetic`` or ``AESTHETIC_SCORE`` passes.

    ``reason(meta)`` returns None for an accepted sample, else the reject reason used in the data logs.
    """

    min_size: int | None = 512
    max_size: int | None = 4096
    min_aesthetic: float | None = 5.0
    max_punsafe: float | None = 0.99
    max_pwatermark: float | None = 0.5

    def reason(self, meta: Mapping[str, Any]) -> str | None:
        if self.min_size is not None or self.max_size is not None:
            width = _number(meta, "original_width", "width")
            height = _number(meta, "original_height", "height")
            if width is None or height is None:
                return "missing_size"
            if self.min_size is not None and min(width, height) < self.min_size:
                return "too_small"
            if self.max_size is not None and max(width, height) > self.max_size:
                return "too_large"
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

    def __call__(self, meta: Mapping[str, Any]) -> bool:
        return self.reason(meta) is None

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.min_size, self.max_size, self.min_aesthetic, self.max_punsafe,
                                           self.max_pwatermark))
