"""The SDK backbone as a detectron2 ``Backbone`` (and ``SDKFPN``), usable from yacs and LazyConfigs."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import Backbone as D2Backbone
from detectron2.modeling.backbone.fpn import FPN

from ...adapters.finetune import FinetunePolicy, apply_finetune, policy_for
from ...backbone import Backbone
from ...errors import CheckpointError
from ...factory import create_backbone
from ...registry import get_spec
from ...specs import BackboneSpec
from ...weights import looks_local
from ._common import CFG_PREFIX, PYRAMID_NAMES, ConfigError, _checked, _label


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
        from .config import _policy_from_cfg, _sdk_node

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


