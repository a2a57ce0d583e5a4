"""Built-in synthetic captioned dataset: one coloured shape on a plain or lightly textured background.

Why: the demo and the tests need a text-to-image dataset that a small diffusion model can learn on a
CPU in minutes and whose samples can be scored without any pretrained network. Every image shows one
filled shape (colour x shape x 3x3 position x size = 324 captions) on a low-saturation background, and
`wuerstchen.evaluation.score_image` checks colour, shape and position with plain numpy.

The shards follow img2dataset's layout (`00000.tar` holding `KEY.jpg`, `KEY.txt`, `KEY.json`, plus
`00000_stats.json`) so the same loader reads them and LAION-5B downloads.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import time
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# Saturated colours, >= 47 CIELAB units apart pairwise and chroma >= 68 (backgrounds have chroma <~ 12).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "orange": (250, 140, 10),
    "yellow": (245, 220, 30),
    "green": (35, 165, 55),
    "blue": (20, 110, 225),
    "purple": (160, 40, 170),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Row-major over the 3x3 grid: POSITIONS[3 * row + col].
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)
SIZES: dict[str, float] = {"small": 0.5, "large": 0.8}  # side of the shape's bounding box / cell side
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "noise", "stripes")

_PREPOSITION = {"top": "at the", "bottom": "at the", "left": "on the", "right": "on the"}
_TAR_MTIME = 1_700_000_000.0  # constant member mtime -> byte-identical tars for identical arguments


def caption_for(labels: dict[str, str]) -> str:
    """'a large red circle in the top left', 'a small blue square at the top', ... (size always said)."""
    pos = labels["position"]
    return f"a {labels['size']} {labels['colour']} {labels['shape']} {_PREPOSITION.get(pos, 'in the')} {pos}"


def parse_caption(caption: str) -> dict[str, str]:
    """Inverse of `caption_for`, so evaluation prompts can be scored from their text alone."""
    words = caption.strip().lower().split()
    if len(words) < 6 or words[0] != "a":
        raise ValueError(f"not a synthetic caption: {caption!r}")
    labels = {"size": words[1], "colour": words[2], "shape": words[3], "position": " ".join(words[6:])}
    if caption_for(labels) != " ".join(words):
        raise ValueError(f"not a synthetic caption: {caption!r}")
    return labels


# ----------------------------------------------------------------------------------------------- rendering
def _sample_labels(rng: np.random.Generator) -> dict[str, str]:
    return {
        "colour": str(rng.choice(list(COLOURS))),
        "shape": str(rng.choice(SHAPES)),
        "position": str(rng.choice(POSITIONS)),
        "size": str(rng.choice(list(SIZES))),
    }


def _neutral(rng: np.random.Generator) -> np.ndarray:
    """A grey with a faint tint (beige, slate, ...): RGB in [0, 1], never close to a palette colour."""
    grey = rng.uniform(0.15, 0.88)
    return np.clip(grey + rng.uniform(-0.05, 0.05, 3), 0.0, 1.0)


def _background(rng: np.random.Generator, noise_rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float background: plain, vertical gradient, faint noise or faint stripes."""
    kind = str(rng.choice(BACKGROUNDS))
    top, bottom = _neutral(rng), _neutral(rng)
    amp, period, vertical = rng.uniform(0.01, 0.025), rng.uniform(4.0, 16.0), bool(rng.integers(2))
    t = (np.arange(size, dtype=np.float64) + 0.5) / size
    bg = np.broadcast_to(top, (size, size, 3)).copy()
    if kind == "gradient":
        bg = top + (bottom - top) * t[:, None, None]  # (H,1,1) * (3,) -> (H,1,3), broadcast below
        bg = np.broadcast_to(bg, (size, size, 3)).copy()
    elif kind == "noise":  # per-pixel noise depends on `size`; the labels never do
        bg += noise_rng.normal(0.0, amp, (size, size, 1))
    elif kind == "stripes":
        wave = amp * np.sin(2 * np.pi * t * size / period)  # period in output pixels, >= 4
        bg += wave[None, :, None] if vertical else wave[:, None, None]
    return np.clip(bg, 0.0, 1.0)


