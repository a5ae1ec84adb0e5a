"""backbone_sdk: one interface for vision backbones, extensible through pluggy plugins.

>>> import backbone_sdk
>>> model = backbone_sdk.create_backbone("resnet50")             # doctest: +SKIP
>>> maps = model.features(images)       # {"stage1": [B,256,H/4,W/4], ..., "stage4": [B,2048,H/32,W/32]}
"""

from .backbone import PYRAMID_LEVELS, Backbone
from .errors import (
    BackboneSDKError,
    CheckpointError,
    CheckpointMismatchError,
    InputDtypeError,
    InputShapeError,
    MissingDependencyError,
    PluginError,
    UnknownBackboneError,
)
from .factory import create_backbone
from .hookspecs import hookimpl
from .preprocess import load_image, preprocess
from .registry import default_registry, get_spec, list_backbones, plugin_report, register_plugin, unregister_plugin
from .specs import BackboneSpec, FeatureInfo, InputSpec, Tokens
from .weights import LoadReport, load_weights, save_weights

__version__ = "0.1.0"

__all__ = [
    "PYRAMID_LEVELS",
    "Backbone",
    "BackboneSDKError",
    "BackboneSpec",
    "CheckpointError",
    "CheckpointMismatchError",
    "FeatureInfo",
    "InputDtypeError",
    "InputShapeError",
    "InputSpec",
    "LoadReport",
    "MissingDependencyError",
    "PluginError",
    "Tokens",
    "UnknownBackboneError",
    "create_backbone",
    "get_spec",
    "hookimpl",
    "list_backbones",
    "load_image",
    "load_weights",
    "plugin_report",
    "preprocess",
    "register_plugin",
    "unregister_plugin",
    "default_registry",
    "save_weights",
]
