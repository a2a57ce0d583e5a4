"""Stage A's latent scale: the measurement against closed forms and torch over the concatenated latents (also over
two gloo ranks), a run's final checkpoint recording it (through wuerstchen.train) for Stage B to use, the resume
that crosses the measuring step staying bitwise, the command that rewrites a checkpoint, and caches written at
another scale refused."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import common, losses_by_step, output, run, train_here

from wuerstchen.data import ImageTransform, WebImageTextDataset, to_model_inputs
from wuerstchen.data.cached import STAGE_A, check_cache_matches, fingerprint
from wuerstchen.models import StageA
from wuerstchen.training.latent_scale import (MeasurementFailed, check_rewritable, latent_moments,
                                              write_scale_factor)
from wuerstchen.weights import load_network, save_wuerstchen
from wuerstchen.weights.loaders import pretrained

TINY = dict(levels=2, bottleneck_blocks=1, c_hidden=16, c_latent=4, codebook_size=64, scale_factor=1.0)
NUM_IMAGES = 24  # what the training runs measure over: the first 24 centre crops of the training shards
SIZE = 64


def tiny_stage_a(seed: int = 0) -> StageA:
    torch.manual_seed(seed)
    return StageA(**TINY)


def image_batches(sizes: list[int], seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 3, 32, 32, generator=generator) for n in sizes]


# -- the measurement --------------------------------------------------------------------------------------------
def test_moments_of_a_constant_encoder_have_their_closed_form() -> None:
    stage_a = tiny_stage_a()
    norm = stage_a.down_blocks[-1][1]  # the encoder's closing BatchNorm: weight 0 makes its output the bias
    with torch.no_grad():
        norm.weight.zero_()
        norm.bias.copy_(torch.tensor([1.0, -1.0, 2.0, 0.0]))
    moments = latent_moments(stage_a, image_batches([3, 5]), num_images=8)
    assert moments.num_images == 8 and moments.count == 8 * 4 * 8 * 8
    assert moments.mean == pytest.approx(0.5, abs=1e-12)
    assert moments.rms == pytest.approx(math.sqrt(1.5), abs=1e-12)  # sqrt((1 + 1 + 4 + 0) / 4)
    assert moments.std == pytest.approx(math.sqrt(1.25), abs=1e-12)  # sqrt(1.5 - 0.5^2)
    assert moments.scale_factor == moments.rms  # the second moment is what the SNR sees, not the spread


def test_moments_equal_torch_over_the_concatenated_latents_in_eval_mode() -> None:
    stage_a = tiny_stage_a().train()
    with torch.no_grad():  # running statistics unlike a batch's, so train-mode BatchNorm would give other values
        norm = stage_a.down_blocks[-1][1]
        norm.running_mean.fill_(0.3)
        norm.running_var.fill_(4.0)
    batches = image_batches([4, 7, 6])
    moments = latent_moments(stage_a, batches, num_images=13)  # cuts the last batch after 2 images
    assert stage_a.training  # left as it was found
    with torch.no_grad():
        z = stage_a.eval().encode_unscaled(torch.cat(batches)[:13]).double()
    assert moments.num_images == 13 and moments.count == z.numel()
    assert moments.mean == pytest.approx(z.mean().item(), rel=1e-9)
    assert moments.std == pytest.approx(z.std(correction=0).item(), rel=1e-9)
    assert moments.rms == pytest.approx(z.square().mean().sqrt().item(), rel=1e-9)
    assert abs(moments.mean) > 0.05 and moments.rms > 1.01 * moments.std  # the two choices differ here


def _rank_moments(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        batches = image_batches([4, 4, 3])
        batches = batches[:2] if rank == 0 else batches[2:]
        moments = latent_moments(tiny_stage_a(), batches, num_images=8)
        torch.save(tuple(moments), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_moments_combine_over_ranks(tmp_path: Path) -> None:
    """Rank 0 measures images 0-7, rank 1 images 8-10: both get the moments of all 11."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_moments, args=(port, str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert results[0] == results[1]
    single = latent_moments(tiny_stage_a(), image_batches([4, 4, 3]), num_images=11)
    assert results[0][:2] == tuple(single)[:2] == (11, 11 * 4 * 8 * 8)
    assert results[0][2:] == pytest.approx(tuple(single)[2:], rel=1e-9)


