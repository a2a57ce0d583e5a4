"""Stage B, Stage C, the compressor and the text encoder: parity with diffusers, released layouts, options."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_diffnext import WuerstchenDiffNeXt
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_prior import WuerstchenPrior

from wuerstchen.models import SemanticCompressor, StageB, StageC
from wuerstchen.models.text_encoder import TextEncoder, text_state_dict
from wuerstchen.weights import diffusers_to_released, released_to_diffusers

TINY_C = dict(c_in=16, c=32, c_cond=24, c_r=8, depth=2, nhead=4)
TINY_B = dict(c_hidden=[16, 32], nhead=[-1, 4], blocks=[1, 2], level_config=["CT", "CTA"],
              inject_effnet=[False, True], effnet_embd=16, clip_embd=20, c_cond=24, c_r=8)


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random parameters everywhere: zero-initialised layers would hide wiring errors."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return module.eval()


def tame_prior_output(module: torch.nn.Module) -> None:
    """Keep |1 - B| away from 0: the A/B parameterisation divides by it and would amplify rounding into noise."""
    with torch.no_grad():
        module.out[1].weight.mul_(0.1)
        module.out[1].bias.zero_()


@pytest.mark.parametrize(("batch", "height", "width"), [(1, 6, 6), (3, 5, 7), (2, 8, 3)])
def test_stage_c_matches_diffusers_both_ways(batch: int, height: int, width: int) -> None:
    theirs = randomise(WuerstchenPrior(**TINY_C))
    tame_prior_output(theirs)
    ours = StageC(**TINY_C).eval()
    ours.load_state_dict(diffusers_to_released(theirs.state_dict()), strict=True)
    x, r, clip = torch.randn(batch, 16, height, width), torch.rand(batch), torch.randn(batch, 77, 24)
    with torch.no_grad():
        assert (ours(x, r, clip) - theirs(x, r, clip)).abs().max() <= 1e-5
    # the reverse direction: our random weights into diffusers
    ours = randomise(StageC(**TINY_C), seed=1)
    tame_prior_output(ours)
    theirs = WuerstchenPrior(**TINY_C).eval()
    theirs.load_state_dict(released_to_diffusers(ours.state_dict()), strict=True)
    with torch.no_grad():
        assert (ours(x, r, clip) - theirs(x, r, clip)).abs().max() <= 1e-5


@pytest.mark.parametrize(("batch", "height", "width"), [(1, 8, 8), (3, 12, 20)])
def test_stage_b_matches_diffusers_both_ways(batch: int, height: int, width: int) -> None:
    theirs = randomise(WuerstchenDiffNeXt(**TINY_B))
    ours = StageB(**TINY_B).eval()
    ours.load_state_dict(diffusers_to_released(theirs.state_dict()), strict=True)
    x, r = torch.randn(batch, 4, height, width), torch.rand(batch)
    effnet, clip = torch.randn(batch, 16, 3, 5), torch.randn(batch, 77, 20)
    with torch.no_grad():
        expected = theirs(x, r, effnet, clip)
        assert (ours(x, r, effnet, clip) - expected).abs().max() <= 1e-5
        assert expected.abs().max() > 1.0  # a real signal, not a zeroed output
    ours = randomise(StageB(**TINY_B), seed=1)
    theirs = WuerstchenDiffNeXt(**TINY_B).eval()
    theirs.load_state_dict(released_to_diffusers(ours.state_dict()), strict=True)
    with torch.no_grad():
        assert (ours(x, r, effnet, clip) - theirs(x, r, effnet, clip)).abs().max() <= 1e-5


@pytest.mark.parametrize(("builder", "config", "params", "keys", "diffusers_keys"), [
    (StageC, {}, 347_037_472, 264, None),
    (StageC, dict(c=1536, depth=32, nhead=24, c_cond=1280), 993_636_896, 520, 648),
    (StageB, {}, 1_055_365_280, 814, 990),
])
def test_full_size_layouts(builder, config: dict, params: int, keys: int, diffusers_keys: int | None) -> None:
    with torch.device("meta"):
        ours = builder(**config)
    assert sum(p.numel() for p in ours.parameters()) == params
    assert len(ours.state_dict()) == keys
    if diffusers_keys is not None:
        with torch.device("meta"):
            theirs = (WuerstchenPrior if builder is StageC else WuerstchenDiffNeXt)(**config)
        converted = released_to_diffusers(ours.state_dict())
        assert len(converted) == diffusers_keys
        assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape)
                                                                      for k, v in theirs.state_dict().items()}


def test_stage_c_starts_as_identity_and_keys_follow_the_release() -> None:
    model = StageC(**TINY_C).eval()
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        # zero-initialised output conv: A = B = 0, so eps_hat = x_t / (1 + 1e-5)
        assert torch.allclose(model(x, torch.rand(2), torch.randn(2, 77, 24)), x / (1 + 1e-5))
    keys = model.state_dict().keys()
    for key in ["projection.weight", "cond_mapper.0.weight", "cond_mapper.2.weight", "blocks.0.depthwise.weight",
                "blocks.0.channelwise.2.gamma", "blocks.0.channelwise.4.weight", "blocks.1.mapper.weight",
                "blocks.2.attention.attn.in_proj_weight", "blocks.2.attention.attn.out_proj.weight",
                "blocks.2.kv_mapper.1.weight", "out.1.weight"]:
        assert key in keys


def test_stage_c_input_and_text_mappers_start_from_the_official_normal_init() -> None:
    """The official Prior draws projection and both cond_mapper linears from N(0, 0.02); Xavier would give these
    shapes a std of 0.06-0.12."""
    torch.manual_seed(0)
    model = StageC(c_in=16, c=256, c_cond=64, c_r=8, depth=1, nhead=4)
    for layer in (model.projection, model.cond_mapper[0], model.cond_mapper[2]):
        weight = layer.weight.detach()
        assert abs(weight.std().item() - 0.02) < 0.001 and abs(weight.mean().item()) < 0.001
        assert torch.count_nonzero(layer.bias) == 0
    xavier = model.blocks[0].channelwise[0].weight.detach()  # still Xavier-uniform: bounded by sqrt(6 / fan sum)
    assert xavier.abs().max().item() <= (6 / sum(xavier.shape[:2])) ** 0.5 and xavier.std().item() > 0.03


@pytest.mark.parametrize("builder", ["b", "c"])
def test_activation_checkpointing_gives_the_same_gradients(builder: str) -> None:
    torch.manual_seed(0)
    if builder == "c":
        model = randomise(StageC(**TINY_C, dropout=0.0))
        inputs = (torch.randn(2, 16, 4, 6), torch.rand(2), torch.randn(2, 77, 24))
    else:
        model = randomise(StageB(**TINY_B, dropout=0.0))
        inputs = (torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 16, 3, 3), torch.randn(2, 77, 20))
    model.train()
    grads = []
    for checkpointing in (False, True):
        model.grad_checkpointing = checkpointing
        model.zero_grad()
        model(*inputs).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        assert torch.allclose(plain, checkpointed, atol=1e-6)


def test_compressor_layouts_and_latent_maps() -> None:
    released = SemanticCompressor.released_v2()
    assert len(released.state_dict()) == 786
    assert sum(p.numel() for p in released.backbone.parameters()) == 20_177_488
    assert "backbone.0.0.weight" in released.state_dict() and "mapper.1.weight" in released.state_dict()
    released.eval()
    images = torch.randn(2, 3, 192, 256)
    with torch.no_grad():
        latent = released(images)
    assert latent.shape == (2, 16, 6, 8)
    assert torch.allclose(released.to_prior(latent), (latent + 1) / 42)
    assert torch.allclose(released.from_prior(released.to_prior(latent)), latent, atol=1e-5)
    scratch = SemanticCompressor()
    assert "mapper.1.weight" not in scratch.state_dict()  # non-affine BN
    assert torch.equal(scratch.to_prior(latent), latent)


def test_compressor_timm_backbone_gives_the_same_map_size() -> None:
    model = SemanticCompressor(backbone="timm").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 160)).shape == (1, 16, 3, 5)
    with pytest.raises(ValueError, match="backbone"):
        SemanticCompressor(backbone="keras")


def test_compressor_loads_a_local_torchvision_weight_file(tmp_path) -> None:
    import torchvision

    classifier = torchvision.models.efficientnet_v2_s(weights=None)
    torch.save(classifier.state_dict(), tmp_path / "effnet.pth")
    model = SemanticCompressor(backbone_weights=str(tmp_path / "effnet.pth"))
    assert torch.equal(model.backbone[0][0].weight, classifier.features[0][0].weight)


def test_text_encoder_states_match_open_clip_and_padding_mask() -> None:
    import open_clip

    reference = open_clip.create_model("wuerstchen-tiny-text").eval()
    encoder = TextEncoder("wuerstchen-tiny-text", padding_mask=False, pad_token="zero")  # EOT: test_text_encoder.py
    encoder.text.load_state_dict(text_state_dict(reference.state_dict()), strict=True)
    tokens = encoder.tokenize(["a red circle in the top left", "hello"])
    with torch.no_grad():
        expected = reference.ln_final(reference.transformer(
            reference.token_embedding(tokens) + reference.positional_embedding, attn_mask=reference.attn_mask))
    states = encoder.encode_tokens(tokens)
    assert states.shape == (2, 77, 32)
    assert torch.allclose(states, expected, atol=1e-6)
    # with the padding mask, real tokens are unchanged (they never see pads) and pad positions change
    encoder.padding_mask = True
    masked = encoder.encode_tokens(tokens)
    real = int((tokens[1] != 0).sum())
    assert torch.allclose(masked[1, :real], states[1, :real], atol=1e-6)
    assert (masked[1, real:] - states[1, real:]).abs().max() > 1e-3
    # frozen: no gradients, and no train mode whatever a trainer asks for
    encoder.train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


def test_text_encoder_loads_a_local_open_clip_checkpoint(tmp_path) -> None:
    import open_clip

    reference = open_clip.create_model("wuerstchen-tiny-text")
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "tiny.pt")
    encoder = TextEncoder("wuerstchen-tiny-text", pretrained=str(tmp_path / "tiny.pt"))
    assert torch.equal(encoder.text.token_embedding.weight, reference.token_embedding.weight)
    with pytest.raises(FileNotFoundError, match="not a pretrained tag"):
        TextEncoder("wuerstchen-tiny-text", pretrained="no-such-tag")
    with torch.device("meta"):
        assert TextEncoder("ViT-bigG-14").width == 1280


def test_importing_the_package_pulls_in_neither_lightning_nor_diffusers() -> None:
    code = ("import sys, wuerstchen, wuerstchen.models, wuerstchen.data, wuerstchen.diffusion, wuerstchen.weights; "
            "print(sorted(m for m in ('lightning', 'diffusers', 'hydra', 'open_clip') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
