"""The ViTDet simple feature pyramid, for composing with any plain-ViT feature map.

One implementation: it lives in the core (:mod:`backbone_sdk.pyramid`) because ``Backbone.pyramid()``
of every plain-ViT family uses it; this module re-exports it for adapter users.
"""

from ..pyramid import LayerNorm2d, SimpleFeaturePyramid

__all__ = ["LayerNorm2d", "SimpleFeaturePyramid"]