def test_a_failed_measurement_raises_alike_on_every_rank() -> None:
    """A loader that dies mid-measurement (a worker killed by a bad sample) raises MeasurementFailed after the
    collective, so no rank hangs and the run's module keeps the configured scale instead of losing its last step."""
    def dying():
        yield image_batches([4])[0]
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Segmentation fault.")

    with pytest.raises(MeasurementFailed, match="failed on 1 rank.*Segmentation fault"):
        latent_moments(tiny_stage_a(), dying(), num_images=8)
    with pytest.raises(MeasurementFailed, match="no image"):
        latent_moments(tiny_stage_a(), [], num_images=8)


# -- a Stage A run records it; Stage B and caches use it ----------------------------------------------------------
def stage_a_run(shards: Path, run_dir: Path, steps: int, *extra: str) -> str:
    """A tiny Stage A run in this process; what it logged."""
    return train_here("experiment=demo_stage_a", *common(shards, run_dir, steps, every=100),
                      "stage.stage_a.c_hidden=16", "stage.stage_a.codebook_size=64", "data.batch_size=4",
                      "data.batches_per_epoch=5", "callbacks.preview=null", "data.val_urls=null",
                      "stage.ema={decay: 0.5}", f"stage.latent_scale_images={NUM_IMAGES}", *extra)[1]


def first_images(shards: Path, num_images: int) -> torch.Tensor:
    """The first centre crops of the training shards, read here with the data pipeline alone."""
    dataset = WebImageTextDataset(str(shards / "train"), num_images, ImageTransform(SIZE, outputs=("images",),
                                  random_crop=False), resample=False, shuffle_buffer=0, require_caption=False)
    return to_model_inputs(next(iter(dataset)))["images"]  # (N, 3, 64, 64)


@pytest.fixture(scope="module")
def stage_a_runs(shards: Path, tmp_path_factory) -> dict[str, Path]:
    """4 steps in one go; 2 steps, then resumed to 4 (its first run measures at its step 2)."""
    root = tmp_path_factory.mktemp("latent_scale")
    runs = {"full": root / "full", "resumed": root / "resumed"}
    stage_a_run(shards, runs["full"], 4)
    first = stage_a_run(shards, runs["resumed"], 2)
    assert "Stage A latent scale over 24 images" in first
    stage_a_run(shards, runs["resumed"], 4)
    return runs


def test_final_checkpoint_records_the_measured_scale(stage_a_runs: dict[str, Path], shards: Path) -> None:
    ckpt = stage_a_runs["full"] / "checkpoints" / "last.ckpt"
    recorded = torch.load(ckpt, weights_only=True)["network_configs"]["stage_a"]["scale_factor"]
    assert recorded not in (1.0, 0.3764)  # the tiny config's and the released value
    # independently: the saved weights over the same images in one batch (hence rel=1e-5), the raw encoder output
    images = first_images(shards, NUM_IMAGES)
    rms = {}
    for ema in (True, False):
        stage_a, _ = load_network("a", ckpt, prefer_ema=ema)
        assert stage_a.scale_factor == recorded
        with torch.no_grad():
            rms[ema] = stage_a.eval().encode_unscaled(images).double().square().mean().sqrt().item()
    assert recorded == pytest.approx(rms[True], rel=1e-5)  # the EMA weights: what load_network loads by default
    assert recorded != pytest.approx(rms[False], rel=1e-3)


def test_stage_b_trains_on_unit_second_moment_latents(stage_a_runs: dict[str, Path], shards: Path) -> None:
    ckpt = stage_a_runs["full"] / "checkpoints" / "last.ckpt"
    stage_a = pretrained("a", str(ckpt), "stage_a_ckpt")  # as Stage B's stage_a node loads it
    images = first_images(shards, NUM_IMAGES)
    with torch.no_grad():
        x0 = stage_a.encode(images).double()  # Stage B's x0
        raw = stage_a.encode_unscaled(images).double()
    assert x0.square().mean().item() == pytest.approx(1.0, abs=1e-4)
    assert abs(raw.square().mean().item() - 1.0) > 0.05  # the configured scale 1.0 would have been off


