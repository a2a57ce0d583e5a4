"""Where networks get their weights: the ``_target_`` of every weight node in the configs.

A frozen network (Stage A in Stage B, the compressor and the preview decoder in Stage C, the cache writer's
networks) is a :func:`pretrained` node; a trained network is built from its model config and, on a fresh run, starts
from an :class:`InitialWeights` node under ``stage.init`` (a resumed run has its weights in its checkpoint). Both
read every source :mod:`wuerstchen.weights.formats` reads (our checkpoints, file or sharded folder; released ``.pt``;
diffusers folders; safetensors), and a missing path is an error naming the config key (``key``) that gives it. The
top-level shortcuts of ``configs/train.yaml`` (``stage_a_ckpt``, ``stage_b_ckpt``, ``init_from``, ``effnet_init``)
are interpolated into these nodes, e.g. ``configs/stage/c.yaml``::

    effnet:
      _target_: wuerstchen.weights.loaders.pretrained
      stage: effnet
      path: ${stage_b_ckpt}
      key: stage_b_ckpt
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from .formats import RUNTIME_KEYS, load_network, read_weights, shape_mismatches

log = logging.getLogger(__name__)


def pretrained(stage: str, path: str | os.PathLike | None, key: str, optional: bool = False,
               prefer_ema: bool = True) -> nn.Module | None:
    """The network of ``stage`` ("a", "b", "c", "effnet") the weights at ``path`` hold, frozen (eval mode, no
    gradients); its architecture is the one the source records or matches by shape.

    ``optional``: None instead of an error when ``path`` is unset or holds no ``stage`` network (Stage C's previews
    take Stage B and A from its Stage B checkpoint when it has them; a released ``.pt`` holds no Stage A).
    """
    if not path:
        if optional:
            return None
        raise ValueError(f"{key} is required: set {key}=PATH (a checkpoint of ours, a released .pt, a diffusers "
                         f"folder or a safetensors export)")
    if not Path(path).exists():
        raise FileNotFoundError(f"{key}={path} does not exist")
    try:
        network, _ = load_network(stage, path, prefer_ema=prefer_ema)
    except (KeyError, ValueError):
        if optional:
            return None
        raise
    return network.eval().requires_grad_(False)


class InitialWeights:
    """The weights a trained network starts from on a fresh run (``init_from``, ``effnet_init``): any supported
    source, loaded strictly; a config the source records must agree with the network's (architecture keys only).

    Args:
        stage: the network's stage in :mod:`wuerstchen.weights` ("a", "b", "c", "effnet").
        path: the weights; None starts from the network's own initialisation.
        key: the config key that gives ``path``, for errors.
        prefer_ema: take the source's EMA weights when it has them.
    """

    def __init__(self, stage: str, path: str | os.PathLike | None, key: str, prefer_ema: bool = True) -> None:
        self.stage, self.path, self.key, self.prefer_ema = stage, path, key, prefer_ema

    def __bool__(self) -> bool:
        return bool(self.path)

    def __repr__(self) -> str:
        return f"InitialWeights({self.key}={self.path})"

    def load_into(self, network: nn.Module) -> None:
        if not self.path:
            return
        if not Path(self.path).exists():
            raise FileNotFoundError(f"{self.key}={self.path} does not exist")
        state, config = read_weights(self.path, self.stage, prefer_ema=self.prefer_ema)
        ours: dict[str, Any] = getattr(network, "config", {})
        conflicts = {k: (ours[k], v) for k, v in (config or {}).items()
                     if k in ours and ours[k] != v and k not in RUNTIME_KEYS}
        if conflicts:
            raise ValueError(f"{self.key}={self.path}: the weights' config disagrees with the model config: "
                             + ", ".join(f"{k}: model {a!r} vs weights {b!r}" for k, (a, b) in conflicts.items()))
        missing, unexpected, wrong = shape_mismatches(network, state)
        if missing or unexpected or wrong:
            raise ValueError(f"{self.key}={self.path} does not fit the model: missing {missing[:8]}, unexpected "
                             f"{unexpected[:8]}, wrong shape {wrong[:8]}")
        network.load_state_dict(state, strict=True)
        log.info("%s initialised from %s=%s", type(network).__name__, self.key, self.path)
