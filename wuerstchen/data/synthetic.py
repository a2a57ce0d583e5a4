"""Built-in synthetic captioned dataset: one coloured shape on a plain or lightly textured background.

Why: the demo and the tests need a text-to-image dataset that a small diffusion model can learn on a
CPU in minutes and whose samples can be scored without any pretrained network. Every image shows one
filled shape (colour x shape x 3x3 position x size = 324 captions) on a low-saturation background, and
`score_image` checks colour, shape and position with plain numpy (background from row medians, alpha
matte by projection onto the foreground colour, template matching of the matte).

The shards follow img2dataset's layout (`00000.tar` holding `KEY.jpg`, `KEY.txt`, `KEY.json`, plus
`00000_stats.json`) so the same loader reads them and LAION-5B downloads.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import time
from typing import Any, Iterable, Sequence

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
_SCORE_RES = 128  # images are box-downsampled to at most this side before scoring (speed)
_BLURS = (0.0, 0.7, 1.4)  # template blurs (px at scoring resolution): sharp renders and soft generations


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


# ----------------------------------------------------------------------------------------------- scoring
def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB in [0, 1] -> CIELAB (D65): colour distances there roughly match perception."""
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_PALETTE_LAB = _srgb_to_lab(np.array(list(COLOURS.values()), dtype=np.float64) / 255.0)  # (6, 3)


def _to_array(image: Any) -> np.ndarray:
    """PIL / ndarray / torch tensor, (3,H,W) or (H,W,3), [0,1] floats or uint8 -> (H,W,3) float64."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    else:
        if hasattr(image, "detach"):  # torch tensor, without importing torch
            image = image.detach().cpu().float().numpy()
        arr = np.asarray(image)
        if arr.ndim != 3:
            raise ValueError(f"expected a (3,H,W) or (H,W,3) image, got shape {arr.shape}")
        if arr.shape[0] == 3 and arr.shape[-1] != 3:
            arr = arr.transpose(1, 2, 0)
        arr = arr / 255.0 if arr.dtype == np.uint8 else np.clip(arr.astype(np.float64), 0.0, 1.0)
    if max(arr.shape[:2]) > _SCORE_RES:  # box filter keeps coverage (alpha) semantics
        f = _SCORE_RES / max(arr.shape[:2])
        pil = Image.fromarray(np.round(arr * 255).astype(np.uint8))
        pil = pil.resize((max(1, round(arr.shape[1] * f)), max(1, round(arr.shape[0] * f))), Image.Resampling.BOX)
        arr = np.asarray(pil, dtype=np.float64) / 255.0
    return arr


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 (8-connected) binary dilation with numpy shifts."""
    p = np.pad(mask, 1)
    rows = p[:-2] | p[1:-1] | p[2:]
    return rows[:, :-2] | rows[:, 1:-1] | rows[:, 2:]


