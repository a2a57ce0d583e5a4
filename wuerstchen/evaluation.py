"""Evaluation on the synthetic shapes (:mod:`wuerstchen.data.synthetic`) without any pretrained network.

The scorer (:func:`score_image`) checks colour, shape and position of the single object in an image with plain
numpy: background from row medians, alpha matte by projection onto the foreground colour, template matching of the
matte. Over it, what the demo (``scripts/demo.py``) measures: Stage A's reconstruction PSNR on held-out images, the
caption accuracy of images generated through C -> B -> A, captioned grids, and linear probes of the prior's latents.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchmetrics.functional.image import peak_signal_noise_ratio
from tqdm import tqdm

from .data import ImageTransform, WebImageTextDataset, to_model_inputs
from .data.synthetic import COLOURS, POSITIONS
from .pipeline import Pipeline, sample_prior, text_encoder_of
from .weights import load_network

_SCORE_RES = 128  # images are box-downsampled to at most this side before scoring (speed)
_BLURS = (0.0, 0.7, 1.4)  # template blurs (px at scoring resolution): sharp renders and soft generations
# How the demo samples: Stage C with 40 steps at guidance 2, Stage B with 12. Stage B guidance is over its semantic
# latent (zeroed for the unconditional branch); the released recipe has it off, the tiny demo decoder reconstructs
# colour from real latents at 0.77 without and 0.87 with 1.5
PRIOR_STEPS, PRIOR_CFG, DECODER_STEPS, DECODER_CFG = 40, 2.0, 12, 1.5


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


def caption_accuracy(images: Iterable[Any], samples: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """``caption_{color,shape,position,all}_accuracy`` of images generated for ``samples`` (:func:`held_out`),
    rounded to 3 digits as the demo's summary records them."""
    scores = score_batch(list(images), [s["labels"] for s in samples])
    out = {f"caption_{key}_accuracy": round(value, 3) for key, value in scores.items()}
    out["caption_color_accuracy"] = out.pop("caption_colour_accuracy")
    return out


# ----------------------------------------------------------------------------------------------- the demo's measures
def held_out(shards: str | os.PathLike, size: int, count: int) -> list[dict[str, Any]]:
    """The first ``count`` samples of ``shards`` (the demo's validation set, seed 1, never trained on), centre crops
    at ``size``: ``{"image": (3, size, size) in [0, 1], "caption": str, "labels": dict}``."""
    dataset = WebImageTextDataset(str(shards), batch_size=count, resample=False, shuffle_buffer=0,
                                  transform=ImageTransform(size, outputs=("images",), random_crop=False))
    batch = to_model_inputs(next(iter(dataset)))
    return [{"image": image, "caption": caption, "labels": meta["labels"]}
            for image, caption, meta in zip(batch["images"], batch["captions"], batch["meta"])]


