"""Creating backbones by name."""

from __future__ import annotations

import logging
from typing import Any

from .backbone import Backbone
from .errors import CheckpointError
from .registry import get_spec

__all__ = ["create_backbone"]

log = logging.getLogger(__name__)
_warned_random: set[str] = set()


def create_backbone(
    name: str,
    weights: Any = None,
    *,
    weights_format: str | None = None,
    strict: bool = True,
    sha256: str | None = None,
    device=None,
    dtype=None,
    **overrides,
) -> Backbone:
    """Build the backbone registered as ``name``.

    :param weights: ``None`` (random init), ``"hub"`` (the spec's published ``hub_id``), a hub id,
        a local directory in hub layout, a ``.safetensors``/``.pt``/``.pth``/``.bin`` file, or a
        state dict. Foreign layouts (timm, torchvision, OpenAI CLIP, original DINOv2) are detected
        and converted; pass ``weights_format`` to name the layout explicitly.
    :param overrides: architecture overrides merged into ``spec.config`` (e.g. ``with_pyramid=False``).
    """
    spec = get_spec(name)
    if overrides:
        spec = spec.evolve(config={**spec.config, **overrides})
    builder = spec.resolve_builder()
    model = builder(spec)
    if not isinstance(model, Backbone):
        raise TypeError(f"builder of {name!r} returned {type(model).__name__}, not a backbone_sdk.Backbone")
    if weights is None:
        if name not in _warned_random:
            _warned_random.add(name)
            log.warning("%s: no weights given, parameters are randomly initialized", name)
    else:
        from .weights import load_weights

        if isinstance(weights, str) and weights == "hub":
            if not spec.hub_id:
                raise CheckpointError(f"{name} has no published hub id, so weights='hub' cannot be resolved; pass a "
                                      "checkpoint file, a hub-layout directory or a hub id instead.")
            weights = spec.hub_id
        model.load_report = load_weights(model, weights, weights_format=weights_format, strict=strict, sha256=sha256)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model
