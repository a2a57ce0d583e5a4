"""LPIPS perceptual distance (Zhang et al. 2018, VGG16 variant) with weights from local files.

Two weight files make LPIPS: torchvision's ImageNet VGG16 (``vgg16-397923af.pth``) and the LPIPS linear heads
(``vgg.pth`` of the ``lpips`` package; torchmetrics ships the same file, used by default when installed). Without the
VGG file the features would be random and the loss would measure nothing, so that is an error unless asked for
explicitly (``random_features=True``, for tests); a run without VGG16 turns the perceptual loss off instead
(``stage.perceptual=null``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import torch_load

log = logging.getLogger(__name__)

_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # VGG16 features up to relu1_2 ... relu5_3
_CHANNELS = (64, 128, 256, 512, 512)


def _bundled_heads() -> Path | None:
    try:
        import torchmetrics
    except ImportError:
        return None
    path = Path(torchmetrics.__file__).parent / "functional" / "image" / "lpips_models" / "vgg.pth"
    return path if path.exists() else None


class LPIPS(nn.Module):
    """Perceptual distance of images in [0, 1]: (B, 3, H, W) x 2 -> (B,). Frozen.

    Args:
        vgg_weights: torchvision VGG16 ImageNet weights (``.pth``; whole classifier or ``features`` only).
        head_weights: LPIPS linear heads; None takes torchmetrics' bundled copy.
        random_features: allow ``vgg_weights=None`` (random VGG features: a distance that measures nothing; tests).
    """

    def __init__(self, vgg_weights: str | os.PathLike | None = None,
                 head_weights: str | os.PathLike | None = None, random_features: bool = False) -> None:
        super().__init__()
        import torchvision

        if vgg_weights is None and not random_features:
            raise ValueError("stage.perceptual.vgg_weights is not set: LPIPS on random VGG16 features measures "
                             "nothing. Give torchvision's ImageNet VGG16 file (vgg16-397923af.pth), or train "
                             "without the perceptual loss: stage.perceptual=null")
        if vgg_weights is not None and not Path(vgg_weights).is_file():
            raise FileNotFoundError(f"stage.perceptual.vgg_weights={vgg_weights} does not exist")
        features = torchvision.models.vgg16(weights=None).features
        if vgg_weights is not None:
            state = torch_load(vgg_weights)
            features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()
                                      if not k.startswith("classifier.")})
        else:
            log.warning("LPIPS on random VGG16 features (random_features=True): the distance measures nothing")
        self.slices = nn.ModuleList(nn.Sequential(*features[a:b]) for a, b in _SLICES)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _CHANNELS)
        head_weights = head_weights or _bundled_heads()
        if head_weights is not None:
            state = torch_load(head_weights)
            for i, head in enumerate(self.heads):
                head.weight.data.copy_(state[f"lin{i}.model.1.weight"])
        else:
            log.warning("LPIPS without head weights: every layer weighs the same")
            for head in self.heads:
                nn.init.constant_(head.weight, 1.0 / head.in_channels)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h_x = ((x * 2 - 1) - self.shift) / self.scale
        h_y = ((y * 2 - 1) - self.shift) / self.scale
        distance = torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)
        for block, head in zip(self.slices, self.heads):
            h_x, h_y = block(h_x), block(h_y)
            diff = (F.normalize(h_x, dim=1, eps=1e-10) - F.normalize(h_y, dim=1, eps=1e-10)) ** 2
            distance = distance + head(diff).mean(dim=(1, 2, 3)).float()
        return distance
