"""Plugin discovery and isolation: entry points, the block list, built-in precedence, the report.

Entry points of the ``backbone_sdk`` group are loaded once, on first use, never at import time.
The built-in plugins (modules of ``backbone_sdk.plugins``) load first, so their names are theirs
whatever third parties install; a third-party entry point with a built-in plugin's name is
reported and skipped. A plugin that fails to import, implements an unknown hook or raises while
registering is recorded in the report and skipped; the others keep working.
Set ``BACKBONE_SDK_DISABLE_PLUGINS=name1,name2`` to block plugins by entry-point name.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import traceback
from typing import Callable, Iterable

import attrs
import pluggy

from .hookspecs import PROJECT_NAME, BackboneHookSpec

__all__ = ["PluginRecord", "PluginManager", "DISABLE_ENV", "BUILTIN_PREFIX"]

log = logging.getLogger(__name__)
#: what a plugin may raise without taking the host down (SystemExit: a plugin calling sys.exit())
PLUGIN_FAILURES = (Exception, SystemExit)
DISABLE_ENV = "BACKBONE_SDK_DISABLE_PLUGINS"
#: modules of the built-in plugins
BUILTIN_PREFIX = "backbone_sdk.plugins."


@attrs.define
class PluginRecord:
    """What happened to one plugin: where it came from, what it registered, how it failed."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    backbones: list[str] = attrs.Factory(list)
    error: str | None = None
    disabled: bool = False
    builtin: bool = False
    #: names this plugin registered that another plugin already held (reachable as ``plugin:name``)
    shadowed: list[str] = attrs.Factory(list)
    #: implements ``resolve_backbone``: more names than ``backbones`` resolve through it, on demand
    on_demand: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.disabled


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=PROJECT_NAME)


def _is_builtin(ep) -> bool:
    return str(getattr(ep, "value", "")).startswith(BUILTIN_PREFIX)


class PluginManager:
    """Owns the pluggy manager; loads plugins and calls their hooks one plugin at a time, so that
    a failing plugin is attributed and skipped. ``on_loaded(plugin, record)`` receives each plugin
    that registered cleanly."""

    def __init__(self, entry_points: Callable[[], Iterable] = _entry_points):
        self._entry_points = entry_points
        self.records: dict[str, PluginRecord] = {}
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(BackboneHookSpec)

    # -- discovery ---------------------------------------------------------------------------
    def discover(self, on_loaded: Callable[[PluginRecord], None]) -> None:
        disabled = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
        eps = sorted(self._entry_points(), key=lambda e: (not _is_builtin(e), e.name, str(e.value)))
        for ep in eps:
            record = self._record(ep)
            if record is None:
                continue
            if ep.name in disabled:
                record.disabled = True
                continue
            try:
                plugin = ep.load()
            except PLUGIN_FAILURES as exc:  # a broken third-party plugin must not break the others
                self.fail(record, f"import failed: {type(exc).__name__}: {exc}")
                continue
            if self.add(plugin, record):
                on_loaded(record)

    def _record(self, ep) -> PluginRecord | None:
        dist = getattr(ep, "dist", None)
        record = PluginRecord(name=ep.name, module=ep.value, builtin=_is_builtin(ep),
                              distribution=dist.metadata["Name"] if dist is not None else None,
                              version=dist.version if dist is not None else None)
        holder = self.records.get(ep.name)
        if holder is None:
            self.records[ep.name] = record
            return record
        if holder.module == record.module:
            return None  # the same entry point seen twice (e.g. an editable install and its egg-info)
        key = f"{record.distribution or record.module}:{ep.name}"
        record.name = key
        self.records[key] = record
        self.fail(record, f"entry-point name {ep.name!r} is taken by plugin {holder.module!r} "
                          f"({'built-in' if holder.builtin else holder.distribution or 'loaded first'}); "
                          "rename the entry point of this distribution")
        return None

    def add(self, plugin, record: PluginRecord) -> bool:
        """Register ``plugin`` with pluggy under ``record.name``; ``False`` (and reported) if invalid."""
        try:
            self.pm.register(plugin, name=record.name)
            self.pm.check_pending()
        except Exception as exc:
            if self.pm.has_plugin(record.name):
                self.pm.unregister(name=record.name)
            self.fail(record, f"invalid plugin: {type(exc).__name__}: {exc}")
            return False
        return True

    def remove(self, name: str) -> None:
        self.records.pop(name, None)
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)

    @staticmethod
    def fail(record: PluginRecord, message: str) -> None:
        record.error = message
        log.warning("backbone_sdk plugin %r skipped: %s", record.name, message)
        log.debug("%s", traceback.format_exc())

    # -- hooks -------------------------------------------------------------------------------
    def hook_of(self, hook: str, plugin_name: str):
        """Call ``hook`` of one plugin only (so that a failure is attributed to it): the plugin's
        implementation receives the arguments it declares, as pluggy passes them. (pluggy's
        ``subset_hook_caller`` needs hashable plugins, which module-like namespaces are not.)"""
        impls = [i for i in getattr(self.pm.hook, hook).get_hookimpls() if i.plugin_name == plugin_name]

        def call(**kwargs):
            result = None
            for impl in impls:
                result = impl.function(*(kwargs[a] for a in impl.argnames))
            return result

        return call

    def implementers(self, hook: str) -> list[str]:
        """Plugin names implementing ``hook``, in pluggy's call order."""
        return [impl.plugin_name for impl in reversed(getattr(self.pm.hook, hook).get_hookimpls())]
