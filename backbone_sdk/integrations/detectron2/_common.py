"""Names and error helpers shared by the Detectron2 glue modules."""

from __future__ import annotations

import logging

from ...backbone import PYRAMID_LEVELS
from ...errors import BackboneSDKError

log = logging.getLogger(__name__)

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


