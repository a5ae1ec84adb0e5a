"""Frozen metadata describing a backbone: what it takes, what it returns, where weights live.

Specs are cheap to build and never construct a model, so plugins can register hundreds of
variants at import time and ``list_backbones()`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

import attrs

__all__ = ["InputSpec", "FeatureInfo", "BackboneSpec", "Tokens", "IMAGENET_MEAN", "IMAGENET_STD", "CLIP_MEAN", "CLIP_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _triple(value) -> tuple[float, float, float]:
    value = tuple(float(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"expected 3 per-channel values (RGB), got {value}")
    return value


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"expected (height, width), got {value}")
    return value


def _positive(instance, attribute, value):
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


@attrs.frozen
class InputSpec:
    """What images a backbone takes.

    ``mean``/``std`` are RGB in the 0-1 range. ``size_divisibility`` is a hard requirement on H and W
    (the patch size of a ViT; 1 for families that take any size, such as ResNet and Swin, which pads
    internally). ``crop_pct`` is the evaluation center-crop ratio used by :func:`preprocess`.
    """

    mean: tuple[float, float, float] = attrs.field(default=IMAGENET_MEAN, converter=_triple)
    std: tuple[float, float, float] = attrs.field(default=IMAGENET_STD, converter=_triple)
    image_size: tuple[int, int] = attrs.field(default=(224, 224), converter=_pair)
    patch_size: int | None = None
    size_divisibility: int = attrs.field(default=1, validator=_positive)
    min_size: int = attrs.field(default=32, validator=_positive)
    channels: int = 3
    interpolation: str = "bicubic"
    crop_pct: float = 0.875


@attrs.frozen
class FeatureInfo:
    """One feature level: its name, channel count and stride relative to the input."""

    name: str
    channels: int = attrs.field(validator=_positive)
    stride: int = attrs.field(validator=_positive)


@attrs.frozen(kw_only=True)
class BackboneSpec:
    """Everything known about a backbone variant without building it.

    ``builder`` is a callable or an ``"module:function"`` string taking the spec and returning a
    :class:`~backbone_sdk.Backbone`; the string form keeps registration free of heavy imports.
    ``config`` holds the architecture hyper-parameters the builder reads.
    """

    name: str
    family: str
    builder: Callable[..., Any] | str = attrs.field(repr=False)
    input: InputSpec = attrs.field(factory=InputSpec)
    features: tuple[FeatureInfo, ...] = attrs.field(converter=tuple)
    embed_dim: int
    config: Mapping[str, Any] = attrs.field(factory=dict, converter=lambda c: dict(c), eq=False, repr=False)
    hub_id: str | None = None
    description: str = ""
    is_test: bool = False
    plain: bool = False
    capabilities: frozenset[str] = attrs.field(factory=frozenset, converter=frozenset)
    plugin: str | None = attrs.field(default=None, eq=False)

    @features.validator
    def _check_features(self, attribute, value):
        if not value:
            raise ValueError(f"{self.name}: a spec needs at least one feature level")
        names = [f.name for f in value]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate feature level names {names}")

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def feature(self, name: str) -> FeatureInfo:
        for info in self.features:
            if info.name == name:
                return info
        raise KeyError(name)

    def resolve_builder(self) -> Callable[..., Any]:
        if callable(self.builder):
            return self.builder
        module, _, func = self.builder.partition(":")
        return getattr(importlib.import_module(module), func)

    def evolve(self, **changes) -> "BackboneSpec":
        return attrs.evolve(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (used for safetensors metadata and the CLI)."""
        return {
            "name": self.name,
            "family": self.family,
            "embed_dim": self.embed_dim,
            "hub_id": self.hub_id,
            "plain": self.plain,
            "is_test": self.is_test,
            "input": attrs.asdict(self.input),
            "features": [attrs.asdict(f) for f in self.features],
            "config": dict(self.config),
        }


@attrs.frozen
class Tokens:
    """Token outputs of a transformer backbone.

    ``patches``: ``[B, N, D]`` with ``N = grid[0] * grid[1]`` in row-major order; ``cls``: ``[B, D]``
    or ``None``; ``registers``: ``[B, R, D]`` (DINOv2 register tokens, distillation token) or ``None``.
    For CNNs, ``patches`` is the flattened last feature map.
    """

    patches: Any
    grid: tuple[int, int]
    cls: Any = None
    registers: Any = None
