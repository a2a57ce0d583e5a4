"""The Lightning layer: one module per stage (wiring only), EMA, optimizer pieces and callbacks."""

from .diffusion_stages import StageBModule, StageCModule
from .ema import EMA
from .stage_a import StageAModule

__all__ = ["EMA", "StageAModule", "StageBModule", "StageCModule"]
