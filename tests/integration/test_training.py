"""Training through the real entry points: every config composes, every stage trains and its loss falls, the three
stages chain through their checkpoints, sampling works, broken configs stop early naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from helpers import ROOT, SIZE, common, losses, run, train_here
from wuerstchen.evaluation import caption_accuracy, generate, held_out, prior_probe, stage_a_psnr
from wuerstchen.pipeline import Pipeline
from wuerstchen.train import compose as compose_train
from wuerstchen.weights import checkpoint_info, load_network

CONFIGS = ROOT / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
# from_init builds the architecture of init_from's weights (tests/integration/test_finetune.py)
MODEL_CONFIGS = sorted(f"{p.parent.name}/{p.stem}" for p in (CONFIGS / "model").glob("*/*.yaml")
                       if p.stem != "from_init")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment: str) -> None:
    cfg = compose_train([f"experiment={experiment}", "data.urls=/some/shards"])
    assert cfg.stage._target_.startswith("wuerstchen.training.")
    assert cfg.data.image_size % 32 == 0 and cfg.trainer.max_steps > 0


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_every_model_config_instantiates(name: str) -> None:
    group, choice = name.split("/")
    with initialize_config_dir(config_dir=str(CONFIGS / "model"), version_base="1.3"):
        cfg = compose(config_name=f"{group}/{choice}")[group]
    for key in ("pretrained", "backbone_weights"):  # nothing is downloaded in tests
        if key in cfg:
            cfg[key] = None
    if "random_features" in cfg:  # LPIPS: no VGG16 file offline
        cfg.random_features = True
    with torch.device("meta"):  # full-size networks cost nothing here
        module = instantiate(cfg)
    assert isinstance(module, torch.nn.Module)


def test_the_paper_1b_prior_and_its_resolution_schedule_compose() -> None:
    """experiment=stage_c_1b: the v1 script's Prior(c=1536, depth=32, nhead=24, c_cond=1024) with ViT-H at 512 px;
    experiment=stage_c_1b_1024 continues from its weights on 1024 px buckets."""
    cfg = compose_train(["experiment=stage_c_1b", "data.urls=/some/shards"])
    assert cfg.stage.text_encoder.model_name == "ViT-H-14" and cfg.data.image_size == 512
    assert list(cfg.data.ratios) == [1.0] and cfg.data.batch_size == 1280
    with torch.device("meta"):
        prior = instantiate(cfg.stage.stage_c)
    assert sum(p.numel() for p in prior.parameters()) == 993_243_680  # the README's number
    assert prior.config["c_cond"] == 1024 and len(prior.state_dict()) == 520
    phase2 = compose_train(["experiment=stage_c_1b_1024", "data.urls=/some/shards", "init_from=/p1/last.ckpt"])
    assert phase2.data.image_size == 1024 and len(phase2.data.ratios) > 1
    assert phase2.stage.stage_c.path == "/p1/last.ckpt" and phase2.trainer.max_steps + cfg.trainer.max_steps == 918_000


@pytest.mark.parametrize("stage", ["effnet", "a", "b", "c"])
def test_each_stage_trains_and_its_loss_falls(chain: dict[str, Path], stage: str) -> None:
    assert len(losses(chain[stage])) == 60  # `train/loss` logged every step
    # Stage A's total includes the VQ loss, which rises while the codebook moves onto the data: judge its pixels
    values = losses(chain[stage], "train/rec_loss" if stage == "a" else "train/loss")
    first, last = sum(values[:10]) / 10, sum(values[-10:]) / 10
    assert last < 0.8 * first, (stage, first, last)
    assert (chain[stage] / "checkpoints" / "last.ckpt").exists()
    if stage != "effnet":  # a compressor pretraining has nothing to preview
        assert any((chain[stage] / "previews").glob("step_0000060_*.png"))


def test_checkpoints_carry_what_the_next_stage_needs(chain: dict[str, Path]) -> None:
    b_ckpt = chain["b"] / "checkpoints" / "last.ckpt"
    stage_a, config = load_network("a", b_ckpt)  # Stage B checkpoints carry their frozen Stage A
    assert config["c_hidden"] == 16
    reference, _ = load_network("a", chain["a"] / "checkpoints" / "last.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(stage_a.state_dict().values(), reference.state_dict().values()))
    effnet, _ = load_network("effnet", b_ckpt)
    assert effnet.config["timm_name"] == "test_efficientnet"
    # Stage B started its compressor from the pretraining run, then trained it further
    pretrained, _ = load_network("effnet", chain["effnet"] / "checkpoints" / "last.ckpt")
    assert pretrained.config == effnet.config
    assert not all(torch.equal(a, b) for a, b in zip(pretrained.state_dict().values(), effnet.state_dict().values()))
    c_ckpt = torch.load(chain["c"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert c_ckpt["ema_of"] == "stage_c" and c_ckpt["text_encoders"]["text_encoder"]["model_name"] == \
        "wuerstchen-tiny-text"
    assert not any(k.startswith("text_encoder") for k in c_ckpt["state_dict"])  # frozen CLIP is not saved
    # the compressor view scale it trained with, so sampling builds the same latent size (3x3 at 64 px)
    assert checkpoint_info(chain["c"] / "checkpoints" / "last.ckpt")["effnet_scale"] == 1.5
    assert checkpoint_info(chain["c"] / "checkpoints" / "last.ckpt")["latent_sizes"] == [[3, 3]]  # sizes it saw
    # Stage C's preview decodes through the Stage B and A of its stage_b_ckpt
    assert (chain["c"] / "previews" / "step_0000060_sample_ema.png").exists()


def test_sampling_writes_images_of_the_requested_size(chain: dict[str, Path], tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large red circle in the top left\na small blue square in the center\n")
    result = run("sample.py", f"stage_b_ckpt={chain['b'] / 'checkpoints' / 'last.ckpt'}",
                 f"stage_c_ckpt={chain['c'] / 'checkpoints' / 'last.ckpt'}", f"prompts_file={prompts}",
                 "num_images=2", f"height={SIZE}", f"width={2 * SIZE}", "steps=4", "decoder_steps=3",
                 f"out={tmp_path / 'out'}")
    # the prior trained on 3x3 latents (64 px squares); 64x128 px asks for 3x6
    assert "3x6, a size this prior never trained on (it saw 3x3)" in result.stderr
    record = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert len(record["images"]) == 4
    for item in record["images"]:
        assert Image.open(tmp_path / "out" / item["file"]).size == (2 * SIZE, SIZE)
    assert (tmp_path / "out" / "grid.png").exists()


def test_the_demo_measures_run_on_the_chain(chain: dict[str, Path], shards: Path) -> None:
    """wuerstchen.evaluation as scripts/demo.py runs it: Stage A's PSNR, generation through the pipeline built from
    the checkpoints, caption scores and the prior probe."""
    samples = held_out(shards / "val", SIZE, 8)
    psnr = stage_a_psnr(chain["a"] / "checkpoints" / "last.ckpt", samples)
    assert set(psnr) == {"stage_a_psnr", "stage_a_color_accuracy", "stage_a_psnr_quantized"}
    assert 10 < psnr["stage_a_psnr"] < 60 and 0 <= psnr["stage_a_color_accuracy"] <= 1
    c, b = chain["c"] / "checkpoints" / "last.ckpt", chain["b"] / "checkpoints" / "last.ckpt"
    pipeline = Pipeline.from_checkpoints(c, b)
    assert pipeline.effnet_scale == 1.5 and pipeline.trained_latent_sizes == [(3, 3)]  # recorded by Stage C
    assert pipeline.prior_size(SIZE, SIZE) == (3, 3) and not pipeline.stage_c.training
    captions = [s["caption"] for s in samples[:4]]
    images = generate(pipeline, captions, SIZE, batch_size=2, progress=False)
    assert images.shape == (4, 3, SIZE, SIZE) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images[:2], generate(pipeline, captions[:2], SIZE, progress=False))  # seeded, batch by batch
    scores = caption_accuracy(images, samples[:4])
    assert set(scores) == {f"caption_{k}_accuracy" for k in ("color", "shape", "position", "all")}
    probe = prior_probe(b, {"prior": c}, shards, SIZE, 1.5, samples, train_samples=200)
    assert set(probe) == {"real latents", "prior"}
    assert set(probe["prior"]) == {"probe_colour_accuracy", "probe_position_accuracy"}
    assert probe["real latents"]["probe_position_accuracy"] >= 0.5  # the compressor's 3x3 latent localises the object


@pytest.mark.parametrize(("overrides", "message"), [
    (["experiment=demo_stage_b", "stage_a_ckpt=null"], "stage_a_ckpt is required"),
    (["experiment=demo_stage_c", "stage_b_ckpt=/nowhere/last.ckpt"], "/nowhere/last.ckpt"),
    (["experiment=demo_stage_a", "data.image_size=100"], "data.image_size=100"),
    (["experiment=demo_stage_a", "data.no_such_key=1"], "no_such_key"),
    (["experiment=demo_stage_b", "stage.effnet_init=/x.ckpt"], "write effnet_init=/x.ckpt instead"),  # moved key
    # LPIPS without its VGG16 file would train on random features: stop, naming the key (or stage.perceptual=null)
    (["experiment=stage_a", "trainer=cpu", "logger=csv"], "stage.perceptual.vgg_weights is not set"),
])
def test_broken_configs_stop_before_training_naming_the_key(shards: Path, tmp_path: Path, overrides: list[str],
                                                           message: str) -> None:
    with pytest.raises(Exception) as error:
        train_here(*overrides, f"data.urls={shards / 'train'}", f"run_dir={tmp_path}")
    assert message in str(error.value)
    assert not (tmp_path / "checkpoints").exists()


def test_a_broken_config_exits_non_zero(shards: Path, tmp_path: Path) -> None:
    result = run("train.py", "experiment=demo_stage_a", "data.image_size=100", f"data.urls={shards / 'train'}",
                 f"run_dir={tmp_path}", check=False)
    assert result.returncode != 0 and "data.image_size=100" in result.stderr + result.stdout
    result = run("train.py", "experiment=demo_stage_b", "stage.effnet_init=/x.ckpt", check=False)
    assert result.returncode == 1 and "error: stage.effnet_init has moved: write effnet_init=/x.ckpt" in result.stderr


def test_frozen_compressor_stays_as_initialised(chain: dict[str, Path], shards: Path, tmp_path: Path) -> None:
    """demo_stage_b keeps its pretrained compressor frozen: weights and BatchNorm statistics unchanged, not trained."""
    run_dir = tmp_path / "b"
    init = chain["effnet"] / "checkpoints" / "last.ckpt"
    train_here("experiment=demo_stage_b", *common(shards, run_dir, 3, every=3), "data.batch_size=8",
               f"stage_a_ckpt={chain['a'] / 'checkpoints' / 'last.ckpt'}", f"effnet_init={init}")
    before, _ = load_network("effnet", init)
    after, _ = load_network("effnet", run_dir / "checkpoints" / "last.ckpt")
    assert all(torch.equal(v, after.state_dict()[k]) for k, v in before.state_dict().items())
    stage_b, _ = load_network("b", run_dir / "checkpoints" / "last.ckpt")
    assert stage_b.config["c_hidden"] == [32, 64, 128]  # the decoder did train alongside
    assert len(losses(run_dir)) == 3


def test_channels_last_trains_the_same_function_in_nhwc_order() -> None:
    """stage.channels_last: every registered network's 4-D weights in NHWC order, the losses those of the contiguous
    module (the same arithmetic in another memory order); FSDP is refused by name."""
    import copy

    from wuerstchen.benchmarking import DecoderStep
    from wuerstchen.training.distributed import FSDPStrategy

    torch.manual_seed(0)
    bench = DecoderStep.preset("tiny", torch.device("cpu"), torch.float32)
    plain = bench.module.eval()
    nhwc = copy.deepcopy(plain)
    nhwc.channels_last = True
    nhwc.configure_model()
    convs = [p for name in ("stage_b", "effnet", "stage_a") for p in getattr(nhwc, name).parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs
                         if p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1)
    batch = bench.inputs(2, 64, "online")
    losses = [module.losses(batch, train=False, generator=torch.Generator().manual_seed(1))["loss"]
              for module in (plain, nhwc)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="stage.channels_last=true is for one device or trainer=ddp"):
        nhwc.to_channels_last(FSDPStrategy.__new__(FSDPStrategy))
