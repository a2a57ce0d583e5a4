"""The frozen side of the two diffusion stages: what each is trained to denoise and what it is conditioned on.

One object per stage turns a batch into ``(x0, conditions)``, whether the batch holds images (the frozen networks run
here) or a cache's arrays (they ran once, in the cache writer of ``wuerstchen/data/cached.py``):

- :class:`StageCConditioning`: x0 is the compressor's latent of the 0.75x view mapped to the prior's space
  (``SemanticCompressor.to_prior``); the condition is the text encoder's token states.
- :class:`StageBConditioning`: x0 is Stage A's unquantised latent of the crop; the conditions are the compressor's
  raw latent (the compressor trains jointly with Stage B unless frozen, so it runs with gradients) and the token
  states.

The same object writes a cache (:meth:`arrays` for what is stored, :meth:`info` for ``cache_info.json``) and checks
one before training reads it (:meth:`check`), so online and cached training see one definition of every input.
Lightning-free: the stage modules (``wuerstchen/training/diffusion_stages.py``), the cache writer and
``scripts/benchmark.py`` use it alike. Training-time dropout (captions for guidance, the semantic latent's zeroing
and noising in Stage B) happens in :meth:`encode` when it is given the batch's caption generator.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .data.cached import CLIP, EFFNET_VIEW, LATENT, STAGE_A, check_cache_matches, fingerprint
from .diffusion import add_noise
from .models.text_encoder import TextEncoder

Conditions = dict[str, torch.Tensor]


@contextmanager
def frozen_precision(device: torch.device) -> Iterator[None]:
    """Frozen encoders run outside autocast, in float32 even under ``bf16-mixed``, as the official training computes
    its targets and conditionings (no_grad, fp32) and only runs the trained network under autocast: bf16 targets
    would put quantisation noise into x0, and sampling (fp32) would see other text states than training did."""
    kind = "cpu" if device.type == "meta" else device.type  # meta: counting FLOPs (scripts/benchmark.py)
    with torch.no_grad(), torch.autocast(kind, enabled=False):
        yield


def drop_captions(captions: Sequence[str], prob: float, rng: random.Random | None = None) -> list[str]:
    """Replace each caption by the empty one with probability ``prob`` (classifier-free guidance training)."""
    draw = rng.random if rng is not None else random.random
    return ["" if prob > 0 and draw() < prob else c for c in captions]


def _device(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


class _TextConditioning:
    """Token states of the captions, the dropped ones replaced by the states of "" (online: encoded as "")."""

    def __init__(self, text_encoder: TextEncoder, caption_drop_prob: float) -> None:
        self.text_encoder = text_encoder
        self.caption_drop_prob = float(caption_drop_prob)

    def text_states(self, batch: dict[str, Any], rng: random.Random | None) -> torch.Tensor:
        captions = list(batch["captions"])
        kept = drop_captions(captions, self.caption_drop_prob, rng) if rng is not None else captions
        if "clip" not in batch:
            with frozen_precision(_device(self.text_encoder)):
                return self.text_encoder(kept).float()  # (B, 77, width)
        clip = batch["clip"].float()
        dropped = [new != old for new, old in zip(kept, captions)]
        if any(dropped):
            mask = torch.tensor(dropped, device=clip.device).view(-1, 1, 1)
            clip = torch.where(mask, batch["empty_clip"].to(clip), clip)
        return clip

    def empty_caption(self) -> torch.Tensor:
        """The states of "" (1, 77, width): a cache stores them for caption dropout."""
        with frozen_precision(_device(self.text_encoder)):
            return self.text_encoder([""]).float()

    def _text_info(self) -> dict[str, Any]:
        return {"text_encoder": self.text_encoder.config}


class StageCConditioning(_TextConditioning):
    """Stage C's inputs: the frozen compressor's latent (in the prior's space) and the token states.

    Args:
        text_encoder: the frozen CLIP text tower (``c_cond`` wide).
        effnet: the frozen compressor (from the Stage B checkpoint it was fine-tuned in).
        caption_drop_prob: per sample, train on the empty caption instead (guidance).
    """

    stage = "c"
    image_outputs = ("effnet_images",)  # what an online batch needs from the image transform

    def __init__(self, text_encoder: TextEncoder, effnet: nn.Module, caption_drop_prob: float = 0.05) -> None:
        super().__init__(text_encoder, caption_drop_prob)
        self.effnet = effnet

    def arrays(self, batch: dict[str, Any]) -> Conditions:
        """What a cache stores for the batch, under its batch names: ``latents`` (the compressor's raw latent, before
        ``to_prior``) and ``clip`` (token states of the captions, none dropped); read from a cached batch as is."""
        out = {"clip": self.text_states(batch, rng=None)}
        if "latents" in batch:
            out["latents"] = batch["latents"].float()
        else:
            with frozen_precision(batch["effnet_images"].device):
                out["latents"] = self.effnet(batch["effnet_images"].float())  # (B, 16, h, w)
        return out

    def encode(self, batch: dict[str, Any], rng: random.Random | None = None) -> tuple[torch.Tensor, Conditions]:
        """(x0, conditions) of a batch of images or of cached arrays; ``rng`` draws the dropped captions (training),
        None drops none."""
        if "latents" in batch:
            latent = batch["latents"].float()
        else:
            with frozen_precision(batch["effnet_images"].device):
                latent = self.effnet(batch["effnet_images"].float())
        return self.effnet.to_prior(latent), {"clip": self.text_states(batch, rng)}

    def info(self) -> dict[str, Any]:
        """What ``cache_info.json`` records of these networks and the arrays they give."""
        return {"stage": self.stage, **self._text_info(), "effnet_sha1": fingerprint(self.effnet),
                "effnet_config": self.effnet.config,
                "arrays": {LATENT: "raw compressor latent (16, h, w)", CLIP: "text token states (77, width)"}}

    def check(self, info: dict[str, Any], effnet_scale: float | None = None) -> None:
        """Refuse a cache written with other networks or views than this run's, naming the key to fix."""
        check_cache_matches(info, self.text_encoder, (LATENT, CLIP), effnet=self.effnet, effnet_scale=effnet_scale)


class StageBConditioning(_TextConditioning):
    """Stage B's inputs: Stage A's latent of the crop (x0), the compressor's latent and the token states.

    Args:
        text_encoder: the frozen CLIP text tower.
        stage_a: the frozen Stage A (its encoder gives the targets).
        effnet: the semantic compressor: trained jointly with Stage B (gradients flow through it, under the run's
            autocast), or frozen (``freeze_effnet``: run like the other frozen networks, and cacheable). None only
            for writing a cache of a compressor that trains (its views are stored instead).
        caption_drop_prob: per sample, train on the empty caption instead.
        effnet_drop_prob: per sample, zero the semantic latent (guidance over it).
        effnet_noise_prob / effnet_noise_t_max: per sample, noise the latent with the cosine diffusion at
            t ~ U[0, t_max), so Stage B tolerates imperfect Stage C samples.
    """

    stage = "b"
    image_outputs = ("images", "effnet_images")

    def __init__(self, text_encoder: TextEncoder, stage_a: nn.Module, effnet: nn.Module | None,
                 freeze_effnet: bool = False,
                 caption_drop_prob: float = 0.05, effnet_drop_prob: float = 0.05, effnet_noise_prob: float = 0.3,
                 effnet_noise_t_max: float = 0.5) -> None:
        super().__init__(text_encoder, caption_drop_prob)
        self.stage_a, self.effnet, self.freeze_effnet = stage_a, effnet, bool(freeze_effnet)
        self.effnet_drop_prob = effnet_drop_prob
        self.effnet_noise_prob = effnet_noise_prob
        self.effnet_noise_t_max = effnet_noise_t_max

    def targets(self, batch: dict[str, Any]) -> torch.Tensor:
        """x0: Stage A's unquantised latent (B, 4, H/4, W/4) of the crop, cached or encoded here."""
        if "stage_a_latents" in batch:
            return batch["stage_a_latents"].float()
        with frozen_precision(batch["images"].device):
            return self.stage_a.encode(batch["images"].float())

    def semantic_latent(self, batch: dict[str, Any]) -> torch.Tensor:
        """The compressor's latent (B, 16, h, w): cached from a frozen compressor, computed by a frozen one, or computed
        with gradients by the one that trains."""
        if "latents" in batch:
            return batch["latents"].float()
        if self.freeze_effnet:
            with frozen_precision(batch["effnet_images"].device):
                return self.effnet(batch["effnet_images"].float())
        return self.effnet(batch["effnet_images"])

    def augment(self, latent: torch.Tensor) -> torch.Tensor:
        """Per-sample zeroing (p = effnet_drop_prob) or noising (p = effnet_noise_prob) of the semantic latent."""
        batch = latent.shape[0]
        u = torch.rand(batch, device=latent.device)
        noised = add_noise(latent, torch.randn_like(latent),
                           torch.rand(batch, device=latent.device) * self.effnet_noise_t_max)
        noise_mask = (u >= self.effnet_drop_prob) & (u < self.effnet_drop_prob + self.effnet_noise_prob)
        keep_mask = (u >= self.effnet_drop_prob).to(latent.dtype)
        latent = torch.where(noise_mask[:, None, None, None], noised, latent)
        return latent * keep_mask[:, None, None, None]

    def arrays(self, batch: dict[str, Any]) -> Conditions:
        """What a cache stores for the batch: ``stage_a_latents``, ``clip`` and, for a frozen compressor, its
        ``latents`` (a compressor that trains keeps its input view instead: the writer stores the batch's view)."""
        out = {"stage_a_latents": self.targets(batch), "clip": self.text_states(batch, rng=None)}
        if self.freeze_effnet:
            out["latents"] = self.semantic_latent(batch)
        return out

    def encode(self, batch: dict[str, Any], rng: random.Random | None = None) -> tuple[torch.Tensor, Conditions]:
        """(x0, conditions); with ``rng`` (training) captions are dropped and the semantic latent augmented."""
        x0 = self.targets(batch)
        effnet = self.semantic_latent(batch)
        if rng is not None:
            effnet = self.augment(effnet)
        return x0, {"effnet": effnet, "clip": self.text_states(batch, rng)}

    def info(self) -> dict[str, Any]:
        info = {"stage": self.stage, **self._text_info(), "stage_a_sha1": fingerprint(self.stage_a),
                "stage_a_config": self.stage_a.config,
                "arrays": {STAGE_A: "Stage A encoder latent of the crop, unquantised (4, H/4, W/4)"}}
        if self.freeze_effnet:
            info.update(effnet_sha1=fingerprint(self.effnet), effnet_config=self.effnet.config)
            info["arrays"][LATENT] = "raw compressor latent (16, h, w)"
        else:  # the compressor trains with Stage B: keep exactly what it would see online
            info["arrays"][EFFNET_VIEW] = "compressor input view, uint8 RGB, lossless"
        info["arrays"][CLIP] = "text token states (77, width)"
        return info

    def check(self, info: dict[str, Any]) -> None:
        check_cache_matches(info, self.text_encoder, (STAGE_A, CLIP), effnet=self.effnet, effnet_key="effnet_init",
                            stage_a=self.stage_a)
        if LATENT in info["arrays"] and not self.freeze_effnet:
            raise ValueError("the cache holds a frozen compressor's latents, but this run trains the compressor: "
                             "set stage.freeze_effnet=true (with that effnet_init), or cache without effnet_ckpt to "
                             "keep the compressor's input views")
