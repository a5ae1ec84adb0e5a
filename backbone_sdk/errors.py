"""Exceptions raised by backbone_sdk.

Every error says what is wrong and how to fix it. They subclass the built-in exception a caller
would naturally catch (``ValueError``, ``TypeError``, ``KeyError``), so existing handlers keep working.
"""

from __future__ import annotations

__all__ = [
    "BackboneSDKError",
    "UnknownBackboneError",
    "InputShapeError",
    "InputDtypeError",
    "CheckpointError",
    "CheckpointMismatchError",
    "PluginError",
    "MissingDependencyError",
    "InvalidOptionError",
    "LayerIndexError",
    "UnsupportedOperationError",
]


class BackboneSDKError(Exception):
    """Base class of every error raised by backbone_sdk."""


class UnknownBackboneError(BackboneSDKError, KeyError):
    """A backbone name that no plugin registered."""

    def __init__(self, name: str, close: list[str], where: str | None = None):
        self.name = name
        self.close = close
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        where = where or "Run `backbone-sdk list` (or backbone_sdk.list_backbones()) to see every registered name."
        super().__init__(f"Unknown backbone {name!r}.{hint} {where}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class InputShapeError(BackboneSDKError, ValueError):
    """Images whose rank, channel count or spatial size the backbone cannot take."""


class InputDtypeError(BackboneSDKError, TypeError):
    """Images of a dtype the backbone cannot take (e.g. uint8 instead of normalized float)."""


class CheckpointError(BackboneSDKError, ValueError):
    """A checkpoint that cannot be found, read, verified or converted."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint whose keys or shapes do not match the backbone (strict loading)."""

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


class InvalidOptionError(BackboneSDKError, ValueError):
    """An argument or architecture override that is unknown or out of range (the message names the
    accepted values)."""


class LayerIndexError(InvalidOptionError, IndexError):
    """A layer / level index outside what the backbone has, or not an integer."""


class UnsupportedOperationError(BackboneSDKError, NotImplementedError):
    """A call this backbone cannot answer (e.g. ``pyramid()`` of a family without stride 4-32 levels
    or neck); the message says what the backbone offers instead."""


class PluginError(BackboneSDKError, RuntimeError):
    """A plugin that failed to load or to register its backbones."""


class MissingDependencyError(BackboneSDKError, ImportError):
    """An optional framework (detectron2, mmseg, ...) that an integration needs is not installed."""


def require(module: str, extra: str):
    """Import ``module`` or raise :class:`MissingDependencyError` naming the pip extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module} is required here but could not be imported ({exc}). "
            f"Install it with `pip install 'backbone-sdk[{extra}]'` (see README.md for detectron2/mmcv)."
        ) from exc
