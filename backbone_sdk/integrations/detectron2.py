"""Detectron2 integration: every backbone_sdk backbone as a detectron2 ``Backbone``.

Importing this module registers two builders in detectron2's ``BACKBONE_REGISTRY``:

- ``build_backbone_sdk_backbone``: the backbone alone (single-scale heads, or a plain ViT's simple
  feature pyramid fed straight to the heads, ViTDet style);
- ``build_backbone_sdk_fpn_backbone``: the backbone under detectron2's own ``FPN`` +
  ``LastLevelMaxPool``, for the ``*_FPN_*`` model-zoo configs.

yacs::

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"))
    use_backbone(cfg, "swin_tiny_patch4_window7_224")   # builder, MODEL.BACKBONE_SDK.NAME, pixels
    model = build_model(cfg)

LazyConfig::

    model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    model.backbone.bottom_up = L(Detectron2Backbone)(name="resnet50", out_features=["res2", "res3", "res4", "res5"])
    model.backbone._target_ = SDKFPN          # needed when the patch size does not divide 32 (DINOv2)
    configure_pixels(model, "resnet50")

Level names: with ``use_pyramid`` (the default) the backbone returns ``backbone.pyramid()``'s
``p2..p5`` under detectron2's bottom-up names ``res2..res5`` (same strides 4..32). They cannot be
called ``p*``: detectron2's FPN reads its top block's input (``"p5"``) from the bottom-up outputs
when a map of that name exists there, and would skip its own lateral/output convs. See docs/detectron2.md.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..errors import BackboneSDKError, CheckpointError, require

require("detectron2", "detectron2")

import torch  # noqa: E402
from detectron2.config import CfgNode  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling.backbone import BACKBONE_REGISTRY  # noqa: E402
from detectron2.modeling.backbone import Backbone as D2Backbone  # noqa: E402
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool  # noqa: E402
from torch import nn  # noqa: E402

from ..adapters.finetune import FinetunePolicy, apply_finetune, policy_for, unit_of  # noqa: E402
from ..backbone import PYRAMID_LEVELS, Backbone  # noqa: E402
from ..factory import create_backbone  # noqa: E402
from ..pixels import mismatches  # noqa: E402
from ..registry import get_spec  # noqa: E402
from ..specs import BackboneSpec  # noqa: E402
from ..weights import looks_local  # noqa: E402

__all__ = [
    "Detectron2Backbone",
    "SDKBackbone",
    "SDKFPN",
    "ConfigError",
    "PixelMismatchError",
    "PYRAMID_NAMES",
    "add_backbone_sdk_config",
    "use_backbone",
    "configure_pixels",
    "check_pixels",
    "expected_pixels",
    "build_backbone_sdk_backbone",
    "build_backbone_sdk_fpn_backbone",
]

log = logging.getLogger(__name__)

#: detectron2 names of ``pyramid()``'s ``p2..p5`` (strides 4, 8, 16, 32)
PYRAMID_NAMES = tuple(f"res{p[1:]}" for p, _ in PYRAMID_LEVELS)
CFG_PREFIX = "MODEL.BACKBONE_SDK"
_CFG_KEYS = {
    "name": "NAME", "weights": "WEIGHTS", "weights_format": "WEIGHTS_FORMAT", "out_features": "OUT_FEATURES",
    "finetune": "FINETUNE", "norm_eval": "NORM_EVAL", "frozen_bn": "FROZEN_BN", "use_pyramid": "USE_PYRAMID",
    "grad_checkpoint": "GRAD_CHECKPOINT",
}


class ConfigError(BackboneSDKError, ValueError):
    """A detectron2 config that cannot be built; the message starts with the offending key."""


class PixelMismatchError(ConfigError):
    """The detector's pixel format / mean / std disagree with the backbone's preprocessing."""


def _label(arg: str, prefix: str | None) -> str:
    return f"{prefix}.{_CFG_KEYS[arg]}" if prefix else f"Detectron2Backbone({arg}=...)"


def _checked(label: str, fn, *args, **kwargs):
    """Run ``fn``; re-raise a config-caused error as :class:`ConfigError` prefixed with ``label``."""
    try:
        return fn(*args, **kwargs)
    except ConfigError:
        raise
    except (BackboneSDKError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{label}: {exc}") from exc


# -- levels ----------------------------------------------------------------------------------------
def available_levels(spec: BackboneSpec, use_pyramid: bool) -> tuple[str, ...]:
    """Names :class:`Detectron2Backbone` can return: ``res2..res5`` (pyramid) or ``features()`` levels."""
    return PYRAMID_NAMES if use_pyramid else spec.feature_names


def default_out_features(spec: BackboneSpec, use_pyramid: bool) -> list[str]:
    """``res2..res5`` with the pyramid; otherwise the last four stages (hierarchical) or last block (plain)."""
    if use_pyramid:
        return list(PYRAMID_NAMES)
    return [spec.feature_names[-1]] if spec.plain else list(spec.feature_names[-4:])


def _as_names(value, label: str) -> list[str] | None:
    """A level list from a config value: a list/tuple of names, one name as a string, or empty/None."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value] if value.strip() else None
    names = list(value) if isinstance(value, Iterable) and not isinstance(value, Mapping) else None
    if names is None or any(not isinstance(v, str) for v in names):
        raise ConfigError(f"{label}: expected a list of level names such as ['res2', 'res3'], got {value!r}")
    return names or None


