"""Stage A VQGAN and patch discriminator: parity with diffusers' PaellaVQModel, VQ math, layout, checkpointing."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel
from torch.nn.utils import parametrize

from wuerstchen.models.discriminator import PatchDiscriminator
from wuerstchen.models.stage_a import StageA, VectorQuantizer, codebook_usage, nearest_codes

OURS_CODEBOOK, DIFFUSERS_CODEBOOK = "vquantizer.codebook.weight", "vquantizer.embedding.weight"
TINY = dict(levels=2, bottleneck_blocks=1, c_hidden=16, c_latent=4, codebook_size=8)
TINY_DIFFUSERS = dict(levels=2, bottleneck_blocks=1, embed_dim=16, latent_channels=4, num_vq_embeddings=8)
TOL = 1e-5


def to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {OURS_CODEBOOK if k == DIFFUSERS_CODEBOOK else k: v for k, v in state.items()}


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {DIFFUSERS_CODEBOOK if k == OURS_CODEBOOK else k: v for k, v in state.items()}


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values everywhere: zero gammas and identity BN statistics would hide wiring errors."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        std = 1.0 if "codebook" in name or "embedding" in name else 0.3  # codes at the latent's scale
        param.copy_(torch.randn(param.shape, generator=gen) * std)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.5)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
    return model.eval()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def assert_parity(ours: StageA, theirs: PaellaVQModel, batch: int) -> None:
    """encode, decode and quantisation agree; diffusers works in the raw (unscaled) latent space."""
    s = ours.scale_factor
    images = torch.rand(batch, 3, 40, 56, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        latents = ours.encode(images)  # (B, 4, 10, 14)
        raw = theirs.encode(images).latents
        assert latents.shape == (batch, 4, 10, 14)
        assert max_err(latents * s, raw) <= TOL
        assert max_err(ours.decode(latents), theirs.decode(raw).sample) <= TOL
        quantized = ours.quantize(latents)
        z_q, loss, (_, _, indices) = theirs.vquantizer(raw)
    assert torch.equal(quantized.indices.flatten(), indices)
    assert quantized.indices.unique().numel() > 1  # several codes in play, so the comparison means something
    assert max_err(quantized.latents * s, z_q) <= TOL
    assert quantized.loss.item() == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_parity_diffusers_to_ours(batch: int) -> None:
    theirs = randomise(PaellaVQModel(**TINY_DIFFUSERS), seed=0)
    ours = StageA(**TINY).eval()
    ours.load_state_dict(to_ours(theirs.state_dict()), strict=True)
    assert_parity(ours, theirs, batch)


@pytest.mark.parametrize("batch", [1, 3])
def test_parity_ours_to_diffusers(batch: int) -> None:
    ours = randomise(StageA(**TINY), seed=1)
    theirs = PaellaVQModel(**TINY_DIFFUSERS).eval()
    converted = to_diffusers(ours.state_dict())
    assert set(converted) == set(theirs.state_dict())  # from_pretrained would only warn on missing keys
    theirs.load_state_dict(converted, strict=True)
    assert_parity(ours, theirs, batch)


def test_full_size_layout_matches_released() -> None:
    with torch.device("meta"):
        ours, theirs = StageA(), PaellaVQModel()
    assert sum(p.numel() for p in ours.parameters()) == 18_406_894
    ours_state, theirs_state = ours.state_dict(), to_ours(theirs.state_dict())
    assert len(ours_state) == 122
    assert OURS_CODEBOOK in ours_state and DIFFUSERS_CODEBOOK not in ours_state
    assert {k: v.shape for k, v in ours_state.items()} == {k: v.shape for k, v in theirs_state.items()}
    assert ours.vquantizer.codebook.weight.shape == (8192, 4)


def test_vq_loss_closed_form_and_gradients() -> None:
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[0.9, 0.1], [0.2, 1.5]]).T.reshape(1, 2, 1, 2).requires_grad_()  # (1, C=2, h=1, w=2)
    for weight in (0.25, 1.0):
        vq = VectorQuantizer(codebook_size=3, c_latent=2, commitment_weight=weight)
        vq.codebook.weight.data.copy_(codebook)
        z.grad = None
        out = vq(z)
        assert out.indices.tolist() == [[[1, 2]]]
        e = codebook[[1, 2]].T.reshape(1, 2, 1, 2)
        assert torch.equal(out.latents, e)
        mse = (0.01 + 0.01 + 0.04 + 0.25) / 4  # squared distances to the chosen codes, averaged over 4 elements
        assert out.loss.item() == pytest.approx((1 + weight) * mse, rel=1e-6)
        out.loss.backward()
        # the codebook term moves only the codes, the commitment term (x weight) only the encoder output
        torch.testing.assert_close(z.grad, weight * 2 * (z - e).detach() / 4)
        expected = torch.zeros(3, 2)
        expected[[1, 2]] = 2 * (codebook[[1, 2]] - z.detach().reshape(2, 2).T) / 4
        torch.testing.assert_close(vq.codebook.weight.grad, expected)


def test_quantize_works_in_raw_space_with_straight_through() -> None:
    model = StageA(**TINY)
    codebook = model.vquantizer.codebook.weight
    with torch.no_grad():
        codebook.normal_()
    latents = torch.randn(2, 4, 3, 5, requires_grad=True)  # scaled space
    out = model.quantize(latents)
    raw = (latents * model.scale_factor).detach().permute(0, 2, 3, 1).reshape(-1, 4)
    brute = torch.cdist(raw, codebook.detach()).argmin(dim=1)
    assert torch.equal(out.indices.flatten(), brute)
    codes = codebook.detach()[out.indices].permute(0, 3, 1, 2)  # (B, 4, h, w)
    torch.testing.assert_close(out.latents * model.scale_factor, codes)
    torch.testing.assert_close(out.loss, 1.25 * ((raw - codebook.detach()[brute]) ** 2).mean())
    out.latents.sum().backward()
    torch.testing.assert_close(latents.grad, torch.ones_like(latents))  # straight-through: identity gradient


def test_nearest_codes_chunked_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(50, 4, generator=gen), torch.randn(64, 4, generator=gen)
    brute = ((z[:, None] - codebook[None]) ** 2).sum(-1).argmin(dim=1)
    assert torch.equal(nearest_codes(z, codebook, chunk_size=7), brute)


def test_reconstruction_gradient_reaches_encoder() -> None:
    model = randomise(StageA(**TINY), seed=2).train()
    out = model(torch.rand(2, 3, 16, 24))
    assert out.reconstruction.shape == (2, 3, 16, 24) and out.indices.shape == (2, 4, 6)
    out.reconstruction.square().mean().backward()  # no VQ loss: only the straight-through path reaches the encoder
    assert model.in_block[1].weight.grad.abs().sum() > 0
    assert model.vquantizer.codebook.weight.grad is None or model.vquantizer.codebook.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("height, width", [(16, 16), (40, 56), (12, 8)])
def test_encode_decode_shapes(height: int, width: int) -> None:
    model = StageA(**TINY).eval()
    with torch.no_grad():
        latents = model.encode(torch.rand(2, 3, height, width))
        assert latents.shape == (2, 4, height // 4, width // 4)
        assert model.decode(latents).shape == (2, 3, height, width)


def _loss_and_grads(model: StageA, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model(images)
    loss = (out.reconstruction - images).abs().mean() + out.vq_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _count_saved_tensors(model: StageA, images: torch.Tensor) -> int:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        model(images)
    return len(saved)


def test_grad_checkpointing_same_loss_and_grads() -> None:
    plain = randomise(StageA(**TINY), seed=3).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.grad_checkpointing = True
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    loss_plain, grads_plain = _loss_and_grads(plain, images)
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed, images)
    torch.testing.assert_close(loss_ckpt, loss_plain)
    assert grads_ckpt.keys() == grads_plain.keys() and len(grads_plain) == len(list(plain.parameters()))
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)
    bn = "down_blocks.3.1.running_mean"  # BatchNorm ran once per forward in both (it is not recomputed)
    torch.testing.assert_close(checkpointed.state_dict()[bn], plain.state_dict()[bn])
    assert _count_saved_tensors(checkpointed, images) < _count_saved_tensors(plain, images)


def test_codebook_usage() -> None:
    assert codebook_usage(torch.arange(16).reshape(2, 2, 4), 16) == pytest.approx(
        {"perplexity": 16.0, "fraction_used": 1.0})
    assert codebook_usage(torch.full((2, 3, 3), 5), 16) == pytest.approx({"perplexity": 1.0, "fraction_used": 1 / 16})
    two_codes = torch.tensor([0, 0, 0, 1])  # p = (3/4, 1/4)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert codebook_usage(two_codes, 8) == pytest.approx({"perplexity": expected, "fraction_used": 2 / 8})


def test_discriminator_default_layout() -> None:
    disc = PatchDiscriminator()
    convs = [m for m in disc.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 512, 512]
    assert all(parametrize.is_parametrized(c, "weight") for c in convs)
    assert all(c.stride == (2, 2) and c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, torch.nn.InstanceNorm2d) for m in disc.encoder) == 5
    assert not isinstance(disc.encoder[1], torch.nn.InstanceNorm2d)  # none after the first conv
    with torch.no_grad():
        assert disc(torch.rand(2, 3, 256, 256)).shape == (2, 1, 4, 4)


def test_discriminator_tiny_config_gradients_and_spectral_norm() -> None:
    disc = PatchDiscriminator(channels=(8, 16))
    images = torch.rand(2, 3, 32, 24, requires_grad=True)
    logits = disc(images)
    assert logits.shape == (2, 1, 8, 6)
    logits.mean().backward()
    first = disc.encoder[0]
    assert first.parametrizations.weight.original.grad.abs().sum() > 0
    assert images.grad.abs().sum() > 0
    sigma = torch.linalg.matrix_norm(first.weight.detach().flatten(1), ord=2)
    assert sigma.item() == pytest.approx(1.0, abs=0.05)  # the effective weight has unit spectral norm
