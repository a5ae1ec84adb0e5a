"""``BackboneSDKHook``: pixel checks at the start of a run and weights_only-loadable Runner checkpoints."""

from __future__ import annotations

import logging
from typing import Mapping

import torch
from mmengine.hooks import Hook
from mmseg.registry import HOOKS

log = logging.getLogger(__name__)
from .preprocess import check_data_preprocessor

# -- runner hook: checks and weights_only-loadable checkpoints -------------------------------------
_HISTORY = "__mmengine_history_buffer__"


def safe_checkpoint(obj):
    """A copy of (part of) an mmengine checkpoint that ``torch.load(weights_only=True)`` can read.

    ``HistoryBuffer`` objects (whose pickles call ``getattr``) become plain dicts of tensors, numpy
    scalars become Python numbers and numpy arrays lists. :func:`restore_checkpoint` undoes the
    ``HistoryBuffer`` part.
    """
    import numpy as np
    from mmengine.logging import HistoryBuffer

    if isinstance(obj, HistoryBuffer):
        log, count = obj.data
        return {_HISTORY: True, "log": torch.as_tensor(np.asarray(log)), "count": torch.as_tensor(np.asarray(count)),
                "max_length": int(obj.max_length)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Mapping):
        return type(obj)((k, safe_checkpoint(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(safe_checkpoint(v) for v in obj)
    return obj


def restore_checkpoint(obj):
    """Undo :func:`safe_checkpoint` for ``HistoryBuffer`` objects (so the message hub resumes fully)."""
    from mmengine.logging import HistoryBuffer

    if isinstance(obj, Mapping) and obj.get(_HISTORY) is True:
        return HistoryBuffer(obj["log"].numpy(), obj["count"].numpy(), obj["max_length"])
    if isinstance(obj, Mapping):
        return type(obj)((k, restore_checkpoint(v)) for k, v in obj.items())
    return obj


@HOOKS.register_module()
class BackboneSDKHook(Hook):
    """Runner hook for configs using :class:`BackboneSDK`: ``custom_hooks=[dict(type='BackboneSDKHook')]``.

    - before training/testing, runs :func:`check_data_preprocessor` on the model (``check=False``
      turns it off, ``bgr_input=False`` for pipelines that load RGB);
    - writes checkpoints that load with ``torch.load(weights_only=True)``, so that resuming works on
      torch>=2.6 (where mmengine 0.10's plain ``torch.load`` rejects its own ``HistoryBuffer``
      pickles) without turning safe loading off. The model and optimizer states are unchanged.
    """

    priority = "VERY_LOW"  # after other hooks added their entries to the checkpoint

    def __init__(self, check: bool = True, bgr_input: bool = True, safe_checkpoints: bool = True):
        self.check = check
        self.bgr_input = bgr_input
        self.safe_checkpoints = safe_checkpoints

    def before_run(self, runner) -> None:
        if self.check:
            check_data_preprocessor(runner.model, bgr_input=self.bgr_input)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.safe_checkpoints:
            for key in [k for k in checkpoint if k not in ("state_dict", "optimizer")]:
                checkpoint[key] = safe_checkpoint(checkpoint[key])

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if "message_hub" in checkpoint:
            checkpoint["message_hub"] = restore_checkpoint(checkpoint["message_hub"])

