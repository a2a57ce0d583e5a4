"""Weights in and out: the released ``.pt`` files, diffusers folders, safetensors and our checkpoints (whose every key
:mod:`wuerstchen.weights.checkpoint` documents)."""

from .checkpoint import CheckpointFile, open_checkpoint
from .formats import (STAGES, checkpoint_info, infer_config, load_network, network_for, read_weights, save_diffusers,
                      save_wuerstchen, torch_load)
from .keys import detect_stage, diffusers_to_released, released_to_diffusers

__all__ = [
    "STAGES",
    "CheckpointFile",
    "checkpoint_info",
    "detect_stage",
    "diffusers_to_released",
    "infer_config",
    "load_network",
    "network_for",
    "open_checkpoint",
    "read_weights",
    "released_to_diffusers",
    "save_diffusers",
    "save_wuerstchen",
    "torch_load",
]