def _resolve_out_features(spec: BackboneSpec, out_features, use_pyramid: bool, label: str) -> list[str]:
    names = _as_names(out_features, label)
    if names is None:
        return default_out_features(spec, use_pyramid)
    valid = available_levels(spec, use_pyramid)
    unknown = [n for n in names if n not in valid]
    if unknown or len(set(names)) != len(names):
        mode = "pyramid levels (use_pyramid=True)" if use_pyramid else "feature levels (use_pyramid=False)"
        hint = "" if use_pyramid else f"; with use_pyramid=True the choices are {list(PYRAMID_NAMES)}"
        raise ConfigError(f"{label}: {spec.name} has no output(s) {unknown or names} (each at most once); "
                          f"its {mode} are {list(valid)}{hint}.")
    return [n for n in valid if n in names]  # detectron2 expects high-to-low resolution order


def _overrides(spec: BackboneSpec, use_pyramid: bool) -> dict[str, Any]:
    """Only the optional parts a detector runs (the neck when it uses the pyramid): others (a text
    tower, an unused neck) would be parameters without gradients, dead weight and a DDP error."""
    return {"parts": spec.needed_parts(pyramid=use_pyramid)}


def _check_weights_path(weights, label: str) -> None:
    if not isinstance(weights, (str, os.PathLike)):
        return
    text = os.fspath(weights)
    if looks_local(text) and not Path(text).expanduser().exists():
        raise ConfigError(f"{label}: checkpoint {text!r} not found (working directory {os.getcwd()}). "
                          "Give an existing .safetensors/.pt/.pth file, a hub-layout directory or a hub id.")


