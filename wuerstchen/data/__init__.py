"""Data side of the framework: WebDataset shards in, per-stage batches out (no Lightning or Hydra needed here).

The Lightning ``LightningDataModule`` lives in :mod:`wuerstchen.data.datamodule`.
"""

from .buckets import DEFAULT_RATIOS, AspectBuckets
from .filters import LaionFilter
from .pipeline import ERROR_PREFIX, REJECT_REASONS, NoUsableSamplesError, WebImageTextDataset
from .shards import ShardSpecError, expand_shard_spec, split_shards
from .transforms import ImageTransform, to_model_inputs

__all__ = [
    "DEFAULT_RATIOS",
    "ERROR_PREFIX",
    "REJECT_REASONS",
    "AspectBuckets",
    "ImageTransform",
    "LaionFilter",
    "NoUsableSamplesError",
    "ShardSpecError",
    "WebImageTextDataset",
    "expand_shard_spec",
    "split_shards",
    "to_model_inputs",
]
