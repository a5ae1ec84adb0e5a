"""Deprecated location of the simple feature pyramid (one release): use :mod:`backbone_sdk.layers`."""

import warnings

from ..layers.pyramid import LayerNorm2d, SimpleFeaturePyramid

warnings.warn("backbone_sdk.adapters.pyramid is deprecated; import SimpleFeaturePyramid from backbone_sdk.layers",
              DeprecationWarning, stacklevel=2)

__all__ = ["LayerNorm2d", "SimpleFeaturePyramid"]
