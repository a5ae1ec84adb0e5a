"""Creating backbones by name."""

from __future__ import annotations

import logging
from typing import Any

from .backbone import Backbone
from .errors import InvalidOptionError
from .registry import get_spec
from .specs import BackboneSpec

__all__ = ["create_backbone"]

log = logging.getLogger(__name__)
_warned_random: set[str] = set()


def create_backbone(
    name: str | BackboneSpec,
    weights: Any = None,
    *,
    weights_format: str | None = None,
    strict: bool = True,
    sha256: str | None = None,
    device=None,
    dtype=None,
    **overrides,
) -> Backbone:
    """Build the backbone registered as ``name`` (or ``plugin:name``, or a spec).

    :param weights: ``None`` (random init), ``"hub"`` (the spec's published ``hub_id``), a hub id,
        a local directory in hub layout, a ``.safetensors``/``.pt``/``.pth``/``.bin`` file, or a
        state dict. Foreign layouts (timm, torchvision, OpenAI CLIP, original DINOv2) are detected
        and converted; pass ``weights_format`` to name the layout explicitly.
    :param overrides: fields of the family's config (``spec.option_names``), e.g. ``depth=6`` or
        ``parts=()`` to leave out optional parts (neck, text tower). Unknown names or invalid values
        raise :class:`~backbone_sdk.InvalidOptionError`; the spec of the result describes its outputs.
    """
    spec = get_spec(name).with_config(**overrides)
    model = spec.resolve_builder()(spec)
    if not isinstance(model, Backbone):
        raise TypeError(f"builder of {spec.name!r} returned {type(model).__name__}, not a backbone_sdk.Backbone")
    if weights is None:
        if spec.name not in _warned_random:
            _warned_random.add(spec.name)
            log.warning("%s: no weights given, parameters are randomly initialized", spec.name)
    else:
        from .weights import load_weights, resolve_source

        model.load_report = load_weights(model, resolve_source(spec, weights), weights_format=weights_format,
                                         strict=strict, sha256=sha256)
    if device is not None or dtype is not None:
        try:
            model.to(device=device, dtype=dtype)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise InvalidOptionError(f"create_backbone({spec.name!r}): cannot move to device={device!r}, "
                                     f"dtype={dtype!r}: {exc}") from exc
    return model
