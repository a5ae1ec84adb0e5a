"""yacs config keys (``MODEL.BACKBONE_SDK``) and the registered ``BACKBONE_REGISTRY`` builders."""

from __future__ import annotations

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from ...adapters.finetune import unit_of
from ...registry import get_spec
from ...specs import BackboneSpec
from ._common import CFG_PREFIX, PYRAMID_NAMES, ConfigError, _checked, log
from .backbone import (
    SDKFPN,
    Detectron2Backbone,
    _as_names,
    _resolve_out_features,
    available_levels,
)
from .pixels import check_pixels, configure_pixels


# -- yacs config -----------------------------------------------------------------------------------
def add_backbone_sdk_config(cfg: CfgNode) -> CfgNode:
    """Add ``MODEL.BACKBONE_SDK`` (idempotent). Keys:

    ``NAME`` backbone name; ``WEIGHTS``/``WEIGHTS_FORMAT`` backbone checkpoint (independent of the
    detector's ``MODEL.WEIGHTS``); ``OUT_FEATURES`` (empty: ``MODEL.FPN.IN_FEATURES`` under FPN,
    otherwise the defaults of :class:`Detectron2Backbone`); ``FINETUNE`` (empty: follow
    ``MODEL.BACKBONE.FREEZE_AT``, i.e. ``stages:FREEZE_AT-1``); ``NORM_EVAL``; ``FROZEN_BN`` (BatchNorm
    as detectron2's FrozenBN: fixed statistics and affine parameters); ``USE_PYRAMID``;
    ``GRAD_CHECKPOINT``; ``ALLOW_PIXEL_MISMATCH`` (skip the pixel-statistics check).
    """
    if "BACKBONE_SDK" in cfg.MODEL:
        return cfg
    node = CfgNode()
    node.NAME = ""
    node.WEIGHTS = ""
    node.WEIGHTS_FORMAT = ""
    node.OUT_FEATURES = []
    node.FINETUNE = ""
    node.NORM_EVAL = False
    node.FROZEN_BN = False
    node.USE_PYRAMID = True
    node.GRAD_CHECKPOINT = False
    node.ALLOW_PIXEL_MISMATCH = False
    cfg.MODEL.BACKBONE_SDK = node
    return cfg


def _sdk_node(cfg: CfgNode) -> CfgNode:
    if "BACKBONE_SDK" not in cfg.MODEL:
        raise ConfigError(f"{CFG_PREFIX}: missing; call backbone_sdk.integrations.detectron2."
                          "add_backbone_sdk_config(cfg) before merging config files that use it.")
    return cfg.MODEL.BACKBONE_SDK


def _policy_from_cfg(cfg: CfgNode, spec: BackboneSpec | None) -> str:
    """``FINETUNE``, or detectron2's ``FREEZE_AT`` (stem + first FREEZE_AT-1 stages) when it is empty."""
    policy = _sdk_node(cfg).FINETUNE
    if policy or spec is None:
        return policy or "none"
    freeze_at = int(cfg.MODEL.BACKBONE.FREEZE_AT)
    if freeze_at <= 0:
        return "none"
    unit = unit_of(spec)
    groups = len(spec.features)
    if freeze_at - 1 > groups:
        raise ConfigError(f"MODEL.BACKBONE.FREEZE_AT={freeze_at}: {spec.name} has {groups} {unit} (FREEZE_AT <= "
                          f"{groups + 1}); set {CFG_PREFIX}.FINETUNE ('frozen', '{unit}:N', 'none') to override.")
    return f"{unit}:{freeze_at - 1}"


def use_backbone(cfg: CfgNode, name: str, *, fpn: bool = True, **options) -> CfgNode:
    """Point a yacs config at backbone ``name``: adds ``MODEL.BACKBONE_SDK``, picks the builder
    (FPN or alone), sets ``NAME`` and ``options`` (``finetune="stages:1"`` -> ``FINETUNE``), and the
    pixel settings (:func:`configure_pixels`). Clears ``MODEL.WEIGHTS`` when it points at
    detectron2's ImageNet ResNet weights, which cannot initialize another backbone.
    """
    add_backbone_sdk_config(cfg)
    spec = _checked(f"{CFG_PREFIX}.NAME", get_spec, name)
    node = cfg.MODEL.BACKBONE_SDK
    node.NAME = name
    for option, value in options.items():
        key = option.upper()
        if key not in node:
            raise ConfigError(f"{CFG_PREFIX}.{key}: no such key; choose from {sorted(node)}")
        setattr(node, key, list(value) if isinstance(value, tuple) else value)
    cfg.MODEL.BACKBONE.NAME = "build_backbone_sdk_fpn_backbone" if fpn else "build_backbone_sdk_backbone"
    if str(cfg.MODEL.WEIGHTS).startswith("detectron2://ImageNetPretrained/"):
        log.info("clearing MODEL.WEIGHTS=%s: ImageNet weights of detectron2's ResNet do not fit %s",
                 cfg.MODEL.WEIGHTS, name)
        cfg.MODEL.WEIGHTS = ""
    configure_pixels(cfg, spec)
    return cfg



