"""Stage A's latent scale: measured on a trained encoder, recorded as its ``scale_factor`` (arXiv 2306.00637).

Stage B diffuses ``x0 = encode(images) = raw encoder output / scale_factor`` with the cosine schedule,
``x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps``, so its SNR is ``alpha_bar E[x0^2] / (1 - alpha_bar)``: the
schedule has the SNR it was designed for only when ``E[x0^2] = 1``. The scale that gives this is the RMS of the raw
output, ``sqrt(E[z^2])``, not its standard deviation: nothing centres x0, and a mean adds signal power just as
spread does (dividing by the std leaves ``E[x0^2] = 1 + mean^2 / std^2``). The encoder ends in a BatchNorm, so the
mean is near 0 and the two differ little. The released ``vqgan_f4_v1_500k.pt`` comes with 0.3764 (dome272/Wuerstchen;
the default of diffusers' ``PaellaVQModel``, whose Würstchen pipeline decodes ``scale_factor * latents``); the
official code keeps only the number, so whether it was a std or an RMS cannot be told from it (StableCascade's
``StageA`` has 0.43, with 0.3764 in a comment beside it). A Stage A trained from scratch has its own scale: its final
checkpoint records the one measured here (``StageAModule``), and ``scripts/measure_latent_scale.py`` sets it in any
checkpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..data import WebImageTextDataset, to_model_inputs
from ..data.datamodule import StreamLoader, WebDataModule
from ..models.stage_a import StageA
from ..weights import checkpoint as schema
from ..weights import load_network, open_checkpoint, save_wuerstchen
from ..weights.formats import is_sharded_checkpoint
from .checkpointing import PARTIAL_SUFFIX, _fsync
from .distributed import distributed_world, summed_over_ranks

log = logging.getLogger(__name__)


class MeasurementFailed(RuntimeError):
    """Raised on every rank alike when any rank could not measure (a collective outcome, so no rank hangs)."""


class LatentMoments(NamedTuple):
    """Moments of the raw (unscaled, unquantised) encoder output over every value of every measured latent."""

    num_images: int
    count: int  # latent values: num_images x C x h x w
    mean: float
    std: float  # population std (no Bessel correction)
    rms: float  # sqrt(E[z^2]), the scale_factor that gives E[x0^2] = 1 (module docstring)

    @property
    def scale_factor(self) -> float:
        return self.rms


@torch.no_grad()
def latent_moments(stage_a: StageA, batches: Iterable[torch.Tensor], num_images: int) -> LatentMoments:
    """Moments of ``stage_a.encode_unscaled`` over this rank's first ``num_images`` images of ``batches`` (B, 3, H, W)
    in [0, 1], combined over all ranks (a collective: every rank must call it).

    The encoder runs as a checkpoint holds it: in eval mode (BatchNorm's running statistics, which is how Stage B and
    the caches use it), in fp32 outside any autocast. Sums of z and z^2 and the count accumulate in float64, so the
    variance E[z^2] - E[z]^2 loses nothing to cancellation at the sizes measured here.
    """
    was_training = stage_a.training
    stage_a.eval()
    device = next(stage_a.parameters()).device
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # images, values, sum z, sum z^2, failed ranks
    remaining, error = num_images, None
    try:
        with torch.autocast(device.type, enabled=False):
            for images in batches:
                images = images[:remaining].to(device, torch.float32)
                z = stage_a.encode_unscaled(images).double()  # (B, C, h, w)
                sums[:4] += torch.stack([z.new_tensor(len(z)), z.new_tensor(z.numel()), z.sum(), z.square().sum()])
                remaining -= len(images)
                if remaining <= 0:
                    break
    except Exception as exn:  # noqa: BLE001 - every rank must reach the collective below, whatever stopped this one
        error, sums[4] = exn, 1.0
    finally:
        stage_a.train(was_training)
    num, count, total, squares, failed = summed_over_ranks(sums).tolist()
    if failed:
        raise MeasurementFailed(f"measuring Stage A's latent scale failed on {int(failed)} rank(s)"
                                + (f": {type(error).__name__}: {error}" if error is not None else "")) from error
    if count == 0:
        raise MeasurementFailed("no image to measure Stage A's latent scale on (the shards gave none)")
    mean, second = total / count, squares / count
    return LatentMoments(int(num), int(count), mean, max(second - mean**2, 0.0) ** 0.5, second**0.5)


def _first_pass() -> tuple[int, int, int]:
    return 0, 0, 0  # (restart index, epoch, batches to skip): the same images every time


def measurement_batches(datamodule: WebDataModule, num_images: int, batch_size: int) -> tuple[Iterator[torch.Tensor],
                                                                                              int]:
    """(image batches, images per rank) for measuring ``num_images`` images, at least, over all ranks.

    A stream of its own over the training shards: read once in order (each rank and loader worker its own shards,
    repeated if too few), no shuffle, the deterministic centre crops of the validation transform. It draws from no
    global generator and leaves the training stream's position alone, so measuring at a run's end changes nothing a
    resumed run continues. The images are those of the first batches of each rank's shards.
    """
    if datamodule.val_transform is None:
        raise ValueError("the latent scale is measured on images, but data=cached holds no images")
    world = distributed_world()
    rank = dist.get_rank() if world > 1 else 0
    per_rank = -(-num_images // world)
    num_batches = -(-per_rank // batch_size)
    dataset = WebImageTextDataset(datamodule.urls, batch_size, datamodule.val_transform, filter=datamodule.filter,
                                  resample=False, num_batches=num_batches, shuffle_buffer=0,
                                  require_caption=datamodule.require_caption, max_tries=datamodule.max_tries,
                                  max_tries_per_shard=datamodule.max_tries_per_shard,
                                  read_timeout=datamodule.read_timeout, seed=datamodule.seed, rank=rank,
                                  world_size=world)
    dataset.skip_keys = frozenset(datamodule.crashes.skip_keys)  # samples that killed a loader worker before
    loader = StreamLoader(dataset, _first_pass, rank=rank, num_workers=min(datamodule.num_workers, num_batches))
    return (to_model_inputs(batch)["images"] for batch in loader), per_rank


def measure_latent_scale(stage_a: StageA, datamodule: WebDataModule, num_images: int,
                         batch_size: int) -> LatentMoments:
    """:func:`latent_moments` over ``num_images`` images (at least; a multiple of the world size) of the datamodule's
    training shards (:func:`measurement_batches`)."""
    batches, per_rank = measurement_batches(datamodule, num_images, batch_size)
    return latent_moments(stage_a, batches, per_rank)


# ---------------------------------------------------------------------------------------- rewriting a checkpoint
def _publish(partial: Path, dst: Path) -> None:
    """fsync ``partial``, rename it to ``dst``, fsync the folder: ``dst`` is never half-written."""
    _fsync(partial)
    os.replace(partial, dst)
    _fsync(dst.parent)


def check_rewritable(src: str | os.PathLike, out: str | os.PathLike | None) -> bool:
    """Refuse, before any measuring, what :func:`write_scale_factor` cannot write; True for our training checkpoint,
    False for another source (written as our safetensors export)."""
    src = Path(src)
    if is_sharded_checkpoint(src):
        raise ValueError(f"{src} is a sharded checkpoint folder, which this command does not rewrite: make it one file "
                         f"(scripts/consolidate_checkpoint.py) and measure that")
    source = open_checkpoint(src)
    if source.ours:
        configs = source.network_configs
        if "stage_b" in configs:
            raise ValueError(f"{src} is a Stage B checkpoint: its Stage B was trained on latents at the Stage A scale "
                             f"it records, which must stay; measure the Stage A checkpoint before training Stage B")
        if "stage_a" not in configs:
            raise ValueError(f"{src} holds no Stage A (its networks: {sorted(configs)})")
        return True
    if Path(out or src).suffix != ".safetensors":
        raise ValueError(f"{src} is not one of our training checkpoints (a released .pt, a diffusers folder?): give "
                         f"out=FILE.safetensors to write our export with the new scale_factor")
    return False


def write_scale_factor(src: str | os.PathLike, scale_factor: float, out: str | os.PathLike | None = None) -> Path:
    """Write the Stage A weights at ``src`` with ``scale_factor`` recorded, to ``out`` or in place (a ``last.ckpt``
    link: its target); returns the path written.

    Our training checkpoint keeps everything and changes only Stage A's recorded ``scale_factor`` (in
    ``network_configs``, what ``load_network`` builds the network and its EMA from). Other sources (a released
    ``.pt``, a diffusers folder, our safetensors export) become our safetensors export (config in the metadata) of
    the weights ``load_network`` loads (EMA first).
    """
    ours = check_rewritable(src, out)
    dst = Path(out) if out else Path(src).resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(f".{dst.name}{PARTIAL_SUFFIX}")
    if ours:
        checkpoint = torch.load(src, map_location="cpu", weights_only=True)
        schema.set_recorded_config(checkpoint, "stage_a", scale_factor=float(scale_factor))
        torch.save(checkpoint, partial)
    else:
        stage_a, _ = load_network("a", src)
        stage_a.set_scale_factor(scale_factor)
        save_wuerstchen(stage_a.state_dict(), "a", stage_a.config, partial)
    _publish(partial, dst)
    return dst
