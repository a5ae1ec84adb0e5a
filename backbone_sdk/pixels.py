"""Pixel statistics checks shared by the framework integrations (one tolerance everywhere)."""

from __future__ import annotations

from typing import Sequence

__all__ = ["TOLERANCE", "mismatches", "close"]

#: largest accepted difference of a configured per-channel mean/std from the spec's, in 0-255 units:
#: configs round the statistics to one or two decimals (CLIP's 122.7709 is often written 122.77)
TOLERANCE = 0.05


def close(got: Sequence[float], want: Sequence[float], scale: float = 255.0) -> bool:
    """Whether ``got`` matches ``want`` channel by channel within :data:`TOLERANCE` (``scale``: units of
    ``got``/``want`` per 0-1 value, 255 for 0-255 configs)."""
    got, want = list(got), list(want)
    return len(got) == len(want) and all(abs(g - w) * 255.0 / scale <= TOLERANCE for g, w in zip(got, want))


def mismatches(got, want: Sequence[float], scale: float = 255.0) -> list[str]:
    """``[]`` if ``got`` is close to ``want``, else one message ``"is [...], expected [...]"``."""
    if got is not None and close(got, want, scale):
        return []
    shown = "unset" if got is None else _fmt(got)
    return [f"is {shown}, expected {_fmt(want)}"]


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"