# -- builders --------------------------------------------------------------------------------------
def _build_bottom_up(cfg: CfgNode, input_shape: ShapeSpec, out_features=None) -> Detectron2Backbone:
    node = _sdk_node(cfg)
    if not node.NAME:
        raise ConfigError(f"{CFG_PREFIX}.NAME: empty; set it to a registered backbone (backbone_sdk.list_backbones()).")
    spec = _checked(f"{CFG_PREFIX}.NAME", get_spec, node.NAME)
    if input_shape is not None and input_shape.channels not in (None, spec.input.channels):
        raise ConfigError(f"MODEL.PIXEL_MEAN: {len(cfg.MODEL.PIXEL_MEAN)} channels, but {spec.name} takes "
                          f"{spec.input.channels}.")
    if not node.ALLOW_PIXEL_MISMATCH:
        check_pixels(cfg, spec)
    return Detectron2Backbone.from_config(cfg, out_features=out_features)


@BACKBONE_REGISTRY.register()
def build_backbone_sdk_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Detectron2Backbone:
    """``MODEL.BACKBONE.NAME: build_backbone_sdk_backbone``: the backbone alone (no FPN)."""
    return _build_bottom_up(cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_backbone_sdk_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> SDKFPN:
    """``MODEL.BACKBONE.NAME: build_backbone_sdk_fpn_backbone``: the backbone under detectron2's FPN.

    FPN inputs are ``MODEL.FPN.IN_FEATURES`` (the model-zoo default ``res2..res5`` = the pyramid
    levels); they are also the backbone's outputs unless ``OUT_FEATURES`` is set.
    """
    in_features = _as_names(cfg.MODEL.FPN.IN_FEATURES, "MODEL.FPN.IN_FEATURES") or []
    node = _sdk_node(cfg)
    spec = _checked(f"{CFG_PREFIX}.NAME", get_spec, node.NAME) if node.NAME else None
    if spec is not None:
        out = _as_names(node.OUT_FEATURES, f"{CFG_PREFIX}.OUT_FEATURES") or []
        _check_fpn_inputs(spec, in_features, out, bool(node.USE_PYRAMID))
    bottom_up = _build_bottom_up(cfg, input_shape, out_features=in_features)
    return SDKFPN(bottom_up=bottom_up, in_features=in_features, out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
                  norm=cfg.MODEL.FPN.NORM, top_block=LastLevelMaxPool(), fuse_type=cfg.MODEL.FPN.FUSE_TYPE)


def _check_fpn_inputs(spec: BackboneSpec, in_features: list[str], out_features: list[str], use_pyramid: bool):
    valid = available_levels(spec, use_pyramid)
    if spec.plain and not use_pyramid:
        raise ConfigError(f"{CFG_PREFIX}.USE_PYRAMID: {spec.name} is a plain ViT whose blocks all have stride "
                          f"{spec.features[-1].stride}; FPN needs strides 4..32. Set USE_PYRAMID=True (simple "
                          "feature pyramid), or use build_backbone_sdk_backbone for single-scale heads.")
    if out_features:
        _resolve_out_features(spec, out_features, use_pyramid, f"{CFG_PREFIX}.OUT_FEATURES")
    offered = out_features or list(valid)
    missing = [f for f in in_features if f not in offered]
    if missing or not in_features:
        source = f"{CFG_PREFIX}.OUT_FEATURES {out_features}" if out_features else f"{spec.name}'s levels {list(valid)}"
        raise ConfigError(f"MODEL.FPN.IN_FEATURES: {missing or in_features} not among {source} "
                          f"(USE_PYRAMID={use_pyramid}; with the pyramid the levels are {list(PYRAMID_NAMES)}).")
    strides = [spec.feature(f).stride if not use_pyramid else 2 ** int(f[3:]) for f in in_features]
    if any(b != 2 * a for a, b in zip(strides, strides[1:])):
        raise ConfigError(f"MODEL.FPN.IN_FEATURES: {in_features} have strides {strides}; FPN needs each level "
                          "at twice the stride of the previous one, in increasing order.")

