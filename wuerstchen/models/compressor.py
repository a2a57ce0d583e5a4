"""The semantic compressor: EfficientNetV2-S features -> 16-channel latent at stride 32 (arXiv 2306.00637), and its
geometry: the view of an image it is fed and the latent size that gives (the size Stage C samples at)."""

from __future__ import annotations

import logging
import math
import os

import torch
from torch import nn

from .common import Unit

log = logging.getLogger(__name__)

BACKBONE_CHANNELS = 1280
STRIDE = 32  # image side / latent side: EfficientNetV2's five stride-2 stages
VIEW_SCALE = 0.75  # compressor view side / image side: the paper feeds 768 px views of 1024 px images
RELEASED_COMPRESSION = 42.67  # image side / Stage C latent side of the released weights' sampling code


def view_size(side: int, scale: float = VIEW_SCALE) -> int:
    """Compressor input side for an image side: ``scale * side`` snapped to the nearest multiple of the stride
    (halves round up, at least one stride).

    1024 -> 768 (24x24 latent), 1536 -> 1152 (36x36), 2048 -> 1536 (48x48).
    """
    return max(STRIDE, math.floor(scale * side / STRIDE + 0.5) * STRIDE)


def latent_size(side: int, scale: float = VIEW_SCALE) -> int:
    """Side of the 16-channel semantic latent (the space Stage C works in) for an image side."""
    return view_size(side, scale) // STRIDE


def prior_latent_size(side: int, effnet_scale: float | None = None) -> int:
    """Stage C latent side for an output side.

    With ``effnet_scale`` (the compressor view / image side the prior was trained with; our Stage C checkpoints record
    it) the training rule :func:`latent_size`, so sampling sees the latent size training saw. Without it (released
    weights) the released rule ceil(side / 42.67). The two agree at 0.75 for every multiple of 128 (1024 -> 24,
    1536 -> 36, 2048 -> 48).
    """
    if effnet_scale is not None:
        return latent_size(side, effnet_scale)
    return math.ceil(side / RELEASED_COMPRESSION)


def _torchvision_backbone(weights: str | None) -> nn.Module:
    import torchvision

    pretrained = "DEFAULT" if weights == "imagenet" else None
    features = torchvision.models.efficientnet_v2_s(weights=pretrained).features
    if weights not in (None, "imagenet"):
        state = _load_state_dict(weights)
        # accept a whole torchvision classifier ("features.N...") as well as the features alone ("N...")
        state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
        features.load_state_dict(state, strict=True)
    return features


def _timm_backbone(weights: str | None, name: str) -> nn.Module:
    import timm

    kwargs = {"pretrained_cfg_overlay": {"file": weights}} if weights not in (None, "imagenet") else {}
    return _TimmFeatures(timm.create_model(name, pretrained=weights is not None, num_classes=0, **kwargs))


class _TimmFeatures(nn.Module):
    """timm's ``forward_features`` (conv head included: 1280 channels), not ``features_only`` (256 channels)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def _load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors or torch file, never unpickling arbitrary objects."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class SemanticCompressor(nn.Module):
    """EfficientNetV2-S features + 1x1 conv to ``c_latent`` + BatchNorm.

    ``forward`` gives the latent Stage B is conditioned on. Stage C works in ``to_prior(f) = (f + shift) / scale``:
    the released v2 weights use an affine BatchNorm with shift 1 and scale 42 (diffusers' ``latent_mean=42``,
    ``latent_std=1``); training from scratch defaults to a non-affine BatchNorm and the identity map, which keeps the
    latent near unit variance.

    Args:
        c_latent: latent channels (16).
        backbone: ``"torchvision"`` (the released weights' key layout) or ``"timm"``.
        backbone_weights: None (random), ``"imagenet"`` (downloaded by torchvision/timm), or a local weight file.
        timm_name: timm model name for ``backbone="timm"`` (any stride-32 model: ``tf_efficientnetv2_s`` gives the
            paper's 1280-channel map, ``test_efficientnet`` a 0.1 M-parameter one for the CPU demo and the tests).
        affine: BatchNorm with learned scale and bias (released v2) or without (StableCascade, from scratch).
        latent_shift, latent_scale: the map into Stage C's latent space.
    """

    def __init__(self, c_latent: int = 16, backbone: str = "torchvision", backbone_weights: str | None = None,
                 timm_name: str = "tf_efficientnetv2_s", affine: bool = False, latent_shift: float = 0.0,
                 latent_scale: float = 1.0) -> None:
        super().__init__()
        # the architecture (not where the backbone's initial weights came from), stored with checkpoints and exports
        self.config = dict(c_latent=c_latent, backbone=backbone, timm_name=timm_name, affine=affine,
                           latent_shift=float(latent_shift), latent_scale=float(latent_scale))
        if backbone == "torchvision":
            self.backbone, channels = _torchvision_backbone(backbone_weights), BACKBONE_CHANNELS
        elif backbone == "timm":
            self.backbone = _timm_backbone(backbone_weights, timm_name)
            channels = self.backbone.model.num_features
        else:
            raise ValueError(f"backbone={backbone!r}: expected 'torchvision' or 'timm'")
        self.mapper = nn.Sequential(nn.Conv2d(channels, c_latent, kernel_size=1, bias=False),
                                    nn.BatchNorm2d(c_latent, affine=affine))
        self.latent_shift = float(latent_shift)
        self.latent_scale = float(latent_scale)

    @classmethod
    def released_v2(cls, **kwargs) -> "SemanticCompressor":
        """The layout of ``model_v2_stage_b.pt``'s ``effnet_state_dict``: torchvision, affine BN, (f + 1) / 42."""
        return cls(**{"backbone": "torchvision", "affine": True, "latent_shift": 1.0, "latent_scale": 42.0, **kwargs})

    def fsdp_units(self) -> list[Unit]:
        """Every (Fused)MBConv block of the backbone: FSDP shards each. The root keeps the stem, the 1280-channel
        head conv and ``mapper``. No activation checkpointing: BatchNorm everywhere would update its running
        statistics twice."""
        stages = self.backbone.model.blocks if self.config["backbone"] == "timm" else list(self.backbone)[1:-1]
        return [(block,) for stage in stages for block in stage]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), ImageNet-normalised -> (B, c_latent, H/32, W/32)."""
        return self.mapper(self.backbone(images))

    def to_prior(self, latent: torch.Tensor) -> torch.Tensor:
        """Compressor latent -> the space Stage C is trained and sampled in."""
        return (latent + self.latent_shift) / self.latent_scale

    def from_prior(self, latent: torch.Tensor) -> torch.Tensor:
        """Stage C sample -> the latent Stage B is conditioned on."""
        return latent * self.latent_scale - self.latent_shift
