"""The bridge's hooks: names resolved on demand, and timm checkpoints converted to the bridge's layout.

Nothing is registered up front: timm has well over a thousand architectures (and more pretrained
tags), so ``register_backbones`` adds none and ``resolve_backbone`` builds the spec of a
``timm/<model>[.<tag>]`` name the first time it is looked up. Listing stays as cheap as before the
bridge was installed; timm is imported only when a ``timm/`` name is resolved.
"""

from __future__ import annotations

import backbone_sdk as bs

from . import PREFIX

FAMILY = "timm"


@bs.hookimpl
def register_backbones(registry):
    """Registers nothing: every name is resolved on demand (see :func:`resolve_backbone`)."""


@bs.hookimpl
def resolve_backbone(name):
    if not name.startswith(PREFIX):
        return None
    from .model import make_spec

    return make_spec(name)


@bs.hookimpl
def convert_checkpoint(spec, state_dict, source_format):
    """timm's own layout (what ``timm.create_model(...).state_dict()`` and the ``timm/`` hub repos
    hold) to the bridge's: keys under ``model.``, the classifier left out (the bridge's model has none)."""
    if spec.family != FAMILY or source_format not in (None, "timm"):
        return None
    if not state_dict or all(k.startswith("model.") for k in state_dict):
        return None
    classifier = tuple(f"{c}." for c in spec.config.classifier)
    state = {f"model.{k}": v for k, v in state_dict.items() if not k.startswith(classifier)}
    return state, "timm"
