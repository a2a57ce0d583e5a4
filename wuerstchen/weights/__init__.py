"""Weights in and out: the released ``.pt`` files, diffusers folders, safetensors and our checkpoints."""

from .formats import (STAGES, checkpoint_info, infer_config, load_network, network_for, read_weights, save_diffusers,
                      save_wuerstchen, torch_load)
from .keys import detect_stage, diffusers_to_released, released_to_diffusers

__all__ = [
    "STAGES",
    "checkpoint_info",
    "detect_stage",
    "diffusers_to_released",
    "infer_config",
    "load_network",
    "network_for",
    "read_weights",
    "released_to_diffusers",
    "save_diffusers",
    "save_wuerstchen",
    "torch_load",
]