@torch.no_grad()
def stage_a_psnr(weights: str | os.PathLike, samples: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Stage A's reconstructions of the samples' images: PSNR of the unquantised path (the one generation decodes)
    and of the quantised one, and the scorer's colour accuracy on them (what the chain can reach)."""
    stage_a, _ = load_network("a", weights)
    stage_a.eval()
    images = torch.stack([s["image"] for s in samples])
    latents = stage_a.encode(images)
    recon = stage_a.decode(latents).clamp(0, 1)
    recon_vq = stage_a.decode(stage_a.quantize(latents).latents).clamp(0, 1)
    colour = score_batch(list(recon), [s["labels"] for s in samples])["colour"]
    return {"stage_a_psnr": round(float(peak_signal_noise_ratio(recon, images, data_range=1.0)), 2),
            "stage_a_color_accuracy": round(colour, 3),
            "stage_a_psnr_quantized": round(float(peak_signal_noise_ratio(recon_vq, images, data_range=1.0)), 2)}


@torch.no_grad()
def generate(pipeline: Pipeline, captions: Sequence[str], size: int, batch_size: int = 16, seed: int = 0,
             progress: bool = True) -> torch.Tensor:
    """Images (N, 3, size, size) for ``captions`` through C -> B -> A with the demo's sampling settings, batch after
    batch from one generator seeded ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for start in tqdm(range(0, len(captions), batch_size), desc="sampling", disable=not progress):
        images.append(pipeline(list(captions[start:start + batch_size]), size, size, prior_steps=PRIOR_STEPS,
                               prior_cfg=PRIOR_CFG, decoder_steps=DECODER_STEPS, decoder_cfg=DECODER_CFG,
                               generator=generator))
    return torch.cat(images)


def captioned_grid(images: torch.Tensor, captions: Sequence[str], path: str | os.PathLike, columns: int = 8) -> None:
    """A PNG grid with each image's caption under it (small images upscaled so captions fit)."""
    if images.shape[-1] < 128:
        images = torch.nn.functional.interpolate(images, size=(128, 128), mode="nearest")
    side = images.shape[-1]
    cell_h = side + 28
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * side, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * side, (i // columns) * cell_h
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        canvas.paste(Image.fromarray(array), (x, y))
        words = caption.split()
        draw.text((x + 2, y + side + 1), " ".join(words[:4]), fill="black")
        draw.text((x + 2, y + side + 14), " ".join(words[4:]), fill="black")
    canvas.save(path)


@torch.no_grad()
def prior_probe(compressor: str | os.PathLike, priors: Mapping[str, str | os.PathLike], data: str | os.PathLike,
                size: int, effnet_scale: float, prompts: Sequence[Mapping[str, Any]],
                train_samples: int = 1000) -> dict[str, dict[str, float]]:
    """The prior alone, without Stage B: linear least-squares probes fitted on the compressor latents of ``size`` px
    images of ``data/train`` read colour and grid position; applied to the latents each Stage C of ``priors`` (name
    -> weights, EMA preferred, with its recorded text encoder) samples for the captions of ``prompts``, and to the
    real latents of the first ``len(prompts)`` images of ``data/val`` (the probes' own ceiling, key "real latents").
    ``compressor``: the weights holding the compressor the priors trained on (a Stage B checkpoint)."""
    effnet, _ = load_network("effnet", compressor)
    effnet.eval()

    def real(split: str, count: int) -> tuple[torch.Tensor, list[dict]]:
        dataset = WebImageTextDataset(str(Path(data) / split), batch_size=count, resample=False, shuffle_buffer=0,
                                      transform=ImageTransform(size, outputs=("effnet_images",), random_crop=False,
                                                               effnet_scale=effnet_scale))
        batch = to_model_inputs(next(iter(dataset)))
        return effnet.to_prior(effnet(batch["effnet_images"])).flatten(1), [m["labels"] for m in batch["meta"]]

    features, labels = real("train", train_samples)
    mean, std = features.mean(0), features.std(0) + 1e-6

    def design(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([(x - mean) / std, torch.ones(len(x), 1)], 1)

    held, held_labels = real("val", len(prompts))
    latents = {"real latents": held}
    for name, path in priors.items():
        prior, _ = load_network("c", path, prefer_ema=True)
        encoder = text_encoder_of(path).eval()
        generator = torch.Generator().manual_seed(0)
        latents[name] = sample_prior(prior.eval(), encoder, [p["caption"] for p in prompts], size, size, PRIOR_STEPS,
                                     PRIOR_CFG, generator, effnet_scale).flatten(1)
    result: dict[str, dict[str, float]] = {}
    for key, names in (("colour", list(COLOURS)), ("position", list(POSITIONS))):
        target = torch.nn.functional.one_hot(torch.tensor([names.index(lab[key]) for lab in labels]), len(names))
        weights = torch.linalg.lstsq(design(features), target.float()).solution
        truth = torch.tensor([names.index(lab[key]) for lab in held_labels])
        for name, x in latents.items():
            accuracy = (design(x) @ weights).argmax(1).eq(truth).float().mean().item()
            result.setdefault(name, {})[f"probe_{key}_accuracy"] = round(accuracy, 3)
    return result
