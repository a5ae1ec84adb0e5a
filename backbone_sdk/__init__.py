"""backbone_sdk: one interface for vision backbones, extensible through pluggy plugins.

>>> import backbone_sdk
>>> model = backbone_sdk.create_backbone("resnet50")             # doctest: +SKIP
>>> maps = model.features(images)       # {"stage1": [B,256,H/4,W/4], ..., "stage4": [B,2048,H/32,W/32]}
"""

from .allocator import AllocatorTuning, tune_cpu_allocator
from .backbone import PYRAMID_LEVELS, Backbone
from .errors import (
    BackboneSDKError,
    CheckpointError,
    CheckpointMismatchError,
    InputDtypeError,
    InputShapeError,
    InvalidOptionError,
    LayerIndexError,
    MissingDependencyError,
    PluginError,
    UnknownBackboneError,
    UnsupportedOperationError,
)
from .extract import read_extraction
from .factory import create_backbone
from .hookspecs import hookimpl
from .preprocess import load_image, preprocess
from .registry import (
    Registry,
    active_registry,
    default_registry,
    get_spec,
    list_backbones,
    plugin_report,
    register_plugin,
    unregister_plugin,
    use_registry,
)
from .specs import NECK, BackboneConfig, BackboneSpec, FeatureInfo, InputSpec, PrefixTokens, PyramidSpec, Tokens
from .weights import LoadReport, load_weights, save_weights

__version__ = "0.1.0"

__all__ = [
    "AllocatorTuning",
    "tune_cpu_allocator",
    "NECK",
    "PYRAMID_LEVELS",
    "Backbone",
    "BackboneConfig",
    "BackboneSDKError",
    "BackboneSpec",
    "InvalidOptionError",
    "LayerIndexError",
    "PrefixTokens",
    "PyramidSpec",
    "Registry",
    "UnsupportedOperationError",
    "active_registry",
    "use_registry",
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
    "read_extraction",
    "register_plugin",
    "unregister_plugin",
    "default_registry",
    "save_weights",
]