# -- the backbone ----------------------------------------------------------------------------------
class Detectron2Backbone(D2Backbone):
    """A backbone_sdk backbone as a detectron2 ``Backbone`` (``forward(x) -> {name: NCHW map}``).

    :param name: a registered backbone name (``backbone_sdk.list_backbones()``; ``plugin:name`` too).
    :param weights: checkpoint for :func:`backbone_sdk.create_backbone` (file, hub-layout directory,
        hub id or ``"hub"``), loaded strictly; foreign layouts (timm, torchvision...) are converted.
    :param weights_format: name the checkpoint layout instead of auto-detecting it.
    :param out_features: maps to return. With ``use_pyramid``: any of ``res2..res5`` (default all);
        without: ``features()`` levels (default the last four stages, or a plain ViT's last block).
    :param finetune: ``"none"``, ``"frozen"``, ``"stages:N"`` or ``"blocks:N"`` (see
        :mod:`backbone_sdk.adapters.finetune`; ``stages:N`` = detectron2 ``FREEZE_AT = N + 1``).
    :param freeze_at: detectron2's convention instead of ``finetune``, for any backbone: ``0`` trains
        everything, ``k`` freezes the stem and the first ``k - 1`` stages (blocks for plain ViTs).
    :param norm_eval: keep BatchNorm layers in eval mode (frozen statistics) while training.
    :param frozen_bn: BatchNorm layers as detectron2's ``FrozenBN``: fixed statistics and fixed
        affine parameters (ResNet; no effect on LayerNorm families).
    :param use_pyramid: return ``pyramid()`` levels (strides 4..32; a trainable simple feature
        pyramid for plain ViTs) instead of raw ``features()`` levels.
    :param grad_checkpoint: recompute backbone activations in backward to save memory.
    :param config_prefix: set by the yacs builders so errors name ``MODEL.BACKBONE_SDK.*`` keys.
    """

    def __init__(self, name: str, weights: Any = None, weights_format: str | None = None,
                 out_features: Sequence[str] | None = None, finetune: Any = "none", norm_eval: bool = False,
                 frozen_bn: bool = False, use_pyramid: bool = True, grad_checkpoint: bool = False,
                 freeze_at: int | None = None, *, config_prefix: str | None = None):
        super().__init__()

        def key(arg):
            return _label(arg, config_prefix)

        if not name:
            raise ConfigError(f"{key('name')}: empty; set a registered backbone name (backbone_sdk.list_backbones()).")
        spec = _checked(key("name"), get_spec, str(name))
        self.spec = spec
        self.use_pyramid = bool(use_pyramid)
        if self.use_pyramid and spec.pyramid is None and not spec.needed_parts(pyramid=True):
            raise ConfigError(f"{key('use_pyramid')}: {spec.name} has no pyramid (levels "
                              f"{[f.stride for f in spec.features]}, no neck); set use_pyramid=False.")
        self._out_features = _resolve_out_features(spec, out_features, self.use_pyramid, key("out_features"))
        if freeze_at is not None:
            finetune = _checked(key("finetune"), _freeze_at_policy, spec, freeze_at, finetune)
        policy = _checked(key("finetune"), FinetunePolicy.parse, finetune, bool(norm_eval), bool(frozen_bn))
        _check_weights_path(weights, key("weights"))
        try:
            self.body: Backbone = create_backbone(spec, weights=weights or None,
                                                  weights_format=weights_format or None,
                                                  **_overrides(spec, self.use_pyramid))
        except CheckpointError as exc:
            raise ConfigError(f"{key('weights')}: {exc}") from exc
        _checked(key("finetune"), apply_finetune, self.body, policy)
        if grad_checkpoint:
            self.body.set_grad_checkpointing(True)
        self._sources, infos = self._level_sources()
        self._out_feature_channels = {n: infos[n].channels for n in self._out_features}
        self._out_feature_strides = {n: infos[n].stride for n in self._out_features}
        self._size_divisibility = self._divisibility()

    @classmethod
    def from_config(cls, cfg: CfgNode, out_features: Sequence[str] | None = None) -> "Detectron2Backbone":
        """Build from ``cfg.MODEL.BACKBONE_SDK`` (see :func:`add_backbone_sdk_config`)."""
        node = _sdk_node(cfg)
        spec = _checked(f"{CFG_PREFIX}.NAME", get_spec, node.NAME) if node.NAME else None
        return cls(
            name=node.NAME, weights=node.WEIGHTS or None, weights_format=node.WEIGHTS_FORMAT or None,
            out_features=_as_names(node.OUT_FEATURES, f"{CFG_PREFIX}.OUT_FEATURES") or out_features,
            finetune=_policy_from_cfg(cfg, spec),
            norm_eval=node.NORM_EVAL, frozen_bn=node.FROZEN_BN, use_pyramid=node.USE_PYRAMID,
            grad_checkpoint=node.GRAD_CHECKPOINT,
            config_prefix=CFG_PREFIX,
        )

    def _level_sources(self):
        """Map every exposed name to the level of ``self.body`` it comes from, with its FeatureInfo."""
        if not self.use_pyramid:
            infos = {f.name: f for f in self.body.feature_info}
            return {n: n for n in infos}, infos
        pyramid = self.body.spec.pyramid
        # native pyramids are feature levels renamed: compute only those asked for, with early stop
        sources = pyramid.sources if pyramid.native else [p.name for p in pyramid.levels]
        return dict(zip(PYRAMID_NAMES, sources)), dict(zip(PYRAMID_NAMES, pyramid.levels))

    @property
    def _neck_pyramid(self) -> bool:
        return self.use_pyramid and not self.body.spec.pyramid.native

    def _divisibility(self) -> int:
        # the simple feature pyramid always computes strides 4..32 from a stride-16 grid
        stride = 32 if self._neck_pyramid else max(self._out_feature_strides.values())
        return math.lcm(stride, self.spec.input.patch_size or 1, self.spec.input.size_divisibility)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalized, padded images ``[B, 3, H, W]`` -> ``{name: map}`` for :attr:`out_features`."""
        if self._neck_pyramid:
            maps = self.body.pyramid(x)
        else:
            maps = self.body.features(x, [self._sources[n] for n in self._out_features])
        return {n: maps[self._sources[n]] for n in self._out_features}

    @property
    def out_features(self) -> list[str]:
        return list(self._out_features)

    @property
    def size_divisibility(self) -> int:
        """Largest output stride, combined (lcm) with the patch size for patch models."""
        return self._size_divisibility

    @property
    def padding_constraints(self) -> dict[str, int]:
        return {"size_divisibility": self._size_divisibility, "square_size": 0}

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
                for n in self._out_features}


#: deprecated name of :class:`Detectron2Backbone` (one release; it read too much like mmseg's ``BackboneSDK``)
SDKBackbone = Detectron2Backbone


def _freeze_at_policy(spec: BackboneSpec, freeze_at, finetune) -> FinetunePolicy:
    if isinstance(freeze_at, bool) or not isinstance(freeze_at, int) or not 0 <= freeze_at <= len(spec.features) + 1:
        raise ConfigError(f"freeze_at must be an int in [0, {len(spec.features) + 1}] for {spec.name}, got {freeze_at!r}")
    if finetune not in (None, "", "none"):
        raise ConfigError(f"set either freeze_at ({freeze_at}) or finetune ({finetune!r}), not both")
    return policy_for(spec, freeze_at - 1)


class SDKFPN(FPN):
    """detectron2's ``FPN``, but padding inputs to what the bottom-up needs as well as FPN's top stride.

    Stock ``FPN`` pads to its largest input stride (32); a patch-14 DINOv2 needs multiples of
    ``lcm(32, 14) = 224``. Drop-in for ``FPN`` in LazyConfigs (``model.backbone._target_ = SDKFPN``).
    """

    def __init__(self, bottom_up, in_features, out_channels, norm="", top_block=None, fuse_type="sum",
                 square_pad=0):
        super().__init__(bottom_up, in_features, out_channels, norm=norm, top_block=top_block,
                         fuse_type=fuse_type, square_pad=square_pad)
        self._size_divisibility = math.lcm(self._size_divisibility, bottom_up.size_divisibility or 1)

    @property
    def padding_constraints(self) -> dict[str, int]:
        return {"size_divisibility": self._size_divisibility, "square_size": self._square_pad}


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


# -- pixel pipeline --------------------------------------------------------------------------------
def _spec_of(source) -> BackboneSpec:
    if isinstance(source, BackboneSpec):
        return source
    if isinstance(source, (Backbone, Detectron2Backbone)):
        return source.spec
    return get_spec(str(source))


def expected_pixels(spec) -> tuple[str, list[float], list[float]]:
    """``("RGB", mean, std)`` in detectron2's 0-255 units for backbone ``spec`` (name, spec or model)."""
    spec = _spec_of(spec)
    return "RGB", [m * 255.0 for m in spec.input.mean], [s * 255.0 for s in spec.input.std]


