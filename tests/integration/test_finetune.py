"""Stage C fine-tuning at a new resolution (experiment=*stage_c_finetune): from an export of ours and from a released
.pt, the architecture taken from the weights, the latent size the 0.75 rule gives, sampling at the new size."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import SIZE, common, run, stage_c_inputs, train_here, write_shapes
from wuerstchen.diffusion import diffusion_loss
from wuerstchen.models import StageC
from wuerstchen.models.text_encoder import TextEncoder, text_encoder_for
from wuerstchen.training import StageCModule
from wuerstchen.weights import checkpoint_info, infer_config, load_network, network_for

NEW = 2 * SIZE  # the fine-tuning output side: 128 px -> 192 px compressor view -> 6x6 latents (demo scale 1.5)


@pytest.fixture(scope="module")
def shards_new(tmp_path_factory) -> Path:
    """The synthetic shapes rendered at the new size (same content as the training shards, twice the pixels)."""
    return write_shapes(tmp_path_factory.mktemp("shapes_new"), NEW, train=200, val=16, shard_size=100)


def finetune(shards: Path, run_dir: Path, init_from: Path, stage_b: Path, *extra: str, steps: int = 30) -> str:
    """The fine-tuning run in this process; what it logged."""
    overrides = [o for o in common(shards, run_dir, steps, every=steps) if not o.startswith("data.image_size")]
    return train_here("experiment=demo_stage_c_finetune", f"resolution={NEW}", f"init_from={init_from}",
                      f"stage_b_ckpt={stage_b}", *overrides, "data.batch_size=8", *extra)[1]


@torch.no_grad()
def fixed_loss(stage_c: StageC, stage_b_ckpt: Path, shards: Path) -> float:
    """The eps loss over the new-size validation images at fixed t and noise (what fine-tuning should lower)."""
    _, latents, clip, _ = stage_c_inputs(stage_b_ckpt, shards / "val", NEW, 16)
    effnet, _ = load_network("effnet", stage_b_ckpt)
    x0 = effnet.to_prior(latents)
    assert x0.shape[1:] == (16, 6, 6)
    generator = torch.Generator().manual_seed(0)
    t = torch.rand(len(x0), generator=generator) * 0.9 + 0.05
    noise = torch.randn(x0.shape, generator=generator)
    return float(diffusion_loss(stage_c.eval(), x0, t, noise, clip=clip)["loss_unweighted"])


def test_finetune_from_an_export_at_twice_the_resolution(chain: dict[str, Path], shards_new: Path,
                                                         tmp_path: Path) -> None:
    stage_b = chain["b"] / "checkpoints" / "last.ckpt"
    export = tmp_path / "stage_c.safetensors"
    run("convert_weights.py", "--stage", "c", "--src", str(chain["c"] / "checkpoints" / "last.ckpt"), "--dst",
        str(export), "--to", "wuerstchen")
    run_dir = tmp_path / "finetune"
    log = finetune(shards_new, run_dir, export, stage_b, steps=40)
    # the architecture came from the export (no model config given), the 0.75-style rule gave the latent size
    assert re.search(r"Stage C latent 16x6x6 from compressor input 192x192", log), log[-3000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint_info(ckpt)["effnet_scale"] == 1.5
    before, _ = load_network("c", export)
    after, _ = load_network("c", ckpt, prefer_ema=False)
    assert after.config == before.config
    loss_before, loss_after = fixed_loss(before, stage_b, shards_new), fixed_loss(after, stage_b, shards_new)
    assert loss_after < 0.9 * loss_before, (loss_before, loss_after)

    # the sampler builds the latent the prior was tuned on and writes images of the new size
    out = tmp_path / "samples"
    run("sample.py", f"stage_b_ckpt={stage_b}", f"stage_c_ckpt={ckpt}", "prompt=a large red circle in the center",
        "num_images=2", f"height={NEW}", f"width={NEW}", "steps=4", "decoder_steps=3", f"out={out}")
    record = json.loads((out / "samples.json").read_text())
    assert [Image.open(out / item["file"]).size for item in record["images"]] == [(NEW, NEW)] * 2


def test_finetuning_our_checkpoint_keeps_the_text_encoder_it_recorded(chain: dict[str, Path], tmp_path: Path) -> None:
    """model/text_encoder=from_init: our checkpoint's recorded encoder wins over the config's fallback; weights that
    record none (an export) get the fallback; `pretrained` replaces only the weights' location."""
    ckpt = chain["c"] / "checkpoints" / "last.ckpt"
    fallback = {"model_name": "wuerstchen-tiny-text", "pretrained": None, "seed": 7}
    recorded = text_encoder_for(ckpt, fallback)
    assert recorded.config == checkpoint_info(ckpt)["text_encoders"]["text_encoder"] and recorded.config["seed"] == 0
    reference = TextEncoder(**checkpoint_info(ckpt)["text_encoders"]["text_encoder"])
    assert torch.equal(recorded(["a red circle"]), reference(["a red circle"]))
    export = tmp_path / "stage_c.safetensors"
    run("convert_weights.py", "--stage", "c", "--src", str(ckpt), "--dst", str(export), "--to", "wuerstchen")
    assert text_encoder_for(export, fallback).config["seed"] == 7
    with pytest.raises(FileNotFoundError, match="/no/such/text.bin"):  # recorded architecture, weights from FILE
        text_encoder_for(ckpt, fallback, pretrained="/no/such/text.bin")


