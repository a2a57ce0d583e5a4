"""Würstchen: train the three stages of the Würstchen text-to-image model (arXiv 2306.00637).

Released hub folders name their library ``wuerstchen`` in ``model_index.json``; diffusers >= 0.38 then looks the
classes up in this package. They are forwarded here lazily (``import wuerstchen`` does not import diffusers), so
``WuerstchenPriorPipeline.from_pretrained(...)`` and friends keep working with this package installed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_DIFFUSERS_CLASSES = {
    "WuerstchenPrior": "diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_prior",
    "WuerstchenDiffNeXt": "diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_diffnext",
    "PaellaVQModel": "diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model",
    "ModelMixin": "diffusers.models.modeling_utils",
}


def __getattr__(name: str) -> Any:
    if name in _DIFFUSERS_CLASSES:
        return getattr(importlib.import_module(_DIFFUSERS_CLASSES[name]), name)
    raise AttributeError(f"module 'wuerstchen' has no attribute {name!r}")
