"""The checkpoint schema (``wuerstchen/weights/checkpoint.py``): every key a real run writes is documented there and
read back by the reader; the EMA is one registered ``ema_network`` under every strategy; checkpoints of the older
layout (EMA under ``ema``) still load and resume; one reader opens a file once for all of its networks."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from helpers import common, losses_by_step, output, run, to_legacy
from helpers import TINY_B
from torch import nn

from wuerstchen.models import SemanticCompressor, StageA, StageB
from wuerstchen.models.text_encoder import recorded_text_encoder
from wuerstchen.training.base import StageModule
from wuerstchen.weights import CheckpointFile, checkpoint_info, load_network, open_checkpoint
from wuerstchen.weights import checkpoint as schema
from wuerstchen.weights.formats import clear_cache

TINY_A = dict(levels=2, bottleneck_blocks=1, c_hidden=16, c_latent=4, codebook_size=8)
TINY_EFFNET = dict(c_latent=16, backbone="timm", timm_name="test_efficientnet", backbone_weights=None, affine=False)
TINY_TEXT = dict(model_name="wuerstchen-tiny-text", pretrained=None, padding_mask=True, pad_token="eot", seed=0)


def _under(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _randomised(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return module


def write_stage_b_checkpoint(path: Path) -> dict:
    """A Stage B training checkpoint as ours look: Stage B (and its EMA), the compressor and Stage A, their configs,
    the text encoder record."""
    nets = {"stage_b": _randomised(StageB(**TINY_B), 1), "effnet": SemanticCompressor(**TINY_EFFNET),
            "stage_a": _randomised(StageA(**TINY_A), 2), schema.EMA_NETWORK: _randomised(StageB(**TINY_B), 3)}
    checkpoint = {schema.LIGHTNING_VERSION: "2.6.6", schema.GLOBAL_STEP: 3,
                  schema.STATE_DICT: {f"{name}.{k}": v for name, net in nets.items()
                                      for k, v in net.state_dict().items()}}
    schema.write_stage(checkpoint, nets, "stage_b", {})
    schema.write_text_encoders(checkpoint, {"text_encoder": TINY_TEXT})
    torch.save(checkpoint, path)
    return checkpoint


STAGE_C = ["experiment=demo_stage_c", "data.batch_size=4", "data.batches_per_epoch=5", "callbacks.preview=null",
           "stage.ema.start_step=0", "stage.ema.decay=0.5"]


@pytest.fixture(scope="module")
def stage_c_run(shards: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(Stage C checkpoint after 2 steps of a real run through scripts/train.py, the Stage B checkpoint it used)."""
    root = tmp_path_factory.mktemp("schema")
    write_stage_b_checkpoint(root / "stage_b.ckpt")
    run("train.py", *common(shards, root / "c", 2, every=2), *STAGE_C, f"stage_b_ckpt={root / 'stage_b.ckpt'}")
    return root / "c" / "checkpoints" / "step=0000002.ckpt", root / "stage_b.ckpt"


