"""The Würstchen networks as pure ``nn.Module``s (tensors in, tensors out), key-compatible with the released weights.

``TextEncoder`` (open_clip) is imported from :mod:`wuerstchen.models.text_encoder` on use, so importing the networks
does not pull in open_clip.
"""

from .compressor import SemanticCompressor
from .discriminator import PatchDiscriminator
from .stage_a import StageA
from .stage_b import StageB
from .stage_c import StageC

__all__ = ["PatchDiscriminator", "SemanticCompressor", "StageA", "StageB", "StageC"]