def _shape_mask(shape: str, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """Coverage (size, size) in [0, 1] of `shape` filling `box` = (left, top, side, side) in pixels.

    Drawn at k = 2..8 x resolution and box-filtered down, i.e. exact area antialiasing up to 1/k pixel.
    """
    k = max(2, min(8, 1024 // size))  # 8x up to 128 px (a 5 px shape at 32 px still gets its shape right)
    x0, y0, w, h = (v * k for v in box)
    big = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(big)
    corners = (round(x0), round(y0), round(x0 + w) - 1, round(y0 + h) - 1)  # PIL boxes are inclusive
    if shape == "circle":
        draw.ellipse(corners, fill=255)
    elif shape == "square":
        draw.rectangle(corners, fill=255)
    else:  # isosceles triangle, apex up, base = height = box side -> fills half its box
        draw.polygon([(x0 + w / 2, y0), (x0 + w, y0 + h), (x0, y0 + h)], fill=255)
    small = big.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def make_sample(seed: int, index: int, size: int) -> tuple[Image.Image, str, dict[str, str]]:
    """Render sample `index` of dataset `seed` at `size` px: (RGB image, caption, labels).

    Content depends on (seed, index) only: labels and geometry come from rng([seed, index]) as
    fractions of the image, so shard size and resolution never change what a sample shows.
    """
    if not 32 <= size <= 1024:
        raise ValueError(f"size must be in [32, 1024], got {size}")
    rng = np.random.default_rng([seed, index])
    labels = _sample_labels(rng)
    scale = SIZES[labels["size"]] * rng.uniform(0.94, 1.06)
    jitter = 0.4 * (1.0 - scale) / 2  # keeps >= 0.06 cell of margin: the shape never leaves its cell
    dx, dy = rng.uniform(-jitter, jitter, 2)
    fg = np.clip(np.array(COLOURS[labels["colour"]]) / 255.0 + rng.uniform(-0.03, 0.03, 3), 0.0, 1.0)
    bg = _background(rng, np.random.default_rng([seed, index, 1]), size)
    row, col = divmod(POSITIONS.index(labels["position"]), 3)
    cell = size / 3.0
    side = scale * cell
    left, top = (col + 0.5 + dx) * cell - side / 2, (row + 0.5 + dy) * cell - side / 2
    alpha = _shape_mask(labels["shape"], (left, top, side, side), size)[..., None]  # (H, W, 1)
    image = bg * (1.0 - alpha) + fg * alpha  # straight alpha compositing in sRGB values
    pil = Image.fromarray(np.round(image * 255.0).astype(np.uint8), "RGB")
    return pil, caption_for(labels), labels


# ----------------------------------------------------------------------------------------------- shards
def _encode(image: Image.Image, image_format: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if image_format == "jpg":
        image.save(buf, "JPEG", quality=quality, subsampling=0)  # 4:4:4: tiny shapes keep their colour
    elif image_format == "png":
        image.save(buf, "PNG")
    elif image_format == "webp":
        image.save(buf, "WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"image_format must be jpg, png or webp, got {image_format!r}")
    return buf.getvalue()


def _metadata(seed: int, index: int, key: str, caption: str, labels: dict, size: int) -> dict[str, Any]:
    """img2dataset + LAION-style json; the LAION fields are drawn so the official filters all pass."""
    rng = np.random.default_rng([seed, index, 2])
    return {
        "url": f"synthetic://{seed}/{index}",
        "caption": caption,
        "key": key,
        "status": "success",
        "error_message": None,
        "width": size,
        "height": size,
        "original_width": int(rng.integers(512, 2049)),
        "original_height": int(rng.integers(512, 2049)),
        "aesthetic": round(float(rng.uniform(5.0, 7.5)), 4),
        "punsafe": round(float(rng.uniform(0.0, 0.1)), 4),
        "pwatermark": round(float(rng.uniform(0.0, 0.3)), 4),
        "similarity": round(float(rng.uniform(0.28, 0.4)), 4),
        "labels": dict(labels),
    }


def _write_shard(path: pathlib.Path, shard: int, indices: range, size: int, seed: int,
                 image_format: str, quality: int, digits: int) -> int:
    """Write one tar via a temporary name + atomic rename, so readers never see half a shard."""
    import webdataset as wds

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=_TAR_MTIME) as writer:
        for i, index in enumerate(indices):
            key = f"{shard:05d}{i:0{digits}d}"
            image, caption, labels = make_sample(seed, index, size)
            meta = _metadata(seed, index, key, caption, labels, size)
            writer.write({
                "__key__": key,
                image_format: _encode(image, image_format, quality),
                "txt": caption.encode("utf-8"),
                "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
            })
    os.replace(tmp, path)
    return len(indices)


def write_synthetic_shards(out_dir: str | os.PathLike, num_samples: int, size: int, seed: int = 0,
                           shard_size: int = 1000, image_format: str = "jpg",
                           jpeg_quality: int = 95) -> list[pathlib.Path]:
    """Write `num_samples` samples as img2dataset-style shards out_dir/00000.tar, ...; return tar paths.

    Sample `index` lands in shard index // shard_size under key f"{shard:05d}{i:04d}". Identical
    arguments give byte-identical tars (constant tar mtime, deterministic encoders); the
    NNNNN_stats.json files carry wall-clock times and are not deterministic.
    """
    if num_samples < 1 or shard_size < 1:
        raise ValueError("num_samples and shard_size must be >= 1")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digits = max(4, len(str(shard_size - 1)))
    paths = []
    for shard, start in enumerate(range(0, num_samples, shard_size)):
        t0 = time.time()
        path = out / f"{shard:05d}.tar"
        n = _write_shard(path, shard, range(start, min(start + shard_size, num_samples)), size, seed,
                         image_format, jpeg_quality, digits)
        t1 = time.time()
        stats = {"count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0,
                 "duration": t1 - t0, "start_time": t0, "end_time": t1, "status_dict": {"success": n}}
        (out / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=2))
        paths.append(path)
    return paths
