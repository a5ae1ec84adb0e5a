"""Helpers shared by the built-in plugins (not part of the public API)."""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

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


def rename(state: Mapping[str, torch.Tensor], rules: Iterable[tuple[str, str]],
           drop: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Apply regex ``(pattern, replacement)`` rules in order to every key; drop keys matching ``drop``."""
    rules = [(re.compile(p), r) for p, r in rules]
    drops = [re.compile(d) for d in drop]
    out = {}
    for key, value in state.items():
        if any(d.search(key) for d in drops):
            continue
        for pattern, repl in rules:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def split_qkv(state: dict[str, torch.Tensor], fused_suffix: str, targets: Callable[[str], tuple[str, str, str]]):
    """Split fused ``[3D, ...]`` qkv tensors (keys ending in ``fused_suffix``) into q, k, v keys."""
    for key in [k for k in state if k.endswith(fused_suffix)]:
        value = state.pop(key)
        for name, part in zip(targets(key[: -len(fused_suffix)]), value.chunk(3, dim=0)):
            state[name] = part.contiguous()
    return state


def has_keys(state: Mapping[str, torch.Tensor], *prefixes: str) -> bool:
    return all(any(k.startswith(p) for k in state) for p in prefixes)


def strip_prefixes(state: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    """Remove the first matching prefix from every key (e.g. ``resnet.`` of a classification model)."""
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out
