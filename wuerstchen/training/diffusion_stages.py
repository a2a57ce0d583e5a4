"""Stage B and Stage C LightningModules: they only wire conditions, the objective and logging."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..data.cached import CLIP, LATENT, STAGE_A, CachedDataset, check_cache_matches
from ..diffusion import add_noise, diffusion_loss, sample_t
from ..models import SemanticCompressor, StageA, StageB, StageC
from ..models.text_encoder import TextEncoder, recorded_text_encoder
from ..pipeline import sample_decoder, sample_prior
from ..weights import read_weights
from ..weights.formats import shape_mismatches
from .base import Frozen, StageModule, drop_captions, load_frozen
from .distributed import SyncBatchNorm, convert_sync_batchnorm, distributed_world, union_over_ranks

log = logging.getLogger(__name__)


class DiffusionStageModule(StageModule):
    """Shared by Stage B and C: text conditioning with caption dropout, the eps objective, loss logging."""

    def __init__(self, text_encoder: TextEncoder, weighting: str = "code", caption_drop_prob: float = 0.05,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.frozen = Frozen(text_encoder=text_encoder)
        self.weighting = weighting
        self.caption_drop_prob = caption_drop_prob
        self._caption_seed = 0  # set from the run seed at fit start

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # how to rebuild the (unsaved) text encoders: sampling needs the very same conditioning
        checkpoint["text_encoders"] = {name: module.config for name, module in self.frozen.modules.items()
                                       if isinstance(module, TextEncoder)}

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.frozen.to(self.device)
        self._caption_seed = torch.initial_seed()  # the run's seed (seed_everything), the same after a resume
        if isinstance(self, StageBModule):
            synced = sum(isinstance(m, (torch.nn.SyncBatchNorm, SyncBatchNorm)) for m in self.effnet.modules())
            plain = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.effnet.modules()) - synced
            log.info("compressor BatchNorm layers: %d SyncBatchNorm, %d per-rank, world size %d", synced, plain,
                     self.trainer.world_size)

    def cache_info(self) -> dict[str, Any] | None:
        """``cache_info.json`` of the training cache (``data=cached``), or None when training reads images."""
        dataset = getattr(self.trainer.datamodule, "train_set", None) if self.trainer is not None else None
        return dataset.info if isinstance(dataset, CachedDataset) else None

    def dropped_captions(self, captions: list[str]) -> list[str]:
        """The captions with the dropped ones emptied, seeded by (run seed, rank, step): a resumed run drops the same
        captions as an uninterrupted one."""
        rng = random.Random(f"captions/{self._caption_seed}/{self.global_rank}/{self.global_step}")
        return drop_captions(captions, self.caption_drop_prob, rng)

    @contextmanager
    def full_precision(self) -> Iterator[None]:
        """The frozen encoders outside autocast, in float32 even under ``bf16-mixed``, as the official training
        computes the targets and conditionings (no_grad, fp32) and only runs the trained network under autocast:
        bf16 targets would put quantisation noise into x0 and the noise drawn like it, and sampling (fp32) would see
        other text states than training did."""
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            yield

    def encode_text(self, captions: list[str], drop: bool) -> torch.Tensor:
        if drop:
            captions = self.dropped_captions(captions)
        with self.full_precision():
            return self.frozen.text_encoder(captions).float()  # (B, 77, width)

    def cached_text(self, batch: dict[str, Any], drop: bool) -> torch.Tensor:
        """Token states from a cache (data=cached), the dropped captions' replaced by the cached states of ""."""
        clip = batch["clip"].float()
        if drop:
            dropped = [new != old for new, old in zip(self.dropped_captions(batch["captions"]), batch["captions"])]
            mask = torch.tensor(dropped, device=clip.device).view(-1, 1, 1)
            clip = torch.where(mask, batch["empty_clip"].to(clip), clip)
        return clip

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

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0, cond = self.inputs(batch, train=True)
        losses = self.objective(x0, **cond)
        self.log_losses(losses, "train", len(batch["captions"]))
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        generator = torch.Generator(self.device).manual_seed(batch_idx)  # the same t and noise every validation
        x0, cond = self.inputs(batch, train=False)
        with self.averaged():
            losses = self.objective(x0, generator=generator, **cond)
        self.log_losses(losses, "val", len(batch["captions"]))

    def inputs(self, batch: dict[str, Any], train: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

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
        stage_b_ckpt: the Stage B checkpoint holding the jointly fine-tuned compressor (``effnet.*``).
        effnet: a compressor to use instead of ``stage_b_ckpt`` (e.g. released weights loaded elsewhere).
        text_encoder: frozen CLIP text tower (``c_cond`` wide).
        effnet_scale: compressor view side / image side of the training data (``data.effnet_scale``), recorded in
            checkpoints so sampling builds the latent size training saw.
    """

    trained = ("stage_c",)
    weights_stage = "c"
    frozen_modules = ("effnet",)

    def __init__(self, stage_c: StageC, text_encoder: TextEncoder, stage_b_ckpt: str | None = None,
                 effnet: SemanticCompressor | None = None, decoder_text_encoder: TextEncoder | None = None,
                 preview_size: int = 256, preview_steps: int = 20, preview_cfg: float = 4.0,
                 effnet_scale: float | None = 0.75, **kwargs: Any) -> None:
        super().__init__(text_encoder=text_encoder, **kwargs)
        if text_encoder.width != stage_c.config["c_cond"]:
            raise ValueError(f"stage.text_encoder ({text_encoder.model_name}) gives {text_encoder.width}-wide states "
                             f"but the prior takes c_cond={stage_c.config['c_cond']}: ViT-H (1024) conditions the "
                             f"paper's prior, ViT-bigG (1280) the released v2 one")
        self.stage_c = stage_c
        self.effnet_scale = None if effnet_scale is None else float(effnet_scale)
        self._latent_shapes_seen: set[tuple[int, ...]] = set()
        self.effnet = effnet.eval().requires_grad_(False) if effnet is not None else \
            load_frozen("effnet", stage_b_ckpt, "stage_b_ckpt")
        self.stage_b_ckpt = stage_b_ckpt
        self.preview_size, self.preview_steps, self.preview_cfg = preview_size, preview_steps, preview_cfg
        self.frozen.modules.update(self._decoder(stage_b_ckpt, decoder_text_encoder, text_encoder))

    @staticmethod
    def _decoder(stage_b_ckpt: str | None, decoder_text_encoder: TextEncoder | None,
                 text_encoder: TextEncoder) -> dict[str, Any]:
        """Stage B and A for previews, when the Stage B checkpoint holds them (ours does; a released .pt only B),
        with the text encoder Stage B recorded (the prior's when it is the same, or when Stage B records none)."""
        if not stage_b_ckpt:
            return {}
        try:
            modules = {"stage_b": load_frozen("b", stage_b_ckpt, "stage_b_ckpt"),
                       "stage_a": load_frozen("a", stage_b_ckpt, "stage_b_ckpt")}
        except (KeyError, ValueError):
            return {}
        if decoder_text_encoder is None:
            recorded = recorded_text_encoder(stage_b_ckpt)
            decoder_text_encoder = text_encoder if recorded in (None, text_encoder.config) else TextEncoder(**recorded)
        modules["decoder_text_encoder"] = decoder_text_encoder
        return modules

    def sample(self, batch: dict[str, Any]) -> torch.Tensor | None:
        if "stage_b" not in self.frozen.modules:
            return None  # no decoder to look through: previews need a Stage B checkpoint with Stage A inside
        generator = torch.Generator(self.device).manual_seed(0)
        size = self.preview_size
        prior = sample_prior(self.stage_c, self.frozen.text_encoder, batch["captions"], size, size,
                             self.preview_steps, self.preview_cfg, generator, self.effnet_scale)
        return sample_decoder(self.frozen.stage_b, self.frozen.stage_a, self.frozen.decoder_text_encoder,
                              self.effnet.from_prior(prior), batch["captions"], size, size, generator=generator)

    def inputs(self, batch: dict[str, Any], train: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "latents" in batch:  # data=cached: the frozen encoders ran once, in scripts/cache_latents.py
            latents = self.effnet.to_prior(batch["latents"].float())
            self._log_latent_shape(latents, "cached")
            return latents, {"clip": self.cached_text(batch, drop=train)}
        with self.full_precision():
            latents = self.effnet.to_prior(self.effnet(batch["effnet_images"].float()))  # (B, 16, h, w)
        h, w = batch["effnet_images"].shape[-2:]
        self._log_latent_shape(latents, f"from compressor input {w}x{h}")
        return latents, {"clip": self.encode_text(batch["captions"], drop=train)}

    def _log_latent_shape(self, latents: torch.Tensor, source: str) -> None:
        """Log each new (bucket) latent size once: what the resolution settings amount to."""
        shape = tuple(latents.shape[1:])
        if shape not in self._latent_shapes_seen:
            self._latent_shapes_seen.add(shape)
            log.info("Stage C latent %s %s", "x".join(map(str, shape)), source)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        info = self.cache_info()
        if info is not None:
            check_cache_matches(info, self.frozen.text_encoder, (LATENT, CLIP), effnet=self.effnet,
                                effnet_scale=self.effnet_scale)
            self.effnet_scale = float(info["effnet_scale"])  # recorded in checkpoints, for sampling

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["effnet_scale"] = self.effnet_scale  # sampling builds the latent size this prior trained on
        # every latent (h, w) any rank trained on, so far: sampling warns at a size the prior never saw (every rank
        # dumps the checkpoint, so the gather is safe here)
        self._latent_shapes_seen = union_over_ranks(self._latent_shapes_seen)
        checkpoint["latent_sizes"] = sorted([h, w] for _, h, w in self._latent_shapes_seen)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        channels = self.stage_c.config["c_in"]
        self._latent_shapes_seen |= {(channels, h, w) for h, w in checkpoint.get("latent_sizes", [])}


class StageBModule(DiffusionStageModule):
    """Stage B: decode Stage A latents from the semantic latent and the caption; the compressor trains jointly.

    Args:
        stage_b: the decoder.
        effnet: the semantic compressor, in the same optimizer.
        stage_a_ckpt: the frozen Stage A (its encoder gives the training targets).
        effnet_drop_prob: per sample, zero the semantic latent (for CFG over it).
        effnet_noise_prob / effnet_noise_t_max: per sample, noise the latent with the same cosine diffusion at
            t ~ U[0, t_max), so Stage B tolerates imperfect Stage C samples.
        sync_batchnorm: distributed runs normalise the compressor with statistics over all ranks.
        effnet_init: start the compressor from these weights (a compressor pretraining run, a released
            ``model_v2_stage_b.pt``, a safetensors export); the ImageNet backbone weights come with
            ``stage.effnet.backbone_weights`` instead.
        freeze_effnet: keep the (pretrained) compressor as it is: eval mode, no gradients, not in the optimizer
            (the paper fine-tunes it jointly; freezing saves its backward, about a fifth of the demo's step).
    """

    weights_stage = "b"

    @property
    def pixel_multiple(self) -> int:
        """Image sides Stage B's U-Net and Stage A take (``StageB.pixel_multiple``: 64 for the released layout)."""
        return math.lcm(self.stage_b.pixel_multiple, self.stage_a.pixel_multiple)

    def __init__(self, stage_b: StageB, effnet: SemanticCompressor, text_encoder: TextEncoder,
                 stage_a_ckpt: str | None = None, stage_a: StageA | None = None, effnet_drop_prob: float = 0.05,
                 effnet_noise_prob: float = 0.3, effnet_noise_t_max: float = 0.5, sync_batchnorm: bool = True,
                 effnet_init: str | None = None, freeze_effnet: bool = False, **kwargs: Any) -> None:
        self._freeze_effnet = bool(freeze_effnet)  # before the base class reads `trained`
        super().__init__(text_encoder=text_encoder, **kwargs)
        self.stage_b = stage_b
        self.effnet = effnet
        self.stage_a = stage_a.eval().requires_grad_(False) if stage_a is not None else \
            load_frozen("a", stage_a_ckpt, "stage_a_ckpt")
        if effnet_init:
            if not Path(effnet_init).exists():
                raise FileNotFoundError(f"stage.effnet_init={effnet_init} does not exist")
            state, _ = read_weights(effnet_init, "effnet", prefer_ema=False)
            missing, unexpected, wrong = shape_mismatches(effnet, state)
            if missing or unexpected or wrong:
                raise ValueError(f"stage.effnet_init={effnet_init} does not fit stage.effnet: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
            effnet.load_state_dict(state)
            log.info("compressor initialised from %s", effnet_init)
        if self._freeze_effnet:
            effnet.eval().requires_grad_(False)
        self.effnet_drop_prob = effnet_drop_prob
        self.effnet_noise_prob = effnet_noise_prob
        self.effnet_noise_t_max = effnet_noise_t_max
        self.sync_batchnorm = sync_batchnorm and not self._freeze_effnet  # frozen BatchNorm has nothing to sync

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

    def sample(self, batch: dict[str, Any]) -> torch.Tensor:
        """Stage B's reconstruction of the batch from its own semantic latents (decoded by Stage A)."""
        generator = torch.Generator(self.device).manual_seed(0)
        height, width = self._image_size(batch)
        return sample_decoder(self.stage_b, self.stage_a, self.frozen.text_encoder, self.semantic_latent(batch),
                              batch["captions"], height, width, generator=generator)

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

    def semantic_latent(self, batch: dict[str, Any]) -> torch.Tensor:
        """The compressor's latent: cached from the frozen compressor, or computed (with gradients when it trains)."""
        if "latents" in batch:
            return batch["latents"].float()
        if self._freeze_effnet:  # a frozen encoder like the others; a trained one runs under autocast
            with self.full_precision():
                return self.effnet(batch["effnet_images"].float())  # (B, 16, h, w)
        return self.effnet(batch["effnet_images"])

    def augment_effnet(self, latent: torch.Tensor) -> torch.Tensor:
        """Per-sample zeroing (p = effnet_drop_prob) or noising (p = effnet_noise_prob) of the semantic latent."""
        batch = latent.shape[0]
        u = torch.rand(batch, device=latent.device)
        noised = add_noise(latent, torch.randn_like(latent),
                           torch.rand(batch, device=latent.device) * self.effnet_noise_t_max)
        noise_mask = (u >= self.effnet_drop_prob) & (u < self.effnet_drop_prob + self.effnet_noise_prob)
        keep_mask = (u >= self.effnet_drop_prob).to(latent.dtype)
        latent = torch.where(noise_mask[:, None, None, None], noised, latent)
        return latent * keep_mask[:, None, None, None]

    def inputs(self, batch: dict[str, Any], train: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "stage_a_latents" in batch:  # data=cached: Stage A (and a frozen compressor) ran in scripts/cache_latents.py
            x0 = batch["stage_a_latents"].float()
        else:
            with self.full_precision():
                x0 = self.stage_a.encode(batch["images"].float())  # (B, 4, H/4, W/4), unquantised
        effnet = self.semantic_latent(batch)
        if train:
            effnet = self.augment_effnet(effnet)
        clip = self.cached_text(batch, drop=train) if "clip" in batch else self.encode_text(batch["captions"], train)
        return x0, {"effnet": effnet, "clip": clip}

    def on_fit_start(self) -> None:
        super().on_fit_start()
        info = self.cache_info()
        if info is not None:
            check_cache_matches(info, self.frozen.text_encoder, (STAGE_A, CLIP), effnet=self.effnet,
                                effnet_key="stage.effnet_init", stage_a=self.stage_a)
            if LATENT in info["arrays"] and not self._freeze_effnet:
                raise ValueError("the cache holds a frozen compressor's latents, but this run trains the compressor: "
                                 "set stage.freeze_effnet=true (with that stage.effnet_init), or cache without "
                                 "effnet_ckpt to keep the compressor's input views")
