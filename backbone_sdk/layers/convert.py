"""State-dict rewriting helpers for checkpoint converters (plugins' ``convert_checkpoint``)."""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

import torch

__all__ = ["rename", "split_fused", "split_qkv", "has_keys", "strip_prefixes", "convert_detected"]


def rename(state: Mapping[str, torch.Tensor], rules: Iterable[tuple[str, str | Callable[[re.Match[str]], str]]],
           drop: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Apply regex ``(pattern, replacement)`` rules in order to every key; drop keys matching ``drop``."""
    compiled = [(re.compile(p), r) for p, r in rules]
    drops = [re.compile(d) for d in drop]
    out = {}
    for key, value in state.items():
        if any(d.search(key) for d in drops):
            continue
        for pattern, repl in compiled:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def split_fused(state: dict[str, torch.Tensor], suffix: str, targets: Callable[[str], tuple[str, ...]]):
    """Split every tensor whose key ends in ``suffix`` along dim 0 into ``len(targets(prefix))``
    equal parts stored under the keys ``targets(prefix)`` (``prefix`` = the key without ``suffix``)."""
    for key in [k for k in state if k.endswith(suffix)]:
        value = state.pop(key)
        names = targets(key[: -len(suffix)])
        for name, part in zip(names, value.chunk(len(names), dim=0)):
            state[name] = part.contiguous()
    return state


def split_qkv(state: dict[str, torch.Tensor], fused: str, separate: str = "{c}_proj") -> dict[str, torch.Tensor]:
    """Split fused qkv ``weight``/``bias`` tensors (keys ``<prefix>.<fused>.weight``) into
    ``<prefix>.<separate with c = q, k, v>.weight``."""
    for kind in ("weight", "bias"):
        def targets(p: str, kind: str = kind) -> tuple[str, ...]:
            return tuple(f"{p}.{separate.format(c=c)}.{kind}" for c in "qkv")

        split_fused(state, f".{fused}.{kind}", targets)
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


def convert_detected(state: Mapping[str, torch.Tensor], source_format: str | None, detected: str | None,
                     converters: Mapping[str, Callable], same_layout: Iterable[Iterable[str]] = ()):
    """The common body of a ``convert_checkpoint`` hook: ``(converters[fmt](state), fmt)`` where ``fmt``
    is the requested ``source_format`` (or, when ``None``, the ``detected`` layout), if the state dict
    really has that layout; else ``None`` (not this plugin's checkpoint, or not in the asked-for format).

    ``same_layout``: groups of format names whose state dicts look alike (e.g. an original release and
    timm's copy of it): a requested format of the group is accepted when detection found another one.
    """
    if detected is None:
        return None
    fmt = source_format or detected
    if fmt not in converters:
        return None
    if fmt != detected and not any({fmt, detected} <= set(group) for group in same_layout):
        return None
    return converters[fmt](state), fmt
