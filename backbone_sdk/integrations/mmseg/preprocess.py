"""``SegDataPreProcessor`` settings that match a backbone's normalization, and the check that they do."""

from __future__ import annotations

import logging
from typing import Mapping

import torch
from mmengine.model import is_model_wrapper

from ...pixels import close
from ...registry import get_spec
from .backbone import MMSegBackbone

log = logging.getLogger(__name__)


# -- data preprocessing ----------------------------------------------------------------------------
def data_preprocessor_for(name: str, size: tuple[int, int] | int | None = None) -> dict:
    """A ``SegDataPreProcessor`` config matching the backbone's normalization (0-255 images, BGR files).

    ``size`` pads training batches to that size (crop size); test batches are padded to the
    backbone's size divisibility (a ViT's patch size).
    """
    spec = get_spec(name)
    cfg = dict(type="SegDataPreProcessor", mean=[round(m * 255, 6) for m in spec.input.mean],
               std=[round(s * 255, 6) for s in spec.input.std], bgr_to_rgb=True, pad_val=0, seg_pad_val=255)
    if size is not None:
        cfg["size"] = (size, size) if isinstance(size, int) else tuple(size)
    div = spec.input.size_divisibility
    if size is None:
        cfg["size_divisor"] = div  # mmseg needs one of size / size_divisor to batch training images
    if div > 1:
        cfg["test_cfg"] = dict(size_divisor=div)
    return cfg


def _get(obj, key, default=None):
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _from_model(model) -> tuple[str, dict]:
    model = model.module if is_model_wrapper(model) else model
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, MMSegBackbone):
        raise ValueError(f"{type(model).__name__} has no BackboneSDK backbone to check against")
    dp = getattr(model, "data_preprocessor", None)
    normalizes = getattr(dp, "_enable_normalize", False)
    found = dict(mean=dp.mean.flatten().tolist() if normalizes else None,
                 std=dp.std.flatten().tolist() if normalizes else None,
                 flips=bool(getattr(dp, "channel_conversion", False)))
    return backbone.spec.name, found


def _from_config(cfg) -> tuple[str, dict]:
    model = _get(cfg, "model") or cfg
    backbone = _get(model, "backbone") or {}
    if _get(backbone, "type") not in ("BackboneSDK", MMSegBackbone):
        raise ValueError(f"model.backbone is {_get(backbone, 'type')!r}, not BackboneSDK; nothing to check")
    dp = _get(model, "data_preprocessor") or _get(cfg, "data_preprocessor") or {}
    found = dict(mean=_get(dp, "mean"), std=_get(dp, "std"),
                 flips=bool(_get(dp, "bgr_to_rgb", False) or _get(dp, "rgb_to_bgr", False)))
    if _get(dp, "rgb_to_bgr", False):
        found["flips"] = "rgb_to_bgr"
    return _get(backbone, "name"), found


def check_data_preprocessor(cfg_or_model, bgr_input: bool = True) -> None:
    """Raise ``ValueError`` unless the segmentor normalizes images the way its backbone expects.

    Accepts an mmengine ``Config``/``ConfigDict`` (full config or ``model`` section) or a built
    segmentor. Checks ``mean``/``std`` (0-255 scale) against the backbone spec and that BGR-loaded
    images (mmseg's ``LoadImageFromFile``) are flipped to RGB; pass ``bgr_input=False`` if your
    pipeline already loads RGB.
    """
    is_module = isinstance(cfg_or_model, torch.nn.Module)
    name, found = _from_model(cfg_or_model) if is_module else _from_config(cfg_or_model)
    spec = get_spec(name)
    fix = f"use data_preprocessor=data_preprocessor_for({name!r}, crop_size) from backbone_sdk.integrations.mmseg"
    problems = []
    for key, want in (("mean", spec.input.mean), ("std", spec.input.std)):
        got, expected = found[key], [round(v * 255, 4) for v in want]
        if got is None:
            problems.append(f"{key} is not set (images would reach {name} unnormalized); expected {expected}")
        elif not close(got, expected):
            problems.append(f"{key}={list(got)} but {name} was trained with {key}={expected} (RGB, 0-255)")
    if found["flips"] == "rgb_to_bgr":
        problems.append(f"rgb_to_bgr=True feeds BGR images, but {name} expects RGB")
    elif bgr_input and not found["flips"]:
        problems.append("bgr_to_rgb is not set: mmseg loads images as BGR, so the backbone would see BGR "
                        "(set bgr_to_rgb=True, or check_data_preprocessor(..., bgr_input=False) for RGB pipelines)")
    elif not bgr_input and found["flips"]:
        problems.append("the channels are flipped, but the pipeline loads RGB: the backbone would see BGR")
    if problems:
        lines = "\n  ".join(problems)
        raise ValueError(f"data_preprocessor does not match the backbone:\n  {lines}\nFix: {fix}.")


