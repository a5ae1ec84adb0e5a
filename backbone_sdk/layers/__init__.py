"""Building blocks that backbones are made of, shared by the core and every plugin.

- :class:`SimpleFeaturePyramid` (and :class:`LayerNorm2d`): the ViTDet neck that turns one map into
  ``p2..p5``; the :class:`~backbone_sdk.Backbone` base builds it for any family whose levels are not at
  strides 4-32 (the ``"neck"`` part).
- :func:`split_fused`: split a fused ``[k*D, ...]`` projection (qkv, SwiGLU ``w12``) of a foreign
  checkpoint into per-projection tensors.
"""

from .convert import has_keys, rename, split_fused, split_qkv, strip_prefixes
from .pyramid import LayerNorm2d, SimpleFeaturePyramid

__all__ = ["LayerNorm2d", "SimpleFeaturePyramid", "has_keys", "rename", "split_fused", "split_qkv", "strip_prefixes"]