def _main_component(mask: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The connected component of `mask` around its densest 3x3 spot (geodesic reconstruction)."""
    p = np.pad(weight * mask, 1)
    dens = sum(p[i:i + mask.shape[0], j:j + mask.shape[1]] for i in range(3) for j in range(3)) * mask
    comp = np.zeros_like(mask)
    comp[np.unravel_index(np.argmax(dens), mask.shape)] = True
    while True:
        grown = _dilate(comp) & mask
        if grown.sum() == comp.sum():
            return comp
        comp = grown


def _gauss(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix of a mass-preserving 1-d Gaussian blur (identity for sigma 0)."""
    if sigma <= 0:
        return np.eye(n)
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    g = np.exp(-0.5 * (d / sigma) ** 2)
    return g / g.sum(0, keepdims=True)


def _crop(alpha: np.ndarray) -> np.ndarray:
    """The matte around its support, with room for any same-area template (speed only)."""
    ys, xs = np.nonzero(alpha)
    pad = int(0.5 * max(np.ptp(ys), np.ptp(xs))) + 4
    return alpha[max(ys.min() - pad, 0):ys.max() + pad + 1, max(xs.min() - pad, 0):xs.max() + pad + 1]


def _templates(alpha: np.ndarray) -> dict[str, float]:
    """Normalised L1 error between the matte and each shape of the same area and centroid.

    Shapes are antialiased analytically (4x4 supersampling) so tiny (5 px) shapes still separate;
    each template is also tried blurred, the best fit counts, so soft generated shapes are fair game.
    """
    h, w = alpha.shape
    area = alpha.sum()
    ys, xs = (np.arange(n * 4, dtype=np.float64) / 4 + 0.125 for n in (h, w))  # subpixel centres
    cy, cx = (alpha.sum(1) @ (np.arange(h) + 0.5)) / area, (alpha.sum(0) @ (np.arange(w) + 0.5)) / area
    y, x = ys[:, None] - cy, xs[None, :] - cx  # (4H, 1), (1, 4W) offsets from the centroid
    side = {"circle": np.sqrt(4 * area / np.pi), "square": np.sqrt(area), "triangle": np.sqrt(2 * area)}
    inside = {
        "circle": x ** 2 + y ** 2 <= (side["circle"] / 2) ** 2,
        "square": (np.abs(x) <= side["square"] / 2) & (np.abs(y) <= side["square"] / 2),
        # apex 2/3 side above the centroid, half-width grows by 1/2 per unit of depth
        "triangle": (y <= side["triangle"] / 3) & (np.abs(x) <= (y + 2 * side["triangle"] / 3) / 2),
    }
    errors = {}
    for name, sub in inside.items():
        cover = sub.reshape(h, 4, w, 4).mean((1, 3))  # (H, W) coverage of each pixel
        blurred = (_gauss(h, s) @ cover @ _gauss(w, s).T for s in _BLURS)  # blurry generations too
        # template mass cut off by the image border counts as error too
        errors[name] = min(float((np.abs(b - alpha).sum() + max(area - b.sum(), 0.0)) / area) for b in blurred)
    return errors


def predict_labels(image: Any) -> dict[str, Any] | None:
    """Colour, shape and position of the single foreground object, or None if there is none.

    Background = per-row median (rows are mostly background since a shape spans < 1/3 of a row;
    handles vertical gradients); the object is the main connected blob of pixels far from it;
    its alpha matte is the projection onto (foreground - background).
    """
    arr = _to_array(image)
    h, w, _ = arr.shape
    bg = np.median(arr, axis=1, keepdims=True)  # (H, 1, 3)
    dist = np.linalg.norm(arr - bg, axis=-1)  # (H, W)
    mask = dist > 0.15
    if not 0 < mask.mean() < 0.3:  # nothing there, or noise / clutter all over
        return None
    comp = _main_component(mask, dist)
    core = comp & (dist >= np.quantile(dist[comp], 0.5))
    fg = np.median(arr[core], axis=0)  # (3,)
    diff = fg - bg  # (H, 1, 3)
    alpha = np.clip(((arr - bg) * diff).sum(-1) / np.maximum((diff ** 2).sum(-1), 1e-6), 0.0, 1.0)
    near = _dilate(_dilate(comp))
    alpha *= near  # keep the antialiased rim, drop other blobs
    frac = alpha.sum() / (h * w)
    contrast = np.linalg.norm(fg - np.median(bg, axis=0))
    clutter = np.median(dist[~near]) if (~near).any() else np.inf  # background noise level
    if not (0.004 <= frac <= 0.2 and comp.mean() >= 0.003 and clutter < 0.25 * contrast):
        return None  # too small / too big, or a speck in noise rather than an object
    lab = _srgb_to_lab(fg)
    colour_dist = np.linalg.norm(_PALETTE_LAB - lab, axis=-1)
    errors = _templates(_crop(alpha))
    cy = (alpha.sum(1) @ (np.arange(h) + 0.5)) / alpha.sum()
    cx = (alpha.sum(0) @ (np.arange(w) + 0.5)) / alpha.sum()
    row, col = min(int(3 * cy / h), 2), min(int(3 * cx / w), 2)
    return {
        "colour": list(COLOURS)[int(np.argmin(colour_dist))] if np.hypot(lab[1], lab[2]) >= 20 else None,
        "shape": min(errors, key=errors.get) if min(errors.values()) < 0.6 else None,
        "position": POSITIONS[3 * row + col],
        "fraction": float(frac),
        "shape_errors": errors,
    }


def score_image(image: Any, labels: dict[str, str]) -> dict[str, bool]:
    """Whether `image` shows the labels' colour, shape and position (all False if no object found)."""
    pred = predict_labels(image)
    if pred is None:
        return {"colour": False, "shape": False, "position": False}
    return {key: pred[key] == labels[key] for key in ("colour", "shape", "position")}


def score_batch(images: Iterable[Any], labels_list: Sequence[dict[str, str]]) -> dict[str, float]:
    """Mean accuracies over a batch; 'all' counts images right on colour, shape and position at once."""
    scores = [score_image(img, lab) for img, lab in zip(images, labels_list, strict=True)]
    if not scores:
        raise ValueError("empty batch")
    out = {key: float(np.mean([s[key] for s in scores])) for key in ("colour", "shape", "position")}
    out["all"] = float(np.mean([all(s.values()) for s in scores]))
    return out
