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

from helpers import TINY_B, TINY_C, randomise, tame_prior_output
from wuerstchen.models import SemanticCompressor, StageA, StageB, StageC
from wuerstchen.weights import (CheckpointFile, checkpoint_info, detect_stage, diffusers_to_released, load_network,
                                network_for, open_checkpoint, read_weights, released_to_diffusers, save_diffusers,
                                save_wuerstchen)

ROOT = Path(__file__).resolve().parents[2]
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


# ------------------------------------------------------------------------------- sharded folders, reads per file
TINY_EFFNET = dict(c_latent=16, backbone="timm", timm_name="test_efficientnet", backbone_weights=None, affine=False)


def _save_sharded_rank(rank: int, world: int, port: int, folder: str, reference: str) -> None:
    """What Lightning's ModelParallelStrategy writes for a Stage C run with EMA: DCP shards of the FSDP2-sharded
    network, its EMA copy (``ema_network``) and the optimizer state, plus ``meta.pt`` from rank 0."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    net, ema = randomise(StageC(**TINY_C)), randomise(StageC(**TINY_C), seed=3)  # the same on both ranks
    config = net.config
    for network in (net, ema):
        fully_shard(network, mesh=mesh)
    optimizer = torch.optim.AdamW(net.parameters())
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    state = {"state_dict": {**{f"stage_c.{k}": v for k, v in net.state_dict().items()},
                            **{f"ema_network.{k}": v for k, v in ema.state_dict().items()}},
             "optimizer_0": get_optimizer_state_dict(net, optimizer)}
    dcp.save(state, checkpoint_id=folder)
    full = {k: v.full_tensor() for k, v in state["state_dict"].items()}  # collective: on every rank
    if rank == 0:
        torch.save({"pytorch-lightning_version": "2.6.6", "global_step": 1, "network_configs": {"stage_c": config},
                    "ema_of": "stage_c"}, Path(folder) / "meta.pt")
        torch.save(full, reference)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A sharded Stage C checkpoint folder written by two gloo ranks, and its full tensors."""
    import socket

    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("sharded")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_save_sharded_rank, args=(2, port, str(root / "step.ckpt"), str(root / "full.pt")), nprocs=2)
    return root / "step.ckpt", torch.load(root / "full.pt", weights_only=True)


def _under(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_folder_reads_only_the_network_opened_once_without_a_temporary_copy(sharded, monkeypatch) -> None:
    import tempfile

    from torch.distributed.checkpoint import FileSystemReader

    from wuerstchen.weights import formats

    folder, full = sharded
    formats.clear_cache()
    read_keys: list[str] = []
    read_data = FileSystemReader.read_data

    def recording_read_data(self, plan, planner):
        read_keys.extend(item.dest_index.fqn for item in plan.items)
        return read_data(self, plan, planner)

    opened = []
    read_metadata = formats.read_dcp_metadata
    monkeypatch.setattr(FileSystemReader, "read_data", recording_read_data)
    monkeypatch.setattr(formats, "read_dcp_metadata", lambda path: opened.append(path) or read_metadata(path))
    made_dirs = []  # a consolidated copy (dcp_to_torch_save) would go to a temporary directory
    mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made_dirs.append(1) or mkdtemp(*a, **k))

    network, config = load_network("c", folder)  # EMA by default
    assert config == dict(TINY_C, dropout=0.1) and _equal(network.state_dict(), _under(full, "ema_network."))
    ema_keys = {f"state_dict.ema_network.{k}" for k in network.state_dict()}
    assert set(read_keys) == ema_keys  # every chunk of the EMA tensors, no optimizer state, not the raw network
    raw, _ = load_network("c", folder, prefer_ema=False)
    assert _equal(raw.state_dict(), _under(full, "stage_c."))
    assert not any(k.startswith("optimizer_") for k in read_keys)
    read_keys.clear()
    network_for("c", folder)  # only shapes: no shard is read
    assert read_keys == []
    consolidated = open_checkpoint(folder).consolidated()
    assert _equal(consolidated["state_dict"], full)  # the network and its EMA copy, as a single-file checkpoint
    assert consolidated["ema_of"] == "stage_c"
    assert consolidated["global_step"] == 1 and "optimizer_states" not in consolidated
    assert checkpoint_info(folder)["ema_of"] == "stage_c"
    assert len(opened) == 1  # one metadata read for all of the above
    assert made_dirs == []


