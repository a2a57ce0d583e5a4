"""Stage A LightningModule: the VQGAN with reconstruction, perceptual, adversarial and VQ losses (arXiv 2306.00637)."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ..models import PatchDiscriminator, StageA
from ..models.stage_a import codebook_usage
from .base import StageModule
from .checkpointing import is_final_step
from .distributed import NonFiniteSteps, from_rank0, summed_over_ranks
from .latent_scale import MeasurementFailed, measure_latent_scale
from .optim import OptimizerFactory, SchedulerFactory, build_optimizer
from .perceptual import LPIPS

log = logging.getLogger(__name__)


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """lambda = ||grad_last L_rec|| / (||grad_last L_GAN|| + 1e-4) (Esser et al. 2021, eq. 7)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class StageAModule(StageModule):
    """Generator (the VQGAN) and patch discriminator, two optimizers, manual optimisation.

    The discriminator's optimizer steps through the raw torch optimizer so that ``trainer.global_step`` (and with
    it ``max_steps``, the LR schedule and the discriminator start) counts generator steps only; Lightning would
    otherwise count both optimizers' steps.

    Args:
        reconstruction: ``l1`` or ``l2`` pixel loss.
        perceptual: an LPIPS module, or None to train without it.
        disc_start: generator step from which the adversarial loss and discriminator updates run.
        disc_weight: factor on the adaptive GAN weight.
        grad_clip: max gradient norm of both networks (manual optimisation clips here, not in the Trainer).
        codebook_restart_every: every this many steps, codes that no rank used since the last check are moved onto
            encoder outputs of the current batch (rank 0's, on every rank), and the codebook starts from encoder
            outputs instead of its tiny uniform init (0 turns both off). Without it most of a large codebook stays
            dead for a long time.
        quantize_prob: per sample, the probability that the decoder trains on the quantised latent (1: always,
            the official recipe); the rest decode the unquantised latent, which is what generation decodes (Stage B
            outputs continuous latents), so short runs reconstruct that path far better.
        latent_noise: per sample, Gaussian noise of std ``u * latent_noise * std(latents)``, u ~ U[0, 1), is added to
            the latent the decoder sees (0: off, the official recipe). A small decoder trained without it maps
            latents a little off the encoder's manifold (every Stage B sample is) to speckle; with it, the decoder
            is smooth around the manifold. Relative to the latent's own std, so the encoder cannot outgrow it.
        latent_scale_images: after the run's last step (``trainer.max_steps``), before its final checkpoint, the
            latent scale of the weights that checkpoint holds (the EMA's, if any) is measured over this many training
            images (``training.latent_scale``) and becomes Stage A's ``scale_factor`` there, which Stage B and the
            caches read. 0 or None keeps the configured ``stage_a.scale_factor``. Earlier checkpoints keep the
            configured value (the encoder is still moving): ``scripts/measure_latent_scale.py`` sets one in any.
    """

    trained = ("stage_a",)

    @property
    def pixel_multiple(self) -> int:
        """Image sides the VQGAN takes (``StageA.pixel_multiple``: 4 for f4; the data stays at 32, see the base)."""
        return self.stage_a.pixel_multiple

    def __init__(self, stage_a: StageA, discriminator: PatchDiscriminator, optimizer: OptimizerFactory,
                 disc_optimizer: OptimizerFactory, scheduler: SchedulerFactory | None = None,
                 perceptual: LPIPS | None = None, reconstruction: str = "l1", perceptual_weight: float = 1.0,
                 vq_weight: float = 1.0, disc_weight: float = 0.1, disc_start: int = 10_000,
                 grad_clip: float | None = 1.0, codebook_restart_every: int = 100, quantize_prob: float = 1.0,
                 latent_noise: float = 0.0, latent_scale_images: int | None = 4096, ema: dict[str, Any] | None = None,
                 max_nonfinite_steps: int = 10, init: dict[str, Any] | None = None,
                 channels_last: bool = False) -> None:
        super().__init__(optimizer=optimizer, scheduler=scheduler, ema=ema, grad_clip=grad_clip,
                         max_nonfinite_steps=max_nonfinite_steps, init=init, channels_last=channels_last)
        self.codebook_restart_every = codebook_restart_every
        self.nonfinite_d = NonFiniteSteps(max_nonfinite_steps)  # the generator's are counted by the base class
        self.quantize_prob = quantize_prob
        if latent_noise < 0:
            raise ValueError(f"stage.latent_noise={latent_noise}: expected >= 0")
        self.latent_noise = latent_noise
        if latent_scale_images is not None and latent_scale_images < 0:
            raise ValueError(f"stage.latent_scale_images={latent_scale_images}: expected >= 0 or null")
        self.latent_scale_images = latent_scale_images or 0
        codebook_size = stage_a.vquantizer.codebook.num_embeddings
        # uses of each code since the last restart, summed over all ranks (so every rank holds the same counts, DDP's
        # per-step broadcast of rank 0's buffers changes nothing, and a checkpoint holds every rank's uses);
        # -1 marks a codebook not yet initialised from data
        self.register_buffer("code_uses", torch.full((codebook_size,), -1, dtype=torch.long))
        if reconstruction not in ("l1", "l2"):
            raise ValueError(f"stage.reconstruction={reconstruction!r}: expected 'l1' or 'l2'")
        self.automatic_optimization = False
        self.stage_a = stage_a
        self.discriminator = discriminator
        self.perceptual = perceptual
        self.disc_optimizer_factory = disc_optimizer
        self.reconstruction = reconstruction
        self.perceptual_weight, self.vq_weight = perceptual_weight, vq_weight
        self.disc_weight, self.disc_start = disc_weight, disc_start

    def configure_model(self) -> None:
        from .distributed import FSDPStrategy

        if self._trainer is not None and isinstance(self._trainer.strategy, FSDPStrategy):
            # the step works on whole tensors: codebook restarts write encoder outputs into codes, the adaptive GAN
            # weight compares gradient norms of one layer
            raise ValueError("trainer=fsdp shards Stage B and C; Stage A (18M parameters, on every GPU) trains "
                             "with trainer=ddp")
        super().configure_model()

    def configure_optimizers(self) -> tuple[list, list]:
        generator = build_optimizer(self.stage_a.parameters(), self.optimizer_factory, self.scheduler_factory)
        disc = self.disc_optimizer_factory(self.discriminator.parameters())
        schedulers = [generator["lr_scheduler"]] if "lr_scheduler" in generator else []
        return [generator["optimizer"], disc], schedulers

    def generator_losses(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        latents = self.stage_a.encode(images)
        quantized = self.stage_a.quantize(latents)
        self.code_uses += summed_over_ranks(torch.bincount(quantized.indices.flatten(), minlength=len(self.code_uses)))
        decoded = quantized.latents
        if self.quantize_prob < 1.0:  # per sample: some decode the unquantised latent, as generation does
            keep = torch.rand(len(images), device=images.device) < self.quantize_prob
            decoded = torch.where(keep[:, None, None, None], quantized.latents, latents)
        if self.latent_noise > 0:
            std = self.latent_noise * latents.detach().std() * torch.rand(len(images), 1, 1, 1, device=images.device)
            decoded = decoded + std * torch.randn_like(decoded)
        recon = self.stage_a.decode(decoded)
        diff = recon - images
        rec = diff.abs().mean() if self.reconstruction == "l1" else diff.square().mean()
        nll = rec
        losses = {"rec_loss": rec, "vq_loss": quantized.loss}
        if self.perceptual is not None and self.perceptual_weight > 0:
            losses["perceptual_loss"] = self.perceptual(recon, images).mean()
            nll = nll + self.perceptual_weight * losses["perceptual_loss"]
        total = nll + self.vq_weight * quantized.loss
        if self.global_step >= self.disc_start:
            gan = -self.discriminator(recon * 2 - 1).mean()
            weight = self.disc_weight * adaptive_gan_weight(nll, gan, self.stage_a.last_layer)
            losses.update(g_loss=gan, d_weight=weight)
            total = total + weight * gan
        losses["loss"] = total
        return losses, recon

    @torch.no_grad()
    def refresh_codebook(self, images: torch.Tensor) -> None:
        """Data-dependent codebook init, then periodic restarts of the codes no rank used since the last restart.

        Every rank takes the same decision (``code_uses`` holds all ranks' counts) and writes rank 0's replacements,
        so the ranks keep one codebook.
        """
        codebook = self.stage_a.vquantizer.codebook.weight  # (K, C)
        z = self.stage_a.encode_unscaled(images).float()  # (B, C, h, w); fp32 under autocast
        z = z.permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])  # (B*h*w, C)
        dead = torch.ones_like(self.code_uses, dtype=torch.bool) if self.code_uses[0] < 0 else self.code_uses == 0
        num_dead = int(dead.sum())  # the same on every rank
        if num_dead:
            picks = z[torch.randint(len(z), (num_dead,), device=z.device)]  # (num_dead, C)
            picks = picks + 0.01 * z.std() * torch.randn_like(picks)  # identical picks would stay identical
            codebook[dead] = from_rank0(picks).to(codebook.dtype)
        self.code_uses.zero_()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = batch["images"]
        opt_g, opt_d = self.optimizers()
        if self.codebook_restart_every and (self.code_uses[0] < 0 or
                                            self.global_step % self.codebook_restart_every == 0):
            self.refresh_codebook(images)
        losses, recon = self.generator_losses(images)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(losses["loss"])
        self.configure_gradient_clipping(opt_g)  # manual optimisation: Lightning leaves clipping to us
        opt_g.step()
        self.update_ema(self.global_step - 1)  # manual optimisation: global_step already counts this step
        scheduler = self.lr_schedulers()  # manual optimisation steps its scheduler itself
        if scheduler is not None:
            scheduler.step()
        if self.global_step > self.disc_start:  # global_step already counts the step just taken
            logits_real = self.discriminator(images * 2 - 1)
            logits_fake = self.discriminator(recon.detach() * 2 - 1)
            losses["d_loss"] = hinge_d_loss(logits_real, logits_fake)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(losses["d_loss"])
            self.configure_gradient_clipping(opt_d)
            if self.nonfinite_d.check(opt_d.optimizer, self.global_step, self.device):
                opt_d.optimizer.step()  # raw step: see the class docstring
        self.log("train/loss", losses.pop("loss").detach(), prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=len(images))
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, on_step=True, on_epoch=False,
                      batch_size=len(images))
        # here, not in the module's on_train_batch_end: Lightning calls that after the callbacks' one, in which
        # Checkpointing writes the final checkpoint
        if self.latent_scale_images and is_final_step(self.trainer):
            self.record_latent_scale(len(images))

    def record_latent_scale(self, batch_size: int) -> None:
        """Measure the latent scale of the weights a checkpoint holds (``averaged``: the EMA's, which ``load_network``
        loads first) and make it ``scale_factor`` of both networks. Every rank measures its share (a collective).

        Training never reads ``scale_factor`` after this (it is the last step), and a resumed run rebuilds Stage A
        with the configured one, so a run continued past this step trains as an uninterrupted one.
        """
        datamodule = self.trainer.datamodule
        if datamodule is None:
            log.warning("no datamodule to measure the latent scale on: stage_a.scale_factor stays %s",
                        self.stage_a.scale_factor)
            return
        start, previous = time.perf_counter(), self.stage_a.scale_factor
        try:
            with self.averaged() as stage_a:
                moments = measure_latent_scale(stage_a, datamodule, self.latent_scale_images, batch_size)
        except MeasurementFailed as exn:  # the same on every rank; the trained weights must still be saved
            log.error("%s; the final checkpoint keeps scale_factor=%s: run scripts/measure_latent_scale.py on it "
                      "before training Stage B", exn, previous)
            return
        for network in (self.stage_a, self.ema.module if self.ema is not None else None):
            if network is not None:
                network.set_scale_factor(moments.scale_factor)
        self.log("train/latent_scale", moments.scale_factor, on_step=True, on_epoch=False)
        if self.trainer.is_global_zero:
            log.info("Stage A latent scale over %d images: rms %.6g (std %.6g, mean %.4g); scale_factor %s -> %.6g "
                     "(%.1f s)", moments.num_images, moments.rms, moments.std, moments.mean, previous,
                     moments.scale_factor, time.perf_counter() - start)

    def preview(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["images"]
        out = {"input": images, "reconstruction": self.stage_a.decode(self.stage_a.encode(images))}
        if self.ema is not None:
            with self.averaged() as stage_a:
                out["reconstruction_ema"] = stage_a.decode(stage_a.encode(images))
        return out

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = batch["images"]
        with self.averaged() as stage_a:
            latents = stage_a.encode(images)
            quantized = stage_a.quantize(latents)
            recon = stage_a.decode(latents).clamp(0, 1)  # the path generation uses: no quantisation
            recon_vq = stage_a.decode(quantized.latents).clamp(0, 1)
        metrics = {
            "val/psnr": peak_signal_noise_ratio(recon, images, data_range=1.0),
            "val/psnr_vq": peak_signal_noise_ratio(recon_vq, images, data_range=1.0),
            "val/ssim": structural_similarity_index_measure(recon, images, data_range=1.0),
            "val/loss": F.l1_loss(recon_vq, images),
        }
        if self.perceptual is not None:
            metrics["val/lpips"] = self.perceptual(recon, images).mean()
        usage = codebook_usage(quantized.indices, self.stage_a.vquantizer.codebook.num_embeddings)
        metrics["val/codebook_perplexity"] = torch.tensor(usage["perplexity"], device=self.device)
        metrics["val/codebook_used"] = torch.tensor(usage["fraction_used"], device=self.device)
        self.log_dict(metrics, on_epoch=True, batch_size=len(images), sync_dist=True)
