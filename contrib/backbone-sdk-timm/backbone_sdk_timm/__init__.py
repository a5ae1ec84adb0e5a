"""backbone_sdk bridge to timm: ``create_backbone("timm/convnext_tiny")`` for any timm model with
``forward_intermediates``. Importing this package does not import timm; resolving a name does."""

__version__ = "0.1.0"
PREFIX = "timm/"