class RunsCode:
    """Unpickling this runs a shell command: what a planted checkpoint file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_folder_with_code_in_its_metadata_or_shards_is_refused(sharded, tmp_path: Path) -> None:
    import shutil

    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "planted.ckpt"
    shutil.copytree(sharded[0], folder)
    payload = pickle.dumps(RunsCode(tmp_path / "ran_plain"))
    pickle.loads(payload)  # the payload does run when unpickled plainly
    assert (tmp_path / "ran_plain").exists()
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(tmp_path / "ran")))
    for load in (lambda: load_network("c", folder), lambda: CheckpointFile(folder).consolidated()):
        with pytest.raises(ValueError, match=r"\.metadata: refusing to load.*(os|posix)\.system"):
            load()
    assert not (tmp_path / "ran").exists()

    # a non-tensor entry among the network's is a pickle in the shards, which DCP reads with full unpickling
    planted = tmp_path / "bytes.ckpt"
    dcp.save({"state_dict": {"stage_c.evil": RunsCode(tmp_path / "ran"),
                             **{f"stage_c.{k}": v for k, v in StageC(**TINY_C).state_dict().items()}}},
             checkpoint_id=planted, no_dist=True)
    torch.save({"pytorch-lightning_version": "2.6.6"}, planted / "meta.pt")
    with pytest.raises(ValueError, match=r"\['state_dict.stage_c.evil'\] are not tensors; refusing"):
        load_network("c", planted)
    assert not (tmp_path / "ran").exists()


def test_one_checkpoint_file_is_read_once_for_all_its_networks(tmp_path: Path, monkeypatch) -> None:
    from wuerstchen.weights import formats

    def checkpoint(seed: int) -> dict:
        nets = {"stage_b": randomise(StageB(**TINY_B), seed), "stage_a": randomise(StageA(**TINY_A), seed),
                "effnet": SemanticCompressor(**TINY_EFFNET)}
        return {"pytorch-lightning_version": "2.6.6", "global_step": seed, "network_configs": {
                    k: v.config for k, v in nets.items() if hasattr(v, "config")},
                "state_dict": {f"{name}.{k}": v for name, net in nets.items() for k, v in net.state_dict().items()}}

    ckpt = tmp_path / "stage_b.ckpt"
    first = checkpoint(1)
    torch.save(first, ckpt)
    formats.clear_cache()
    loads = []
    torch_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or torch_load(*a, **k))
    # what a Stage C run does with its stage_b_ckpt: the compressor, Stage B and Stage A, and the checkpoint info
    for stage, attribute in (("effnet", "effnet"), ("b", "stage_b"), ("a", "stage_a")):
        network, _ = load_network(stage, ckpt, prefer_ema=False)
        assert _equal(network.state_dict(), _under(first["state_dict"], f"{attribute}."))
    assert checkpoint_info(ckpt)["global_step"] == 1
    assert len(loads) == 1
    state, _ = read_weights(ckpt, "a")
    state.clear()  # what a caller does with its state dict leaves the cached checkpoint alone
    assert _equal(read_weights(ckpt, "a")[0], _under(first["state_dict"], "stage_a."))
    assert len(loads) == 1

    second = checkpoint(2)
    torch.save(second, ckpt)  # a new checkpoint under the same name is read again
    network, _ = load_network("a", ckpt)
    assert _equal(network.state_dict(), _under(second["state_dict"], "stage_a.")) and len(loads) == 2
