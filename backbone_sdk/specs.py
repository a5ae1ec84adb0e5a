"""Frozen metadata describing a backbone: what it takes, what it returns, where weights live.

Specs are cheap to build and never construct a model, so plugins can register hundreds of
variants and ``list_backbones()`` stays fast. A spec's architecture lives in a typed, frozen
:class:`BackboneConfig` (one subclass per family); everything the spec states about outputs
(``features``, ``embed_dim``, ``prefix_tokens``, ``pyramid``) is derived from that config, so
:meth:`BackboneSpec.with_config` can never leave the two disagreeing.
"""

from __future__ import annotations

import difflib
import importlib
import warnings
from typing import Any, Callable, ClassVar, Mapping

import attrs

from .errors import InvalidOptionError

__all__ = [
    "InputSpec", "FeatureInfo", "PrefixTokens", "PyramidSpec", "BackboneConfig", "BackboneSpec", "Tokens",
    "NECK", "PYRAMID_LEVELS", "IMAGENET_MEAN", "IMAGENET_STD", "CLIP_MEAN", "CLIP_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Names and strides of the maps returned by :meth:`Backbone.pyramid`.
PYRAMID_LEVELS = (("p2", 4), ("p3", 8), ("p4", 16), ("p5", 32))
#: the optional part that builds ``pyramid()`` for families without native stride 4-32 levels
NECK = "neck"


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


def positive(instance, attribute, value):
    """attrs validator: an ``int`` >= 1 (``bool`` refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be an integer >= 1, got {value!r}")


def non_negative(instance, attribute, value):
    """attrs validator: an ``int`` >= 0 (``bool`` refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name} must be an integer >= 0, got {value!r}")


def positive_ints(instance, attribute, value):
    """attrs validator: a non-empty tuple of integers >= 1."""
    if not value or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
        raise ValueError(f"{attribute.name} must be a non-empty sequence of integers >= 1, got {value!r}")


def divides(field: str):
    """attrs validator factory: an ``int`` >= 1 that divides the (earlier) field ``field`` (e.g. heads of dim)."""
    def check(instance, attribute, value):
        positive(instance, attribute, value)
        total = getattr(instance, field)
        if total % value:
            raise ValueError(f"{attribute.name}={value} must divide {field}={total}")
    return check


def count_of(n: int):
    """attrs validator factory: a tuple of exactly ``n`` integers >= 1 (e.g. one per stage)."""
    def check(instance, attribute, value):
        positive_ints(instance, attribute, value)
        if len(value) != n:
            raise ValueError(f"{attribute.name} must have {n} entries (one per stage), got {value!r}")
    return check


def positive_float(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{attribute.name} must be a number > 0, got {value!r}")


def _non_empty(instance, attribute, value):
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{attribute.name} must be a non-empty string, got {value!r}")


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
    size_divisibility: int = attrs.field(default=1, validator=positive)
    min_size: int = attrs.field(default=32, validator=positive)
    channels: int = attrs.field(default=3, validator=positive)
    interpolation: str = "bicubic"
    crop_pct: float = attrs.field(default=0.875, validator=positive_float)


@attrs.frozen
class FeatureInfo:
    """One feature level: its name, channel count and stride relative to the input."""

    name: str = attrs.field(validator=_non_empty)
    channels: int = attrs.field(validator=positive)
    stride: int = attrs.field(validator=positive)


@attrs.frozen
class PrefixTokens:
    """Tokens before the patch tokens in a transformer's sequence, in this order: CLS,
    distillation (DeiT), registers (DINOv2 with registers). CNNs and CLS-less ViTs have none."""

    cls: bool = False
    distillation: bool = False
    registers: int = attrs.field(default=0, validator=non_negative)

    @property
    def count(self) -> int:
        return int(self.cls) + int(self.distillation) + self.registers

    @property
    def extra(self) -> int:
        """Prefix tokens other than CLS (what :class:`Tokens` calls ``registers``)."""
        return self.count - int(self.cls)


@attrs.frozen
class PyramidSpec:
    """What :meth:`Backbone.pyramid` returns and where it comes from.

    ``levels``: ``p2..p5`` at strides 4, 8, 16, 32. ``sources``: the ``features()`` levels it is made
    of, four of them (renamed, ``native``) or one (fed to the simple-feature-pyramid neck).
    """

    levels: tuple[FeatureInfo, ...] = attrs.field(converter=tuple)
    sources: tuple[str, ...] = attrs.field(converter=tuple)

    @property
    def native(self) -> bool:
        return len(self.sources) == len(self.levels)

    @levels.validator
    def _check(self, attribute, value):
        got = [(f.name, f.stride) for f in value]
        if got != list(PYRAMID_LEVELS):
            raise ValueError(f"pyramid levels must be exactly {list(PYRAMID_LEVELS)}, got {got}")
        if len(self.sources) not in (1, len(value)):
            raise ValueError(f"a pyramid is made of 1 (neck) or 4 (native) levels, got {self.sources}")


def derive_pyramid(features, parts: frozenset[str], neck_channels: int) -> PyramidSpec | None:
    """Native ``p2..p5`` when four levels have strides 4, 8, 16, 32; else the neck's, if included."""
    by_stride: dict[int, FeatureInfo] = {}
    for info in features:
        by_stride.setdefault(info.stride, info)
    strides = [s for _, s in PYRAMID_LEVELS]
    if all(s in by_stride for s in strides):
        chosen = [by_stride[s] for s in strides]
        # ignore[misc]: mypy's attrs plugin cannot solve the type variable of ``converter=tuple``
        return PyramidSpec([FeatureInfo(p, f.channels, s) for (p, s), f in zip(PYRAMID_LEVELS, chosen)],  # type: ignore[misc]
                           [f.name for f in chosen])  # type: ignore[misc]
    if NECK in parts:
        return PyramidSpec([FeatureInfo(p, neck_channels, s) for p, s in PYRAMID_LEVELS],  # type: ignore[misc]
                           [features[-1].name])
    return None


@attrs.frozen(kw_only=True)
class BackboneConfig:
    """Base class of the typed, frozen architecture config of a family.

    Subclasses add attrs fields (with validators and defaults) and implement :meth:`feature_info`
    and :meth:`embedding_dim`; a transformer also implements :meth:`prefix_tokens` and
    :attr:`plain`. ``parts`` lists the optional parts to include (``None``: all of
    :meth:`optional_parts`); ``neck_channels`` is the width of the simple feature pyramid built
    for families whose levels are not at strides 4-32.
    """

    #: optional parts the family itself defines (e.g. a text tower), besides the core's ``"neck"``
    OPTIONAL_PARTS: ClassVar[frozenset[str]] = frozenset()

    parts: frozenset[str] | None = attrs.field(default=None, converter=attrs.converters.optional(frozenset))
    neck_channels: int = attrs.field(default=256, validator=positive)

    def feature_info(self, input: InputSpec) -> tuple[FeatureInfo, ...]:
        raise NotImplementedError

    def embedding_dim(self) -> int:
        raise NotImplementedError

    def prefix_tokens(self) -> PrefixTokens:
        return PrefixTokens()

    @property
    def plain(self) -> bool:
        """Single-scale transformers whose levels are blocks (``block{i}``), not stages."""
        return False

    def input_spec(self, input: InputSpec) -> InputSpec:
        """The input spec this config implies (e.g. a patch size change); default unchanged."""
        return input

    def optional_parts(self, features) -> frozenset[str]:
        natively = derive_pyramid(features, frozenset(), self.neck_channels) is not None
        return self.OPTIONAL_PARTS | (frozenset() if natively else {NECK})

    def included_parts(self, features) -> frozenset[str]:
        available = self.optional_parts(features)
        if self.parts is None:
            return available
        unknown = sorted(self.parts - available)
        if unknown:
            raise InvalidOptionError(f"parts={sorted(self.parts)}: no optional part(s) {unknown}; this backbone's "
                                     f"optional parts are {sorted(available) or 'none'}")
        return self.parts

    def derive(self, input: InputSpec) -> dict[str, Any]:
        """The spec fields that follow from this config (used by :class:`BackboneSpec`)."""
        input = self.input_spec(input)
        features = tuple(self.feature_info(input))
        parts = self.included_parts(features)
        default_width = attrs.fields(BackboneConfig).neck_channels.default
        if NECK not in self.optional_parts(features) and self.neck_channels != default_width:
            raise InvalidOptionError(f"neck_channels={self.neck_channels} does not apply: the levels already have "
                                     "strides 4-32, so pyramid() returns them (with their own widths)")
        return {"input": input, "features": features, "embed_dim": self.embedding_dim(),
                "prefix_tokens": self.prefix_tokens(), "plain": self.plain, "parts": parts,
                "pyramid": derive_pyramid(features, parts, self.neck_channels)}


#: deprecated override names (one release): what they now mean
_LEGACY_PART_FLAGS = {"with_pyramid": NECK, "with_text": "text"}


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


@attrs.frozen(kw_only=True)
class BackboneSpec:
    """Everything known about a backbone variant without building it.

    ``builder`` is a callable or an ``"module:function"`` string taking the spec and returning a
    :class:`~backbone_sdk.Backbone`; the string form keeps registration free of heavy imports.
    ``config`` is the family's :class:`BackboneConfig`; build specs with :meth:`from_config` so that
    ``features``, ``embed_dim``, ``prefix_tokens``, ``pyramid`` and ``parts`` are derived from it.
    """

    name: str = attrs.field(validator=_non_empty)
    family: str = attrs.field(validator=_non_empty)
    builder: Callable[..., Any] | str = attrs.field(repr=False)
    input: InputSpec = attrs.field(factory=InputSpec)
    features: tuple[FeatureInfo, ...] = attrs.field(converter=tuple)
    embed_dim: int = attrs.field(validator=positive)
    config: BackboneConfig | None = attrs.field(default=None, eq=False, repr=False)
    prefix_tokens: PrefixTokens = attrs.field(factory=PrefixTokens)
    pyramid: PyramidSpec | None = None
    parts: frozenset[str] = attrs.field(factory=frozenset, converter=frozenset)
    hub_id: str | None = None
    description: str = ""
    is_test: bool = False
    plain: bool = False
    capabilities: frozenset[str] = attrs.field(factory=frozenset, converter=frozenset)
    plugin: str | None = attrs.field(default=None, eq=False)

    def __attrs_post_init__(self):
        if self.pyramid is None and self.config is None:
            # specs built without a config still get the native pyramid their strides allow
            object.__setattr__(self, "pyramid", derive_pyramid(self.features, self.parts, 256))

    @features.validator
    def _check_features(self, attribute, value):
        if not value:
            raise ValueError(f"{self.name}: a spec needs at least one feature level")
        names = [f.name for f in value]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate feature level names {names}")
        strides = [f.stride for f in value]
        if any(b < a for a, b in zip(strides, strides[1:])):
            raise ValueError(f"{self.name}: feature strides must not decrease, got {strides}")

    @config.validator
    def _check_config(self, attribute, value):
        if value is not None and not isinstance(value, BackboneConfig):
            raise TypeError(f"{self.name}: config must be a backbone_sdk.BackboneConfig subclass instance, got "
                            f"{type(value).__name__}; declare the architecture as a frozen attrs class.")

    @classmethod
    def from_config(cls, config: BackboneConfig, *, input: InputSpec | None = None, **fields) -> "BackboneSpec":
        """A spec whose output metadata is derived from ``config`` (the way every plugin should build one)."""
        return cls(config=config, **{**fields, **config.derive(input or InputSpec())})

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def feature(self, name: str) -> FeatureInfo:
        for info in self.features:
            if info.name == name:
                return info
        raise KeyError(name)

    def has(self, capability: str) -> bool:
        """Whether this spec's model offers ``capability`` (e.g. ``"text"``): declared in
        ``capabilities`` and, when it is an optional part, included in ``parts``."""
        if capability not in self.capabilities:
            return False
        optional = self.config.optional_parts(self.features) if self.config is not None else frozenset()
        return capability not in optional or capability in self.parts

    def needed_parts(self, pyramid: bool = False) -> frozenset[str]:
        """The optional parts a consumer needs: the neck if it calls ``pyramid()`` and the
        pyramid is not native, nothing else (pass as ``create_backbone(..., parts=...)``)."""
        if self.config is None:
            return frozenset()
        optional = self.config.optional_parts(self.features)
        return frozenset({NECK}) & optional if pyramid else frozenset()

    @property
    def option_names(self) -> tuple[str, ...]:
        """Names :func:`~backbone_sdk.create_backbone` accepts as overrides for this spec."""
        if self.config is None:
            return ()
        return tuple(a.name for a in attrs.fields(type(self.config)) if a.init)

    def with_config(self, **overrides) -> "BackboneSpec":
        """This spec with config fields changed; outputs are re-derived. Unknown or invalid values
        raise :class:`~backbone_sdk.InvalidOptionError` naming the field and the accepted ones."""
        if not overrides:
            return self
        overrides = self._legacy_flags(dict(overrides))
        if self.config is None:
            raise InvalidOptionError(f"{self.name} takes no architecture overrides (its spec has no config); "
                                     f"got {sorted(overrides)}")
        names = self.option_names
        for key in overrides:
            if key not in names:
                hint = _suggest(key, names) or _suggest(key, _LEGACY_PART_FLAGS)
                if hint and not _suggest(key, names):
                    hint += " (deprecated: optional parts are chosen with parts=..., e.g. parts=())"
                raise InvalidOptionError(f"{self.name}: unknown option {key!r}.{hint} "
                                         f"Options of {type(self.config).__name__}: {', '.join(names)}.")
        try:
            config = attrs.evolve(self.config, **overrides)
            return attrs.evolve(self, config=config, **config.derive(self.input))
        except InvalidOptionError as exc:
            raise InvalidOptionError(f"{self.name}: {exc}") from None
        except (ValueError, TypeError) as exc:
            raise InvalidOptionError(f"{self.name}: invalid option value ({exc}).") from None

    def _legacy_flags(self, overrides: dict) -> dict:
        for flag, part in _LEGACY_PART_FLAGS.items():
            if flag not in overrides:
                continue
            warnings.warn(f"create_backbone({flag}=...) is deprecated; pass parts=... (the optional parts to "
                          f"include, e.g. parts=() for none)", DeprecationWarning, stacklevel=4)
            keep = overrides.pop(flag)
            current = set(overrides["parts"]) if overrides.get("parts") is not None else set(self.parts)
            if part in (self.config.optional_parts(self.features) if self.config is not None else ()):
                current = current | {part} if keep else current - {part}
            overrides["parts"] = frozenset(current)
        return overrides

    def resolve_builder(self) -> Callable[..., Any]:
        if callable(self.builder):
            return self.builder
        module, _, func = self.builder.partition(":")
        return getattr(importlib.import_module(module), func)

    def evolve(self, **changes) -> "BackboneSpec":
        return attrs.evolve(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (used for safetensors metadata and the CLI)."""
        config = None if self.config is None else attrs.asdict(self.config, value_serializer=_jsonable)
        return {
            "name": self.name,
            "family": self.family,
            "embed_dim": self.embed_dim,
            "hub_id": self.hub_id,
            "plain": self.plain,
            "is_test": self.is_test,
            "input": attrs.asdict(self.input),
            "features": [attrs.asdict(f) for f in self.features],
            "prefix_tokens": attrs.asdict(self.prefix_tokens),
            "parts": sorted(self.parts),
            "config": config,
        }


def _jsonable(inst, field, value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value


@attrs.frozen
class Tokens:
    """Token outputs of a backbone.

    ``patches``: ``[B, N, D]`` with ``N = grid[0] * grid[1]`` in row-major order; ``cls``: ``[B, D]``
    or ``None``; ``registers``: ``[B, R, D]`` (the prefix tokens after CLS: DeiT's distillation token,
    DINOv2 registers) or ``None``. For CNNs, ``patches`` is the flattened feature map.

    Padded batches of images with different patch grids (SigLIP 2 NaFlex) also carry ``mask``
    (``[B, N]`` bool, ``True`` for real tokens) and ``grids`` (each image's grid); their ``grid`` is
    ``None`` unless all images share one.
    """

    patches: Any
    grid: tuple[int, int] | None
    cls: Any = None
    registers: Any = None
    mask: Any = None
    grids: list[tuple[int, int]] | None = None


def config_fields(config: BackboneConfig | Mapping | None) -> dict[str, Any]:
    """The fields of a config as a plain dict (for display)."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    return attrs.asdict(config, value_serializer=_jsonable)
