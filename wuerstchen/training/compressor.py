"""Contrastive image-caption pretraining of the semantic compressor, for when no ImageNet weights are at hand.

The paper's compressor is an ImageNet-pretrained EfficientNetV2-S: its latent carries semantics (what, which colour,
where) from the start, and Stage B only fine-tunes it. Trained from random weights jointly with Stage B, a compressor
learns mostly what helps Stage B reconstruct backgrounds, and little about the objects (on the synthetic shapes a
linear probe reads the colour from it no better after 4k steps than at initialisation). This module gives a
compressor semantics from the captions of the training data alone, CLIP-style: the flattened latent and the frozen
text encoder's states are projected to a shared space and matched by a symmetric InfoNCE loss. Stage B then starts
its compressor from the result (``effnet_init=...``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models import SemanticCompressor
from ..models.compressor import latent_size
from ..models.text_encoder import TextEncoder
from .base import Frozen, StageModule
from .optim import OptimizerFactory, SchedulerFactory


class CompressorPretraining(StageModule):
    """Symmetric InfoNCE between compressor latents and captions (the text encoder stays frozen).

    Args:
        effnet: the compressor; its latent (B, c, h, w) is flattened, so where things are counts.
        text_encoder: frozen; its token states are averaged.
        image_size / effnet_scale: the training resolution and the compressor's view of it (the data config's), which
            fix the latent's side and with it the projection's input size.
        embed_dim: the shared embedding width.
        temperature: initial softmax temperature (learned, as in CLIP).
    """

    trained = ("effnet",)  # the network kept; the projections and the temperature are trained but not exported

    def __init__(self, effnet: SemanticCompressor, text_encoder: TextEncoder, optimizer: OptimizerFactory,
                 scheduler: SchedulerFactory | None = None, image_size: int = 64, effnet_scale: float = 0.75,
                 embed_dim: int = 128,
                 temperature: float = 0.07, grad_clip: float | None = 1.0, **kwargs: Any) -> None:
        super().__init__(optimizer=optimizer, scheduler=scheduler, grad_clip=grad_clip, **kwargs)
        self.effnet = effnet
        self.frozen = Frozen(text_encoder=text_encoder)
        c_latent = effnet.config["c_latent"]
        latent_side = latent_size(image_size, effnet_scale)
        self.image_proj = nn.Linear(c_latent * latent_side * latent_side, embed_dim)
        self.text_proj = nn.Linear(text_encoder.width, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(1.0 / temperature).log())
        self.latent_side = latent_side

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.effnet.parameters()
        yield from self.image_proj.parameters()
        yield from self.text_proj.parameters()
        yield self.logit_scale

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.frozen.to(self.device)

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        latent = self.effnet(batch["effnet_images"])
        if latent.shape[-1] != self.latent_side or latent.shape[-2] != self.latent_side:
            raise ValueError(f"compressor latent is {tuple(latent.shape[-2:])}, expected {self.latent_side} a side: "
                             f"square crops at stage.image_size (= data.image_size) only")
        image = F.normalize(self.image_proj(latent.flatten(1)), dim=-1)
        with torch.no_grad():
            tokens = self.frozen.text_encoder(batch["captions"])  # (B, 77, width)
        text = F.normalize(self.text_proj(tokens.mean(1)), dim=-1)
        logits = self.logit_scale.exp().clamp(max=100) * image @ text.T
        # identical captions in a batch are positives for each other, not negatives
        ids = {caption: i for i, caption in enumerate(batch["captions"])}
        caption_ids = torch.tensor([ids[c] for c in batch["captions"]], device=logits.device)
        same = (caption_ids[:, None] == caption_ids[None, :]).to(logits.dtype)
        targets = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets.T))
        retrieval = (same.gather(1, logits.argmax(1, keepdim=True)) > 0).float().mean()
        return {"loss": loss, "retrieval": retrieval}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch)
        self.log("train/loss", losses["loss"], prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=len(batch["captions"]))
        self.log("train/retrieval", losses["retrieval"], on_step=True, on_epoch=False,
                 batch_size=len(batch["captions"]))
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses = self.losses(batch)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, on_epoch=True, batch_size=len(batch["captions"]),
                      sync_dist=True)
