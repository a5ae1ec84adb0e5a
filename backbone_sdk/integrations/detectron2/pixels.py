"""Pixel pipeline: make detectron2 feed the backbone's preprocessing, and check that it does."""

from __future__ import annotations

from typing import Any

from detectron2.config import CfgNode
from torch import nn

from ...backbone import Backbone
from ...pixels import mismatches
from ...registry import get_spec
from ...specs import BackboneSpec
from ._common import CFG_PREFIX, PixelMismatchError
from .backbone import Detectron2Backbone


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


