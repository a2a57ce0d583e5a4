"""Stage B and Stage C LightningModules: they wire the stage's conditioning, the objective, previews and logging."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping
from typing import Any

import torch

from ..conditioning import StageBConditioning, StageCConditioning
from ..data.cached import CachedDataset
from ..diffusion import diffusion_loss, sample_t
from ..models import SemanticCompressor, StageA, StageB, StageC
from ..models.text_encoder import TextEncoder
from ..pipeline import sample_decoder, sample_prior
from ..weights import checkpoint as schema
from .base import Frozen, StageModule
from .distributed import SyncBatchNorm, convert_sync_batchnorm, distributed_world, union_over_ranks

log = logging.getLogger(__name__)


class DiffusionStageModule(StageModule):
    """Shared by Stage B and C: the stage's conditioning (online or cached batches alike), the eps objective, loss
    logging. Subclasses set ``conditioning`` (:mod:`wuerstchen.conditioning`) and ``frozen`` (the unregistered
    networks: text encoders, preview decoders)."""

    conditioning: StageBConditioning | StageCConditioning
    frozen: Frozen

    def __init__(self, weighting: str = "code", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.weighting = weighting
        self._caption_seed = 0  # set from the run seed at fit start

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # how to rebuild the (unsaved) text encoders: sampling needs the very same conditioning
        schema.write_text_encoders(checkpoint, {name: module.config for name, module in self.frozen.modules.items()
                                                if isinstance(module, TextEncoder)})

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.frozen.to(self.device)
        self._caption_seed = torch.initial_seed()  # the run's seed (seed_everything), the same after a resume
        info = self.cache_info()
        if info is not None:
            self.check_cache(info)

    def check_cache(self, info: dict[str, Any]) -> None:
        self.conditioning.check(info)

    def cache_info(self) -> dict[str, Any] | None:
        """``cache_info.json`` of the training cache (``data=cached``), or None when training reads images."""
        dataset = getattr(self.trainer.datamodule, "train_set", None) if self.trainer is not None else None
        return dataset.info if isinstance(dataset, CachedDataset) else None

    def caption_rng(self) -> random.Random:
        """The generator of this step's caption dropout, seeded by (run seed, rank, step): a resumed run drops the
        same captions as an uninterrupted one."""
        return random.Random(f"captions/{self._caption_seed}/{self.global_rank}/{self.global_step}")

    def log_losses(self, losses: dict[str, torch.Tensor], prefix: str, batch_size: int) -> None:
        on_step = prefix == "train"
        self.log(f"{prefix}/loss", losses["loss_unweighted"], on_step=on_step, on_epoch=not on_step,
                 prog_bar=on_step, batch_size=batch_size, sync_dist=not on_step)
        self.log(f"{prefix}/loss_weighted", losses["loss"], on_step=on_step, on_epoch=not on_step,
                 batch_size=batch_size, sync_dist=not on_step)

    def objective(self, x0: torch.Tensor, generator: torch.Generator | None = None,
                  **cond: torch.Tensor) -> dict[str, torch.Tensor]:
        """The eps loss at the official t distribution; ``generator`` fixes t and noise (validation). x0, the noise
        and x_t are float32 (the official training noises outside autocast); the network casts under autocast."""
        x0 = x0.float()
        t = sample_t(x0.shape[0], generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        return diffusion_loss(self.network, x0, t, noise, weighting=self.weighting, **cond)

    def losses(self, batch: dict[str, Any], train: bool = True,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The step's losses (``loss``, weighted, is the one trained on): the conditioning's x0 and conditions, with
        the training-time dropout when ``train``, through the objective. The training step, validation and
        ``scripts/benchmark.py`` all run this."""
        x0, cond = self.conditioning.encode(batch, self.caption_rng() if train else None)
        if train:
            self.observe_latents(x0, batch)
        return self.objective(x0, generator=generator, **cond)

    def observe_latents(self, x0: torch.Tensor, batch: dict[str, Any]) -> None:
        """Called with every training batch's x0 (Stage C records the latent sizes it trains on)."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch, train=True)
        self.log_losses(losses, "train", len(batch["captions"]))
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        generator = torch.Generator(self.device).manual_seed(batch_idx)  # the same t and noise every validation
        with self.averaged():
            losses = self.losses(batch, train=False, generator=generator)
        self.log_losses(losses, "val", len(batch["captions"]))

    def preview(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Samples for the batch's captions from the raw and (if any) EMA weights, same seed for both."""
        out = {"input": batch["images"]} if "images" in batch else {}
        raw = self.sample(batch)
        if raw is None:
            return out
        out["sample"] = raw
        if self.ema is not None:
            with self.averaged():
                out["sample_ema"] = self.sample(batch)
        return out

    def sample(self, batch: dict[str, Any]) -> torch.Tensor | None:
        raise NotImplementedError