def test_every_key_a_run_writes_is_documented_and_read_back(stage_c_run: tuple[Path, Path]) -> None:
    ckpt, _ = stage_c_run
    written = torch.load(ckpt, weights_only=True)
    undocumented = set(written) - schema.LIGHTNING_KEYS - schema.OUR_KEYS
    assert len(undocumented) == 1 and undocumented.pop().endswith("DataModule")  # Lightning's, the data stream's
    for key in set(written) & (schema.LIGHTNING_KEYS | schema.OUR_KEYS):
        assert f"``{key}``" in schema.__doc__, key
    # one EMA layout: the registered copy inside state_dict, the network it averages named
    assert schema.LEGACY_EMA not in written and written[schema.EMA_OF] == "stage_c"
    assert {k.split(".")[0] for k in written[schema.STATE_DICT]} == {"stage_c", "effnet", schema.EMA_NETWORK}

    reader = CheckpointFile(ckpt)
    assert reader.ours and reader.global_step == 2 and reader.ema_of == "stage_c"
    assert reader.effnet_scale == 1.5 and reader.latent_sizes == [(3, 3)]  # the demo's views at 64 px
    assert reader.text_encoder_record()["model_name"] == "wuerstchen-tiny-text"
    assert set(reader.network_configs) == {"stage_c", "effnet"}
    info = reader.info
    assert set(info) == set(written) - {schema.STATE_DICT, schema.OPTIMIZER_STATES, schema.LR_SCHEDULERS}
    assert len(info[schema.RNG_STATES]) == 1 and info[schema.NONFINITE_STEPS] is not None
    assert isinstance(info[schema.LINEAGE], list) and checkpoint_info(ckpt).keys() == info.keys()
    state = written[schema.STATE_DICT]
    ema, raw = reader.network("c"), reader.network("c", prefer_ema=False)
    assert _equal(ema.state_dict(), _under(state, "ema_network."))
    assert _equal(raw.state_dict(), _under(state, "stage_c."))
    assert not _equal(ema.state_dict(), raw.state_dict())  # decay 0.5 from step 0: the average lags the weights
    assert _equal(reader.network("effnet").state_dict(), _under(state, "effnet."))  # no EMA of it: its own weights


def test_older_checkpoints_with_the_ema_outside_state_dict_load_and_resume(stage_c_run: tuple[Path, Path],
                                                                          shards: Path, tmp_path: Path) -> None:
    ckpt, stage_b = stage_c_run
    written = torch.load(ckpt, weights_only=True)
    legacy = to_legacy(written)
    torch.save(legacy, tmp_path / "legacy.ckpt")
    reader = CheckpointFile(tmp_path / "legacy.ckpt")
    assert reader.ema_of == "stage_c" and schema.LEGACY_EMA not in reader.info
    ema, _ = load_network("c", tmp_path / "legacy.ckpt")  # EMA preferred, as before
    assert _equal(ema.state_dict(), legacy[schema.LEGACY_EMA]["stage_c"])
    raw, _ = load_network("c", tmp_path / "legacy.ckpt", prefer_ema=False)
    assert _equal(raw.state_dict(), _under(written[schema.STATE_DICT], "stage_c."))

    # resuming from either layout continues the same run, EMA included, bitwise
    finals = {}
    torch.save(written, tmp_path / "new.ckpt")  # (a path without '=', for the override)
    for name, start in (("new", tmp_path / "new.ckpt"), ("legacy", tmp_path / "legacy.ckpt")):
        result = run("train.py", *common(shards, tmp_path / name, 4, every=2), *STAGE_C, f"stage_b_ckpt={stage_b}",
                     f"ckpt_path={start}")
        assert "resuming from" in output(result)
        finals[name] = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
        assert sorted(losses_by_step(tmp_path / name)) == [2, 3]
    assert losses_by_step(tmp_path / "new") == losses_by_step(tmp_path / "legacy")
    new, old = finals["new"][schema.STATE_DICT], finals["legacy"][schema.STATE_DICT]
    assert any(k.startswith("ema_network.") for k in old) and _equal(new, old)
    assert finals["legacy"][schema.EMA_OF] == "stage_c" and schema.LEGACY_EMA not in finals["legacy"]


def test_resuming_without_an_ema_on_one_side() -> None:
    net = {"stage_c.w": torch.ones(2), "effnet.w": torch.zeros(2)}
    fresh = {schema.STATE_DICT: dict(net)}  # no EMA saved; this run keeps one: it starts from the weights
    schema.prepare_resume(fresh, "stage_c")
    assert _equal(fresh[schema.STATE_DICT], {**net, "ema_network.w": torch.ones(2)})
    assert fresh[schema.EMA_OF] == "stage_c"
    dropped = {schema.STATE_DICT: {**net, "ema_network.w": torch.ones(2)}, schema.EMA_OF: "stage_c"}
    schema.prepare_resume(dropped, None)  # this run keeps no EMA: the saved one is left out
    assert _equal(dropped[schema.STATE_DICT], net) and schema.EMA_OF not in dropped
    sharded = {schema.EMA_OF: "stage_c"}  # the strategy restored the module from the shards: nothing to do
    schema.prepare_resume(sharded, "stage_c")
    assert sharded == {schema.EMA_OF: "stage_c"}


