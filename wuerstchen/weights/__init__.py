"""Weights in and out: the released ``.pt`` files, diffusers folders, safetensors and our checkpoints."""

from .formats import (STAGES, infer_config, load_network, read_weights, save_diffusers, save_wuerstchen,
                      torch_load)
from .keys import detect_stage, diffusers_to_released, released_to_diffusers

__all__ = [
    "STAGES",
    "detect_stage",
    "diffusers_to_released",
    "infer_config",
    "load_network",
    "read_weights",
    "released_to_diffusers",
    "save_diffusers",
    "save_wuerstchen",
    "torch_load",
]