class StageCModule(DiffusionStageModule):
    """Stage C: text -> semantic latent. The compressor (from the Stage B checkpoint) and text encoder are frozen.

    Args:
        stage_c: the prior.
        text_encoder: frozen CLIP text tower (``c_cond`` wide).
        effnet: the frozen compressor Stage B was fine-tuned with (the ``effnet`` node: ``stage_b_ckpt``).
        stage_b / stage_a: the decoder for previews, when the Stage B checkpoint holds them (ours does; a released
            ``.pt`` holds no Stage A): None shows no samples.
        decoder_text_encoder: Stage B's text encoder, a ``TextEncoder`` or the record of one (what the Stage B
            checkpoint records); None, or the prior's record, shares the prior's.
        caption_drop_prob: per sample, train on the empty caption (guidance).
        effnet_scale: compressor view side / image side of the training data (``data.effnet_scale``), recorded in
            checkpoints so sampling builds the latent size training saw.
    """

    trained = ("stage_c",)
    frozen_modules = ("effnet",)

    def __init__(self, stage_c: StageC, text_encoder: TextEncoder, effnet: SemanticCompressor,
                 stage_b: StageB | None = None, stage_a: StageA | None = None,
                 decoder_text_encoder: TextEncoder | Mapping[str, Any] | None = None, caption_drop_prob: float = 0.05,
                 preview_size: int = 256, preview_steps: int = 20, preview_cfg: float = 4.0,
                 effnet_scale: float | None = 0.75, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if text_encoder.width != stage_c.config["c_cond"]:
            raise ValueError(f"stage.text_encoder ({text_encoder.model_name}) gives {text_encoder.width}-wide states "
                             f"but the prior takes c_cond={stage_c.config['c_cond']}: ViT-H (1024) conditions the "
                             f"paper's prior, ViT-bigG (1280) the released v2 one")
        self.stage_c = stage_c
        self.effnet = effnet.eval().requires_grad_(False)
        self.effnet_scale = None if effnet_scale is None else float(effnet_scale)
        self._latent_shapes_seen: set[tuple[int, ...]] = set()
        self.preview_size, self.preview_steps, self.preview_cfg = preview_size, preview_steps, preview_cfg
        self.frozen = Frozen(text_encoder=text_encoder)
        if stage_b is not None and stage_a is not None:  # previews look through the decoder
            self.frozen.modules.update(stage_b=stage_b.eval().requires_grad_(False),
                                       stage_a=stage_a.eval().requires_grad_(False),
                                       decoder_text_encoder=self._decoder_text(decoder_text_encoder, text_encoder))
        self.conditioning = StageCConditioning(text_encoder, self.effnet, caption_drop_prob)

    @staticmethod
    def _decoder_text(decoder: TextEncoder | Mapping[str, Any] | None, prior: TextEncoder) -> TextEncoder:
        """Stage B's text encoder: the prior's when it is the same (or Stage B records none)."""
        if isinstance(decoder, TextEncoder):
            return decoder.eval().requires_grad_(False)
        if decoder is None or dict(decoder) == prior.config:
            return prior
        return TextEncoder(**decoder).eval().requires_grad_(False)

    def sample(self, batch: dict[str, Any]) -> torch.Tensor | None:
        if "stage_b" not in self.frozen.modules:
            return None  # no decoder to look through: previews need a Stage B checkpoint with Stage A inside
        generator = torch.Generator(self.device).manual_seed(0)
        size = self.preview_size
        prior = sample_prior(self.stage_c, self.frozen.text_encoder, batch["captions"], size, size,
                             self.preview_steps, self.preview_cfg, generator, self.effnet_scale)
        return sample_decoder(self.frozen.stage_b, self.frozen.stage_a, self.frozen.decoder_text_encoder,
                              self.effnet.from_prior(prior), batch["captions"], size, size, generator=generator)

    def observe_latents(self, x0: torch.Tensor, batch: dict[str, Any]) -> None:
        """Log each new (bucket) latent size once (what the resolution settings amount to) and record it: sampling
        warns at a size the prior never trained on."""
        shape = tuple(x0.shape[1:])
        if shape not in self._latent_shapes_seen:
            self._latent_shapes_seen.add(shape)
            if "effnet_images" in batch:
                h, w = batch["effnet_images"].shape[-2:]
                source = f"from compressor input {w}x{h}"
            else:
                source = "cached"
            log.info("Stage C latent %s %s", "x".join(map(str, shape)), source)

    def check_cache(self, info: dict[str, Any]) -> None:
        self.conditioning.check(info, effnet_scale=self.effnet_scale)
        self.effnet_scale = float(info["effnet_scale"])  # recorded in checkpoints, for sampling

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # sampling builds the latent size this prior trained on, and warns at a size it never saw: every latent
        # (h, w) any rank trained on so far (every rank dumps the checkpoint, so the gather is safe here)
        self._latent_shapes_seen = union_over_ranks(self._latent_shapes_seen)
        schema.write_prior_sampling(checkpoint, self.effnet_scale, {(h, w) for _, h, w in self._latent_shapes_seen})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        channels = self.stage_c.config["c_in"]
        self._latent_shapes_seen |= {(channels, h, w) for h, w in schema.latent_sizes(checkpoint)}

class StageBModule(DiffusionStageModule):
    """Stage B: decode Stage A latents from the semantic latent and the caption; the compressor trains jointly.

    Args:
        stage_b: the decoder.
        effnet: the semantic compressor, in the same optimizer (its first weights: ``stage.init.effnet``, set by the
            ``effnet_init`` shortcut; the ImageNet backbone weights come with ``stage.effnet.backbone_weights``).
        text_encoder: the frozen CLIP text tower.
        stage_a: the frozen Stage A (its encoder gives the training targets; the ``stage_a`` node: ``stage_a_ckpt``).
        caption_drop_prob, effnet_drop_prob, effnet_noise_prob, effnet_noise_t_max: the conditioning's training-time
            dropout (``StageBConditioning``).
        sync_batchnorm: distributed runs normalise the compressor with statistics over all ranks.
        freeze_effnet: keep the (pretrained) compressor as it is: eval mode, no gradients, not in the optimizer
            (the paper fine-tunes it jointly; freezing saves its backward, about a fifth of the demo's step).
    """


    def __init__(self, stage_b: StageB, effnet: SemanticCompressor, text_encoder: TextEncoder, stage_a: StageA,
                 caption_drop_prob: float = 0.05, effnet_drop_prob: float = 0.05, effnet_noise_prob: float = 0.3,
                 effnet_noise_t_max: float = 0.5, sync_batchnorm: bool = True, freeze_effnet: bool = False,
                 **kwargs: Any) -> None:
        self._freeze_effnet = bool(freeze_effnet)  # before the base class reads `trained`
        super().__init__(**kwargs)
        self.stage_b = stage_b
        self.effnet = effnet
        self.stage_a = stage_a.eval().requires_grad_(False)
        if self._freeze_effnet:
            effnet.eval().requires_grad_(False)
        self.sync_batchnorm = sync_batchnorm and not self._freeze_effnet  # frozen BatchNorm has nothing to sync
        self.frozen = Frozen(text_encoder=text_encoder)
        self.conditioning = StageBConditioning(text_encoder, self.stage_a, effnet, self._freeze_effnet,
                                               caption_drop_prob, effnet_drop_prob, effnet_noise_prob,
                                               effnet_noise_t_max)

    @property
    def pixel_multiple(self) -> int:
        """Image sides Stage B's U-Net and Stage A take (``StageB.pixel_multiple``: 64 for the released layout)."""
        return math.lcm(self.stage_b.pixel_multiple, self.stage_a.pixel_multiple)

    @property
    def trained(self) -> tuple[str, ...]:
        return ("stage_b",) if self._freeze_effnet else ("stage_b", "effnet")

    @property
    def frozen_modules(self) -> tuple[str, ...]:
        return ("stage_a", "effnet") if self._freeze_effnet else ("stage_a",)

    def configure_model(self) -> None:
        """Distributed: the compressor's BatchNorm layers normalise with statistics over all ranks' batches, set up
        before the strategy wraps or shards the model (CPU/gloo too: see ``distributed.SyncBatchNorm``). Which kind
        follows the device the strategy trains on: the module may not have been moved there yet."""
        if self.sync_batchnorm and distributed_world() > 1 and not getattr(self, "_synced", False):
            self._synced = True
            convert_sync_batchnorm(self.effnet, self.trainer.strategy.root_device)
        super().configure_model()

    def on_fit_start(self) -> None:
        super().on_fit_start()
        synced = sum(isinstance(m, (torch.nn.SyncBatchNorm, SyncBatchNorm)) for m in self.effnet.modules())
        plain = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.effnet.modules()) - synced
        log.info("compressor BatchNorm layers: %d SyncBatchNorm, %d per-rank, world size %d", synced, plain,
                 self.trainer.world_size)

    def sample(self, batch: dict[str, Any]) -> torch.Tensor:
        """Stage B's reconstruction of the batch from its own semantic latents (decoded by Stage A)."""
        generator = torch.Generator(self.device).manual_seed(0)
        height, width = self._image_size(batch)
        return sample_decoder(self.stage_b, self.stage_a, self.frozen.text_encoder,
                              self.conditioning.semantic_latent(batch), batch["captions"], height, width,
                              generator=generator)

    def preview(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = super().preview(batch)
        if "images" not in batch and "stage_a_latents" in batch:  # cached: show the target through Stage A
            with torch.no_grad():
                out = {"input": self.stage_a.decode(batch["stage_a_latents"].float()).clamp(0, 1), **out}
        return out

    @staticmethod
    def _image_size(batch: dict[str, Any]) -> tuple[int, int]:
        if "images" in batch:
            return tuple(batch["images"].shape[-2:])
        h, w = batch["stage_a_latents"].shape[-2:]
        return 4 * h, 4 * w  # Stage A is f4
