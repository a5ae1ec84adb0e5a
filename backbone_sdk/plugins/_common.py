"""Helpers shared by the built-in plugins (not part of the public API)."""

from __future__ import annotations

import contextlib
import io
import logging

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers.convert import has_keys, rename, split_qkv, strip_prefixes

__all__ = ["run", "hf_model", "read_hf_pretrained", "has_keys", "rename", "split_qkv", "strip_prefixes"]

SDPA = "sdpa"


def run(fn, x, checkpointed: bool, *args, owner: nn.Module | None = None):
    """Call ``fn(x, *args)``, recomputing it in backward when gradient checkpointing is on and
    backward will reach it: ``x`` requires grad, or ``owner`` (default ``fn``) has trainable
    parameters (the first unfrozen stage after a frozen stem gets an input without grad)."""
    if checkpointed and torch.is_grad_enabled() and (x.requires_grad or _trainable(owner or fn)):
        return checkpoint(fn, x, *args, use_reentrant=False)
    return fn(x, *args)


def _trainable(module) -> bool:
    return isinstance(module, nn.Module) and any(p.requires_grad for p in module.parameters())


def hf_model(model_cls, config, **kwargs) -> nn.Module:
    """Build a transformers model from a config with SDPA attention, randomly initialized."""
    config._attn_implementation = SDPA
    return model_cls(config, **kwargs)


@contextlib.contextmanager
def _quiet_transformers():
    """Keep transformers' loading reports (key tables, warnings) off stdout and out of the log."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(level)


def read_hf_pretrained(inner: nn.Module, directory: str, prefix: str = "model.") -> dict[str, torch.Tensor] | None:
    """State dict (keys under ``prefix``) of a transformers ``save_pretrained`` directory read through
    ``type(inner).from_pretrained``, which also renames keys of older transformers versions.

    Keys ``from_pretrained`` had to initialize are dropped, so strict loading reports them as
    missing; keys of modules the backbone does not use (poolers, heads) are ignored.
    """
    from transformers import PreTrainedModel

    if not isinstance(inner, PreTrainedModel):
        return None
    with _quiet_transformers():
        loaded, info = type(inner).from_pretrained(directory, config=inner.config, output_loading_info=True)
    logging.getLogger(__name__).debug("transformers loading info for %s: %s", directory, info)
    absent = set(info.get("missing_keys", ())) | {m[0] if isinstance(m, tuple) else m
                                                 for m in info.get("mismatched_keys", ())}
    ours = inner.state_dict()
    return {f"{prefix}{k}": v for k, v in loaded.state_dict().items() if k in ours and k not in absent}
