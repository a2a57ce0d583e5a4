"""Weights in and out: released .pt files, diffusers folders, safetensors, our checkpoints; the CLI; errors."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_diffnext import WuerstchenDiffNeXt
from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_prior import WuerstchenPrior
from safetensors.torch import save_file

from test_models import TINY_B, TINY_C, randomise, tame_prior_output
from wuerstchen.models import SemanticCompressor, StageA, StageB, StageC
from wuerstchen.weights import (detect_stage, diffusers_to_released, load_network, read_weights,
                                released_to_diffusers, save_diffusers, save_wuerstchen)

ROOT = Path(__file__).resolve().parents[1]
TINY_A = dict(levels=2, bottleneck_blocks=1, c_hidden=16, c_latent=4, codebook_size=8)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_key_maps_round_trip_and_split_in_q_k_v_order() -> None:
    state = randomise(StageC(**TINY_C)).state_dict()
    theirs = released_to_diffusers(state)
    fused = state["blocks.2.attention.attn.in_proj_weight"]
    assert torch.equal(theirs["blocks.2.attention.to_q.weight"], fused[:32])
    assert torch.equal(theirs["blocks.2.attention.to_v.weight"], fused[64:])
    back = diffusers_to_released(theirs)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    a_state = StageA(**TINY_A).state_dict()
    assert "vquantizer.embedding.weight" in released_to_diffusers(a_state)
    assert [detect_stage(s) for s in (a_state, state, StageB(**TINY_B).state_dict(),
                                      SemanticCompressor().state_dict())] == ["a", "c", "b", "effnet"]


def test_released_pt_files_load_with_their_nesting(tmp_path: Path) -> None:
    prior = randomise(StageC(**TINY_C))
    ema = randomise(StageC(**TINY_C), seed=5)
    torch.save({"state_dict": prior.state_dict(), "ema_state_dict": ema.state_dict()}, tmp_path / "c.pt")
    loaded, config = load_network("c", tmp_path / "c.pt", TINY_C)
    assert same_weights(loaded, ema) and config == TINY_C  # EMA preferred
    loaded, _ = load_network("c", tmp_path / "c.pt", TINY_C, prefer_ema=False)
    assert same_weights(loaded, prior)
    # Stage B file: DiffNeXt under state_dict, the compressor under effnet_state_dict
    stage_b, effnet = randomise(StageB(**TINY_B)), SemanticCompressor.released_v2()
    torch.save({"state_dict": stage_b.state_dict(), "effnet_state_dict": effnet.state_dict()}, tmp_path / "b.pt")
    assert same_weights(load_network("b", tmp_path / "b.pt", TINY_B)[0], stage_b)
    compressor, config = load_network("effnet", tmp_path / "b.pt")
    assert same_weights(compressor, effnet)
    assert config == {"affine": True, "latent_shift": 1.0, "latent_scale": 42.0}  # inferred from the shapes
    vq = randomise(StageA(**TINY_A))
    torch.save({"state_dict": vq.state_dict()}, tmp_path / "vq.pt")
    assert same_weights(load_network("a", tmp_path / "vq.pt", TINY_A)[0], vq)


def test_wrong_stage_missing_keys_and_pickles_are_clear_errors(tmp_path: Path) -> None:
    torch.save({"state_dict": StageB(**TINY_B).state_dict()}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="holds stage b network weights, not stage c"):
        load_network("c", tmp_path / "b.pt", TINY_C)
    state = StageC(**TINY_C).state_dict()
    del state["blocks.2.kv_mapper.1.weight"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"missing \['blocks.2.kv_mapper.1.weight'\]"):
        load_network("c", tmp_path / "partial.pt", TINY_C)
    torch.save(StageC(**TINY_C).state_dict(), tmp_path / "c.pt")
    with pytest.raises(ValueError, match="wrong shape"):
        load_network("c", tmp_path / "c.pt", dict(TINY_C, c=64, nhead=4))
    with pytest.raises(ValueError, match="match no known full-size layout"):
        load_network("c", tmp_path / "c.pt")  # tiny weights, no config given
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": Path("/")}, f)  # a Python object: needs full unpickling
    with pytest.raises(ValueError, match="refusing to load"):
        load_network("c", tmp_path / "evil.pt", TINY_C)


@pytest.mark.parametrize(("stage", "config", "ours_cls", "theirs_cls"), [
    ("c", TINY_C, StageC, WuerstchenPrior), ("b", TINY_B, StageB, WuerstchenDiffNeXt),
    ("a", TINY_A, StageA, PaellaVQModel)])
def test_diffusers_export_loads_with_from_pretrained_and_back(stage, config, ours_cls, theirs_cls,
                                                               tmp_path: Path) -> None:
    ours = randomise(ours_cls(**config))
    save_diffusers(ours.state_dict(), stage, config, tmp_path / "folder")
    theirs = theirs_cls.from_pretrained(tmp_path / "folder")
    # from_pretrained only warns about missing keys: check strict equality ourselves
    expected = released_to_diffusers(ours.state_dict())
    assert theirs.state_dict().keys() == expected.keys()
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in expected.items())
    back, back_config = load_network(stage, tmp_path / "folder")
    assert same_weights(back, ours)
    assert back_config.items() >= config.items()  # diffusers stores the defaults too


def test_diffusers_folder_import_matches_outputs(tmp_path: Path) -> None:
    theirs = randomise(WuerstchenPrior(**TINY_C))
    tame_prior_output(theirs)
    theirs.save_pretrained(tmp_path / "prior")
    ours, config = load_network("c", tmp_path / "prior")
    assert config == dict(TINY_C, dropout=0.1)
    ours.eval()
    x, r, clip = torch.randn(2, 16, 5, 3), torch.rand(2), torch.randn(2, 77, 24)
    with torch.no_grad():
        assert (ours(x, r, clip) - theirs(x, r, clip)).abs().max() <= 1e-5


def test_safetensors_export_carries_the_config(tmp_path: Path) -> None:
    ours = randomise(StageC(**TINY_C))
    save_wuerstchen(ours.state_dict(), "c", TINY_C, tmp_path / "c.safetensors")
    state, config = read_weights(tmp_path / "c.safetensors", "c")
    assert config == TINY_C
    StageC(**config).load_state_dict(state, strict=True)  # takes it as it is
    with pytest.raises(ValueError, match="disagrees"):
        load_network("c", tmp_path / "c.safetensors", dict(TINY_C, depth=3))
    # a bare diffusers-layout safetensors is converted on the way in
    save_file(released_to_diffusers(ours.state_dict()), tmp_path / "bare.safetensors")
    assert same_weights(load_network("c", tmp_path / "bare.safetensors", TINY_C)[0], ours)


def test_lightning_checkpoint_prefers_ema(tmp_path: Path) -> None:
    net, ema = randomise(StageC(**TINY_C)), randomise(StageC(**TINY_C), seed=3)
    checkpoint = {"pytorch-lightning_version": "2.6.0",
                  "state_dict": {f"stage_c.{k}": v for k, v in net.state_dict().items()},
                  "ema": {"stage_c": ema.state_dict()}, "network_configs": {"stage_c": net.config}}
    torch.save(checkpoint, tmp_path / "last.ckpt")
    loaded, config = load_network("c", tmp_path / "last.ckpt")
    assert same_weights(loaded, ema) and config == net.config
    assert same_weights(load_network("c", tmp_path / "last.ckpt", TINY_C, prefer_ema=False)[0], net)


def test_cli_converts_released_to_both_formats(tmp_path: Path) -> None:
    prior = randomise(StageC(**TINY_C))
    torch.save({"state_dict": prior.state_dict()}, tmp_path / "model_v2_stage_c.pt")
    for target, dst in (("wuerstchen", tmp_path / "c.safetensors"), ("diffusers", tmp_path / "c_diffusers")):
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "convert_weights.py"), "--stage", "c", "--src",
             str(tmp_path / "model_v2_stage_c.pt"), "--dst", str(dst), "--to", target, "--config", json.dumps(TINY_C)],
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "parameters" in result.stdout
        assert same_weights(load_network("c", dst)[0], prior)
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "convert_weights.py"), "--stage", "effnet", "--src",
         str(tmp_path / "model_v2_stage_c.pt"), "--dst", str(tmp_path / "x"), "--to", "diffusers"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "error: " in result.stderr and "no state dict for stage effnet" in result.stderr
    assert "Traceback" not in result.stderr


def test_hub_folders_naming_library_wuerstchen_resolve_the_diffusers_classes(tmp_path: Path) -> None:
    """diffusers resolves ``["wuerstchen", "WuerstchenPrior"]`` from model_index.json through our package."""
    import wuerstchen

    assert wuerstchen.WuerstchenPrior is WuerstchenPrior and wuerstchen.PaellaVQModel is PaellaVQModel
    prior = randomise(WuerstchenPrior(**TINY_C))
    prior.save_pretrained(tmp_path / "prior")
    loaded = getattr(wuerstchen, "WuerstchenPrior").from_pretrained(tmp_path / "prior")  # noqa: B009 (as diffusers looks it up)
    assert same_weights(loaded, prior)
    with pytest.raises(AttributeError):
        wuerstchen.NoSuchThing  # noqa: B018