def _is_lazy(cfg) -> bool:
    from omegaconf import DictConfig

    return isinstance(cfg, DictConfig)


def configure_pixels(cfg, spec):
    """Make detectron2 feed ``spec``'s preprocessing: RGB input, ``PIXEL_MEAN/STD = spec mean/std * 255``.

    ``cfg``: a yacs ``CfgNode`` (``INPUT.FORMAT``, ``MODEL.PIXEL_MEAN/STD``), a LazyConfig root
    (``model.*`` and ``dataloader.*.mapper.image_format``) or a LazyConfig model node.
    """
    fmt, mean, std = expected_pixels(spec)
    if isinstance(cfg, CfgNode):
        cfg.INPUT.FORMAT, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = fmt, mean, std
        return cfg
    if not _is_lazy(cfg):
        raise TypeError(f"configure_pixels takes a yacs CfgNode or a LazyConfig, got {type(cfg).__name__}")
    model = cfg.model if "model" in cfg else cfg
    model.pixel_mean, model.pixel_std, model.input_format = mean, std, fmt
    for split in ("train", "test"):
        mapper = _lazy_get(cfg, f"dataloader.{split}.mapper")
        if mapper is not None and "image_format" in mapper:
            mapper.image_format = fmt
    return cfg


def _lazy_get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if node is None or not hasattr(node, "keys") or part not in node:
            return None
        node = node[part]
    return node