def test_finetune_from_a_released_pt(chain: dict[str, Path], shards_new: Path, tmp_path: Path) -> None:
    """A dome272-layout .pt (raw and EMA state dicts, no config): the tiny architecture matches no released layout,
    so it must be named; the EMA weights are the ones fine-tuned."""
    ours, config = load_network("c", chain["c"] / "checkpoints" / "last.ckpt")  # EMA weights
    released = tmp_path / "model_v2_stage_c_fake.pt"
    ema = {k: v.clone() for k, v in ours.state_dict().items()}
    raw = {k: v + 0.5 for k, v in ema.items()}
    torch.save({"state_dict": raw, "ema_state_dict": ema}, released)
    stage_b = chain["b"] / "checkpoints" / "last.ckpt"

    with pytest.raises(Exception, match="(?s)carries no model config.*model/stage_c@stage.stage_c"):
        finetune(shards_new, tmp_path / "refused", released, stage_b, steps=2)

    run_dir = tmp_path / "released"
    finetune(shards_new, run_dir, released, stage_b, "model/stage_c@stage.stage_c=tiny", "stage.stage_c.dropout=0.0",
             "trainer.max_steps=1", "stage.optimizer.lr=0.0", "stage.optimizer._target_=torch.optim.Adafactor",
             "~stage.optimizer.fused")  # the demo's fused AdamW option is AdamW's
    tuned, _ = load_network("c", run_dir / "checkpoints" / "last.ckpt", prefer_ema=False)
    # one step at lr 0 (with the memory-lean optimizer): the weights are the ones loaded, the released EMA copy
    assert all(torch.equal(tuned.state_dict()[k], v) for k, v in ema.items())


def test_model_config_from_the_weights_and_mismatches(chain: dict[str, Path], tmp_path: Path) -> None:
    ckpt = chain["c"] / "checkpoints" / "last.ckpt"
    _, stored = load_network("c", ckpt)
    network = network_for("c", ckpt, dropout=0.0)
    assert network.config == {**stored, "dropout": 0.0}  # architecture stored with the weights; dropout is runtime
    with pytest.raises(ValueError, match=r"init_from: model config disagrees with the one stored .*depth=2 vs stored"):
        network_for("c", ckpt, config={"depth": 2})
    with pytest.raises(ValueError, match="init_from, which is not set"):
        network_for("c", None)
    # released .pt files carry no config: the paper's 16-block and the 1B v2 layouts are told apart by their shapes
    for preset in ({}, {"c": 1536, "depth": 32, "nhead": 24, "c_cond": 1280}):
        with torch.device("meta"):
            state = StageC(**preset).state_dict()
        assert infer_config("c", state) == preset
    # the text encoder must give the prior's c_cond: ViT-H for the paper's prior, bigG for the 1B
    effnet, _ = load_network("effnet", chain["b"] / "checkpoints" / "last.ckpt")
    encoder = TextEncoder(model_name="wuerstchen-tiny-text")
    with pytest.raises(ValueError, match=r"stage.text_encoder .* 32-wide .* c_cond=64"):
        StageCModule(stage_c=StageC(c_in=16, c=64, c_cond=64, depth=1, nhead=2), text_encoder=encoder, effnet=effnet,
                     optimizer=torch.optim.AdamW)
