"""Details that must match the official training and the released pipelines: fp32 diffusion targets under bf16
autocast, and the warning for a Stage C latent size the prior never trained on."""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from helpers import ROOT
from wuerstchen.pipeline import Pipeline
from wuerstchen.training import StageBModule, StageCModule

MODELS = ROOT / "configs" / "model"


def tiny(group: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return instantiate(OmegaConf.load(MODELS / group / "tiny.yaml"))


def stage_b_module() -> StageBModule:
    return StageBModule(stage_b=tiny("stage_b"), effnet=tiny("effnet"), text_encoder=tiny("text_encoder"),
                        stage_a=tiny("stage_a"), freeze_effnet=True, optimizer=partial(torch.optim.AdamW))


def stage_c_module() -> StageCModule:
    return StageCModule(stage_c=tiny("stage_c"), text_encoder=tiny("text_encoder"), effnet=tiny("effnet").eval(),
                        optimizer=partial(torch.optim.AdamW))


def batch(size: int = 64) -> dict:
    generator = torch.Generator().manual_seed(1)
    return {"images": torch.rand(2, 3, size, size, generator=generator),
            "effnet_images": torch.rand(2, 3, size, size, generator=generator),
            "captions": ["a red circle", "a blue square in the top left"]}


class Recording(torch.nn.Module):
    """Wraps a network and records the dtypes of what the objective feeds it."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network, self.seen = network, []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        self.seen.append((x_t.dtype, t.dtype, {k: v.dtype for k, v in cond.items()}))
        return self.network(x_t, t, **cond)


@pytest.mark.parametrize("make", [stage_b_module, stage_c_module], ids=["stage_b", "stage_c"])
def test_targets_and_conditionings_are_fp32_under_bf16_autocast(make) -> None:
    """The official training encodes and noises in fp32 and runs only the trained network under autocast."""
    module = make().eval()
    reference_x0, reference_cond = module.conditioning.encode(batch())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x0, cond = module.conditioning.encode(batch())
        name = module.trained[0]
        recording = Recording(getattr(module, name))
        setattr(module, name, recording)
        losses = module.objective(x0, generator=torch.Generator().manual_seed(0), **cond)
    assert x0.dtype == torch.float32 and torch.equal(x0, reference_x0)  # not a bf16 round trip
    for key, value in cond.items():
        assert value.dtype == torch.float32 and torch.equal(value, reference_cond[key]), key
    x_t_dtype, t_dtype, cond_dtypes = recording.seen[0]
    assert x_t_dtype == torch.float32 and t_dtype == torch.float32
    assert set(cond_dtypes.values()) == {torch.float32}
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])


def test_sampling_warns_at_a_latent_size_the_prior_never_trained_on() -> None:
    stage_b = tiny("stage_b")
    pipeline = Pipeline(tiny("stage_c"), stage_b, tiny("stage_a"), tiny("effnet"), tiny("text_encoder"),
                        tiny("text_encoder"), effnet_scale=0.75, trained_latent_sizes=[(12, 12), (12, 18)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipeline.check_size(512, 512)  # 0.75 * 512 = 384 px compressor views -> 12x12: trained
        pipeline.check_size(512, 768)
    with pytest.warns(UserWarning, match=r"24x24, a size this prior never trained on \(it saw 12x12, 12x18\)"):
        pipeline.check_size(1024, 1024)
    released = Pipeline(tiny("stage_c"), stage_b, tiny("stage_a"), tiny("effnet"), tiny("text_encoder"),
                        tiny("text_encoder"))  # no record (released weights): nothing to compare with
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        released.check_size(1024, 1024)