def _find_sdk(module: nn.Module) -> Detectron2Backbone | None:
    return next((m for m in module.modules() if isinstance(m, Detectron2Backbone)), None)


def _pixel_settings(target) -> tuple[dict[str, Any], BackboneSpec | None]:
    """``{key label: value}`` of a yacs config, LazyConfig or built meta-architecture, and its backbone spec."""
    if isinstance(target, CfgNode):
        node = target.MODEL.get("BACKBONE_SDK")
        spec = get_spec(node.NAME) if node is not None and node.NAME else None
        return {"INPUT.FORMAT": target.INPUT.FORMAT, "MODEL.PIXEL_MEAN": list(target.MODEL.PIXEL_MEAN),
                "MODEL.PIXEL_STD": list(target.MODEL.PIXEL_STD)}, spec
    if isinstance(target, nn.Module):
        sdk = _find_sdk(target)
        return {"model.input_format": getattr(target, "input_format", None),
                "model.pixel_mean": target.pixel_mean.flatten().tolist(),
                "model.pixel_std": target.pixel_std.flatten().tolist()}, (sdk.spec if sdk else None)
    if _is_lazy(target):
        model = target.model if "model" in target else target
        values = {"model.input_format": model.get("input_format"), "model.pixel_mean": list(model.pixel_mean),
                  "model.pixel_std": list(model.pixel_std)}
        mapper = _lazy_get(target, "dataloader.train.mapper")
        if mapper is not None and "image_format" in mapper:
            values["dataloader.train.mapper.image_format"] = mapper.image_format
        name = _lazy_get(model, "backbone.bottom_up.name") or _lazy_get(model, "backbone.name")
        return values, (get_spec(name) if name else None)
    raise TypeError(f"check_pixels takes a yacs CfgNode, a LazyConfig or a built model, got {type(target).__name__}")


def check_pixels(target, spec=None) -> None:
    """Raise :class:`PixelMismatchError` naming every pixel key that disagrees with the backbone.

    ``target``: a yacs config, a LazyConfig (root or model node) or a built meta-architecture
    (``GeneralizedRCNN``...); ``spec`` defaults to the backbone the target names or contains.
    """
    values, found = _pixel_settings(target)
    spec = _spec_of(spec) if spec is not None else found
    if spec is None:
        raise ValueError("check_pixels: no backbone_sdk backbone found in the target; pass spec=")
    fmt, mean, std = expected_pixels(spec)
    problems = []
    for key, value in values.items():
        if key.endswith(("FORMAT", "format")):
            if value is not None and value != fmt:
                problems.append(f"{key} is {value!r}, expected {fmt!r}")
            continue
        want = mean if key.lower().endswith("mean") else std
        problems += [f"{key} {m}" for m in mismatches(value, want, scale=255.0)]
    if problems:
        raise PixelMismatchError(
            f"pixel settings disagree with {spec.name}'s preprocessing (RGB, 0-1 mean={spec.input.mean}, "
            f"std={spec.input.std}; detectron2 uses 0-255): " + "; ".join(problems) + ". Fix: call "
            f"backbone_sdk.integrations.detectron2.configure_pixels(cfg, {spec.name!r}), or set "
            f"{CFG_PREFIX}.ALLOW_PIXEL_MISMATCH=True if the images are normalized differently on purpose."
        )


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
