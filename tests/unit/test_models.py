"""Stage B, Stage C, the compressor and the text encoder: parity with diffusers, released layouts, options."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_diffnext import WuerstchenDiffNeXt
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_prior import WuerstchenPrior

from wuerstchen.models import SemanticCompressor, StageB, StageC
from wuerstchen.models.text_encoder import TextEncoder, text_state_dict
from wuerstchen.weights import diffusers_to_released, released_to_diffusers

from helpers import TINY_B, TINY_C, randomise, tame_prior_output

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", [5, 16])  # 3 x 5 x 5 x 64 keeps autograd's backward, 3 x 16 x 16 x 64 the written one
def test_grn_forward_is_diffusers_to_the_bit_and_its_backward_autograd_s_finite_at_all_zero_channels(
        dtype: torch.dtype, side: int) -> None:
    """Our GRN writes its backward out on large maps; the forward must stay the reference's ops (the parity tests
    above allow a few ulp of Stage B's output) and the gradient finite where a channel is all zero (exact zeros
    after GELU), where a square root of summed squares has an infinite gradient (it once stopped the CPU demo on NaN
    gradients)."""
    from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_common import GlobalResponseNorm as Theirs

    from wuerstchen.models.common import GRN_WRITTEN_BACKWARD_MIN_NUMEL, GlobalResponseNorm

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, side, side, 64, generator=generator)
    assert (x.numel() >= GRN_WRITTEN_BACKWARD_MIN_NUMEL) == (side == 16)
    x[0, :, :, :5] = 0  # all-zero channels of one sample
    x[1] = 0  # and a sample that is zero everywhere (every norm, and so their mean, is zero)
    x = x.to(dtype)
    grad = torch.randn(x.shape, generator=generator)
    ours, theirs = GlobalResponseNorm(64), Theirs(64)
    with torch.no_grad():
        for module in (ours, theirs):
            module.gamma.copy_(torch.randn(ours.gamma.shape, generator=torch.Generator().manual_seed(1)))
            module.beta.copy_(torch.randn(ours.beta.shape, generator=torch.Generator().manual_seed(2)))
    results = []
    for module in (ours, theirs):
        inputs = x.clone().requires_grad_()
        output = module(inputs)
        output.backward(grad.to(output.dtype))
        results.append((output.detach(), inputs.grad, module.gamma.grad, module.beta.grad))
    (out, *grads), (expected, *expected_grads) = results
    assert out.dtype == expected.dtype and torch.equal(out, expected)
    for ours_grad, their_grad in zip(grads, expected_grads):
        assert ours_grad.dtype == their_grad.dtype and torch.isfinite(ours_grad).all()
        tolerance = (1e-5 if dtype == torch.float32 else 1e-2) * their_grad.float().abs().max()
        assert (ours_grad.float() - their_grad.float()).abs().max() <= tolerance
    assert grads[0][0, :, :, :5].abs().max() > 0  # the direct path x -> out still reaches zero channels


@pytest.mark.parametrize("stage", ["b", "c"])
def test_training_gradients_match_diffusers(stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train mode at dropout 0 (the same computation): every parameter's gradient agrees with diffusers', with every
    GRN on its written-out backward (these maps are below the size that takes it by default)."""
    monkeypatch.setattr("wuerstchen.models.common.GRN_WRITTEN_BACKWARD_MIN_NUMEL", 0)
    torch.manual_seed(0)
    if stage == "c":
        ours = randomise(StageC(**TINY_C, dropout=0.0), seed=3).train()
        tame_prior_output(ours)
        inputs = torch.randn(2, 16, 5, 6), torch.rand(2), torch.randn(2, 77, 24)
        theirs = WuerstchenPrior(**TINY_C, dropout=0.0).train()
    else:
        ours = randomise(StageB(**TINY_B, dropout=0.0), seed=3).train()
        inputs = torch.randn(2, 4, 8, 12), torch.rand(2), torch.randn(2, 16, 3, 5), torch.randn(2, 77, 20)
        theirs = WuerstchenDiffNeXt(**TINY_B, dropout=0.0).train()
    theirs.load_state_dict(released_to_diffusers(ours.state_dict()), strict=True)
    for model in (ours, theirs):
        model(*inputs).square().mean().backward()
    ours_grads = released_to_diffusers({name: p.grad for name, p in ours.named_parameters()})
    their_grads = dict(theirs.named_parameters())
    assert ours_grads.keys() == their_grads.keys()
    for name, grad in ours_grads.items():
        expected = their_grads[name].grad
        assert (grad - expected).abs().max() <= 1e-4 * expected.abs().max() + 1e-7, name


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


TINY_A = dict(levels=2, bottleneck_blocks=2, c_hidden=16, c_latent=4, codebook_size=8)
# what each network's root holds besides its units (the stems, heads and samplers its fsdp_units() names)
ROOTS = {
    "a": ("in_block.", "down_blocks.1.", "down_blocks.3.", "vquantizer.", "up_blocks.0.", "up_blocks.3.", "out_block."),
    "b": ("clip_mapper.", "effnet_mappers.", "embedding.", "down_blocks.1.0.", "up_blocks.0.6.", "clf."),
    "c": ("projection.", "cond_mapper.", "out."),
    "effnet": ("backbone.model.conv_stem.", "backbone.model.bn1.", "backbone.model.conv_head.", "backbone.model.bn2.",
               "mapper."),
    "released_effnet": ("backbone.0.", "backbone.7.", "mapper."),
    "discriminator": ("to_logits.",),
}