def test_one_reader_opens_a_stage_b_checkpoint_once_for_compressor_decoder_and_vqgan(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    written = write_stage_b_checkpoint(tmp_path / "stage_b.ckpt")
    state = written[schema.STATE_DICT]
    loads = []
    torch_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or torch_load(*a, **k))
    reader = CheckpointFile(tmp_path / "stage_b.ckpt")
    effnet, stage_b, stage_a = reader.network("effnet"), reader.network("b"), reader.network("a")
    assert _equal(effnet.state_dict(), _under(state, "effnet."))
    assert _equal(stage_b.state_dict(), _under(state, "ema_network."))  # Stage B's EMA, preferred
    assert _equal(reader.network("b", prefer_ema=False).state_dict(), _under(state, "stage_b."))
    assert _equal(stage_a.state_dict(), _under(state, "stage_a."))
    assert reader.text_encoder_record() == TINY_TEXT and reader.scale_factor == stage_a.scale_factor
    assert reader.has("a") and not reader.has("c") and reader.effnet_scale is None and reader.latent_sizes is None
    assert len(loads) == 1

    # the functions over the cached readers: one more read for all of them
    clear_cache()
    for stage in ("effnet", "b", "a"):
        load_network(stage, tmp_path / "stage_b.ckpt")
    assert checkpoint_info(tmp_path / "stage_b.ckpt")[schema.EMA_OF] == "stage_b"
    assert recorded_text_encoder(tmp_path / "stage_b.ckpt")["model_name"] == "wuerstchen-tiny-text"
    assert open_checkpoint(tmp_path / "stage_b.ckpt") is open_checkpoint(tmp_path / "stage_b.ckpt")
    assert len(loads) == 2


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = {"width": 4}
        self.linear, self.drop = nn.Linear(4, 4), nn.Dropout(0.5)
        self.register_buffer("count", torch.zeros(()))


class TinyStage(StageModule):
    trained = ("net",)

    def __init__(self) -> None:
        super().__init__(optimizer=functools.partial(torch.optim.SGD, lr=0.1), ema={"decay": 0.5})
        self.net = Net()


def test_the_ema_is_one_registered_copy_outside_the_optimizer_and_evaluated_only() -> None:
    module = TinyStage()
    module.configure_model()  # what the trainer calls under every strategy, before a checkpoint is restored
    assert module.ema_network is module.ema.module and not module.sharded
    assert not any(p.requires_grad for p in module.ema_network.parameters())  # DDP syncs no gradient of it
    assert not {id(p) for p in module.trainable_parameters()} & {id(p) for p in module.ema_network.parameters()}
    module.train()
    assert module.net.training and not module.ema_network.training
    assert {k.split(".")[0] for k in module.state_dict()} == {"net", "ema_network"}

    before = module.ema_network.linear.weight.clone()
    with torch.no_grad():
        module.net.linear.weight.add_(1.0)
        module.net.count.fill_(3)
    module.update_ema(0)
    torch.testing.assert_close(module.ema_network.linear.weight, before + 0.5)  # decay 0.5
    assert module.ema_network.count == 3  # buffers are copied
    with module.averaged() as network:
        assert network is module.ema_network and module.net is module.ema_network
    assert module.net is not module.ema_network

    checkpoint = {schema.STATE_DICT: module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint[schema.EMA_OF] == "net" and checkpoint[schema.NETWORK_CONFIGS] == {"net": {"width": 4}}
    restored = TinyStage()  # without a trainer: the hook creates the EMA before the state dict loads
    legacy = to_legacy(checkpoint)
    restored.on_load_checkpoint(legacy)
    restored.load_state_dict(legacy[schema.STATE_DICT], strict=True)
    assert _equal(restored.ema_network.state_dict(), module.ema_network.state_dict())