def test_measuring_at_a_runs_end_keeps_its_continuation_bitwise(stage_a_runs: dict[str, Path]) -> None:
    full, resumed = stage_a_runs["full"], stage_a_runs["resumed"]
    assert losses_by_step(resumed) == losses_by_step(full) and sorted(losses_by_step(full)) == [0, 1, 2, 3]
    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["network_configs"] == b["network_configs"]  # the same measured scale, remeasured at step 4
    mid = torch.load(resumed / "checkpoints" / "step=0000002.ckpt", weights_only=True)
    assert mid["network_configs"]["stage_a"]["scale_factor"] != a["network_configs"]["stage_a"]["scale_factor"]


def test_the_command_rewrites_a_checkpoint(stage_a_runs: dict[str, Path], shards: Path, tmp_path: Path) -> None:
    src = stage_a_runs["resumed"] / "checkpoints" / "step=0000002.ckpt"
    before = src.read_bytes()
    half = write_scale_factor(src, 0.5, tmp_path / "half.ckpt")
    assert load_network("a", half)[0].scale_factor == 0.5 and src.read_bytes() == before
    result = run("measure_latent_scale.py", f"ckpt={half}", "data=synthetic", f"data.urls={shards / 'train'}",
                 f"num_images={NUM_IMAGES}", "batch_size=5", "data.num_workers=0")
    stage_a, _ = load_network("a", tmp_path / "half.ckpt")  # rewritten in place
    assert f"scale_factor 0.5 -> {stage_a.scale_factor:.6g}" in output(result)
    with torch.no_grad():
        raw = stage_a.eval().encode_unscaled(first_images(shards, NUM_IMAGES)).double()
    assert stage_a.scale_factor == pytest.approx(raw.square().mean().sqrt().item(), rel=1e-5)
    rewritten = torch.load(tmp_path / "half.ckpt", weights_only=True)
    original = torch.load(src, weights_only=True)
    assert rewritten["optimizer_states"][0]["state"].keys() == original["optimizer_states"][0]["state"].keys()
    assert all(torch.equal(rewritten["state_dict"][k], v) for k, v in original["state_dict"].items())
    assert not list(tmp_path.glob(".*partial"))
    # a released-style .pt only becomes our export; a Stage B checkpoint keeps the scale its Stage B learnt
    torch.save({"state_dict": stage_a.state_dict()}, tmp_path / "released.pt")
    with pytest.raises(ValueError, match="out=FILE.safetensors"):
        check_rewritable(tmp_path / "released.pt", None)
    torch.save({**rewritten, "network_configs": {**rewritten["network_configs"], "stage_b": {}}}, tmp_path / "b.ckpt")
    with pytest.raises(ValueError, match="Stage B checkpoint"):
        check_rewritable(tmp_path / "b.ckpt", tmp_path / "b2.ckpt")
    save_wuerstchen(stage_a.state_dict(), "a", stage_a.config, tmp_path / "a.safetensors")  # our export: in place
    assert write_scale_factor(tmp_path / "a.safetensors", 0.25) == tmp_path / "a.safetensors"
    assert load_network("a", tmp_path / "a.safetensors")[0].scale_factor == 0.25


def test_a_cache_written_at_another_scale_is_refused(stage_a_runs: dict[str, Path], tmp_path: Path) -> None:
    src = stage_a_runs["full"] / "checkpoints" / "last.ckpt"
    cached_with = pretrained("a", str(write_scale_factor(src, 0.5, tmp_path / "old.ckpt")), "stage_a_ckpt")
    ours = pretrained("a", str(src), "stage_a_ckpt")
    assert fingerprint(cached_with) == fingerprint(ours)  # same tensors: only the recorded scale tells them apart
    info = {"arrays": {STAGE_A: ""}, "stage_a_sha1": fingerprint(cached_with),
            "stage_a_config": json.loads(json.dumps(cached_with.config))}  # as cache_latents.py writes it
    with pytest.raises(ValueError, match="scale_factor=0.5"):
        check_cache_matches(info, None, (STAGE_A,), stage_a=ours)
    info["stage_a_config"] = json.loads(json.dumps(ours.config))
    check_cache_matches(info, None, (STAGE_A,), stage_a=ours)