def tiny_network(name: str) -> torch.nn.Module:
    from wuerstchen.models import PatchDiscriminator, StageA

    if name == "released_effnet":
        with torch.device("meta"):
            return SemanticCompressor.released_v2()
    return {"a": lambda: StageA(**TINY_A), "b": lambda: StageB(**TINY_B, dropout=0.0),
            "c": lambda: StageC(**TINY_C, dropout=0.0),
            "effnet": lambda: SemanticCompressor(backbone="timm", timm_name="test_efficientnet"),
            "discriminator": lambda: PatchDiscriminator(channels=(8, 16, 32))}[name]()


@pytest.mark.parametrize("name", list(ROOTS))
def test_units_hold_every_parameter_once_and_the_root_only_its_stems(name: str) -> None:
    network = tiny_network(name)
    units = network.fsdp_units()
    owner = {}
    for index, unit in enumerate(units):
        assert unit and all(isinstance(m, torch.nn.Module) for m in unit)
        for module in unit:
            for p in module.parameters():
                assert id(p) not in owner, f"a parameter of unit {index} is also in unit {owner[id(p)]}"
                owner[id(p)] = index
    root = [n for n, p in network.named_parameters() if id(p) not in owner]
    assert all(n.startswith(ROOTS[name]) for n in root), [n for n in root if not n.startswith(ROOTS[name])]
    assert {prefix for prefix in ROOTS[name] if any(n.startswith(prefix) for n in root)} == set(ROOTS[name])
    in_units = sum(p.numel() for p in network.parameters() if id(p) in owner)
    assert in_units > 0.6 * sum(p.numel() for p in network.parameters())  # the units carry most of the weights


def test_stage_c_units_are_the_res_timestep_attn_triples_in_the_released_key_layout() -> None:
    from wuerstchen.models.common import AttnBlock, ResBlock, TimestepBlock

    model = StageC(**TINY_C)
    units = model.fsdp_units()
    assert len(units) == TINY_C["depth"]
    assert all([type(m) for m in unit] == [ResBlock, TimestepBlock, AttnBlock] for unit in units)
    assert [m for unit in units for m in unit] == list(model.blocks)  # flat in `blocks`: keys blocks.0 .. blocks.5
    b_units = StageB(**TINY_B).fsdp_units()
    assert [len(u) for u in b_units] == [2, 3, 3, 3, 3, 2]  # CT x1, CTA x2 down; CTA x2, CT x1 up


def _forward_loss(name: str, model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    if name == "a":
        output = model(torch.rand(2, 3, 16, 16))
        return output.reconstruction.square().mean() + output.vq_loss
    if name == "b":
        inputs = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 16, 3, 3), torch.randn(2, 77, 20)
        return model(*inputs).square().mean()
    return model(torch.randn(2, 16, 4, 6), torch.rand(2), torch.randn(2, 77, 24)).square().mean()


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_activation_checkpointing_recomputes_exactly_the_units_with_bitwise_equal_loss_and_gradients(name: str) -> None:
    """Every module of a unit runs twice (forward, then recomputed in the backward), every root module once."""
    from wuerstchen.training.distributed import parallelize

    plain = randomise(tiny_network(name)).train()
    checkpointed = copy.deepcopy(plain)
    assert not checkpointed.grad_checkpointing
    units = parallelize(checkpointed, activation_checkpointing=True)  # no mesh: checkpointing alone
    assert checkpointed.grad_checkpointing
    calls: dict[str, int] = {}
    order: list[int] = []
    for index, unit in enumerate(units):
        unit[0].register_forward_pre_hook(lambda m, i, index=index: order.append(index))
    for module_name, module in checkpointed.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            module.register_forward_hook(lambda m, i, o, key=module_name: calls.__setitem__(key, calls.get(key, 0) + 1))
    results = []
    for model in (plain, checkpointed):
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):  # recompute whole units, to count the calls
            loss = _forward_loss(name, model)
            loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    assert torch.equal(loss_ckpt, loss_plain)
    assert grads_ckpt.keys() == grads_plain.keys()
    for key, grad in grads_plain.items():
        assert grad is not None and torch.equal(grads_ckpt[key], grad), key
    in_units = {id(m) for unit in units for block in unit for m in block.modules()}
    names = dict(checkpointed.named_modules())
    wrong = {key: count for key, count in calls.items() if count != (2 if id(names[key]) in in_units else 1)}
    assert calls and not wrong, wrong
    assert order[:len(units)] == list(range(len(units)))  # fsdp_units() lists the units in forward order


def test_parallelize_leaves_networks_without_checkpointing_as_they_are() -> None:
    from wuerstchen.training.distributed import parallelize

    effnet = tiny_network("effnet")
    assert len(parallelize(effnet, activation_checkpointing=True)) == 5 and not hasattr(effnet, "grad_checkpointing")


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
