"""The plugin manager: discovers plugins lazily and keeps the registry of backbone specs.

Entry points of the ``backbone_sdk`` group are loaded once, on first use, never at import time.
A plugin that fails to import, raises while registering, or registers a name that is already
taken is recorded in :func:`plugin_report` and skipped; the others keep working.
Set ``BACKBONE_SDK_DISABLE_PLUGINS=name1,name2`` to block plugins by entry-point name.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib.metadata
import logging
import os
import threading
import traceback
from typing import Iterable

import attrs
import pluggy

from .errors import CheckpointError, PluginError, UnknownBackboneError
from .hookspecs import PROJECT_NAME, BackboneSpecs
from .specs import BackboneSpec

__all__ = [
    "PluginRecord", "Registry", "default_registry", "plugin_report", "list_backbones", "get_spec",
    "register_plugin", "unregister_plugin",
]

log = logging.getLogger(__name__)
#: what a plugin may raise without taking the host down (SystemExit: a plugin calling sys.exit())
_PLUGIN_FAILURES = (Exception, SystemExit)
DISABLE_ENV = "BACKBONE_SDK_DISABLE_PLUGINS"


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

    @property
    def ok(self) -> bool:
        return self.error is None and not self.disabled


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=PROJECT_NAME)


class Registry:
    """Owns a pluggy manager and the specs its plugins registered."""

    def __init__(self, entry_points=_entry_points):
        self._entry_points = entry_points
        self._lock = threading.RLock()
        self._loaded = False
        self._specs: dict[str, BackboneSpec] = {}
        self._records: dict[str, PluginRecord] = {}
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(BackboneSpecs)

    # -- discovery ---------------------------------------------------------------------------
    def ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            disabled = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
            for ep in sorted(_unique(self._entry_points()), key=lambda e: e.name):
                self._load_entry_point(ep, disabled)
            self._loaded = True

    def _load_entry_point(self, ep, disabled: set[str]) -> None:
        dist = getattr(ep, "dist", None)
        record = PluginRecord(
            name=ep.name,
            module=ep.value,
            distribution=dist.metadata["Name"] if dist is not None else None,
            version=dist.version if dist is not None else None,
        )
        self._records[ep.name] = record
        if ep.name in disabled:
            record.disabled = True
            return
        try:
            plugin = ep.load()
        except _PLUGIN_FAILURES as exc:  # a broken third-party plugin must not break the others
            self._fail(record, f"import failed: {type(exc).__name__}: {exc}")
            return
        self._register_plugin(plugin, record)

    def register_plugin(self, plugin, name: str | None = None) -> PluginRecord:
        """Register an in-process plugin object or module (tests, notebooks, applications)."""
        self.ensure_loaded()
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        with self._lock:
            if name in self._records and self._records[name].ok:
                raise PluginError(f"a plugin named {name!r} is already registered")
            record = PluginRecord(name=name, module=getattr(plugin, "__name__", repr(plugin)))
            self._records[name] = record
            self._register_plugin(plugin, record)
            return record

    def unregister_plugin(self, name: str) -> None:
        with self._lock:
            record = self._records.pop(name, None)
            if record is None:
                raise PluginError(f"no plugin named {name!r}")
            for backbone in record.backbones:
                self._specs.pop(backbone, None)
            if self.pm.has_plugin(name):
                self.pm.unregister(name=name)

    def _register_plugin(self, plugin, record: PluginRecord) -> None:
        try:
            self.pm.register(plugin, name=record.name)
            self.pm.check_pending()
        except Exception as exc:
            if self.pm.has_plugin(record.name):
                self.pm.unregister(name=record.name)
            self._fail(record, f"invalid plugin: {type(exc).__name__}: {exc}")
            return
        pending: list[BackboneSpec] = []
        impls = [i for i in self.pm.hook.register_backbones.get_hookimpls() if i.plugin_name == record.name]
        try:
            for impl in impls:
                impl.function(register=lambda spec: pending.append(_check_spec(spec)))
        except _PLUGIN_FAILURES as exc:
            self.pm.unregister(name=record.name)
            self._fail(record, f"register_backbones raised {type(exc).__name__}: {exc}")
            return
        taken = [s.name for s in pending if s.name in self._specs]
        dupes = {s.name for s in pending if [p.name for p in pending].count(s.name) > 1}
        if taken or dupes:
            self.pm.unregister(name=record.name)
            owners = {n: self._specs[n].plugin for n in taken}
            detail = [f"{n!r} (taken by plugin {owners[n]!r})" for n in taken]
            detail += [f"{n!r} (registered twice by this plugin)" for n in sorted(dupes)]
            self._fail(record, f"registers names that are not free: {', '.join(detail)}; rename its variants")
            return
        for spec in pending:
            self._specs[spec.name] = spec.evolve(plugin=record.name)
            record.backbones.append(spec.name)

    @staticmethod
    def _fail(record: PluginRecord, message: str) -> None:
        record.error = message
        log.warning("backbone_sdk plugin %r skipped: %s", record.name, message)
        log.debug("%s", traceback.format_exc())

    # -- hooks -------------------------------------------------------------------------------
    def convert_checkpoint(self, spec: BackboneSpec, state_dict, source_format: str | None):
        """The first non-``None`` ``convert_checkpoint`` result, in pluggy's call order.

        A plugin whose hook raises is logged and skipped, so that it cannot break loading for
        other families; if no plugin converts and some raised, :class:`CheckpointError` names them.
        """
        self.ensure_loaded()
        args = {"spec": spec, "state_dict": state_dict, "source_format": source_format}
        failures = []
        for impl in reversed(self.pm.hook.convert_checkpoint.get_hookimpls()):
            try:
                result = impl.function(*(args[a] for a in impl.argnames))
            except _PLUGIN_FAILURES as exc:
                failures.append(f"plugin {impl.plugin_name!r} raised {type(exc).__name__}: {exc}")
                log.warning("backbone_sdk plugin %r: convert_checkpoint failed for %s: %s", impl.plugin_name,
                            spec.name, exc)
                continue
            if result is not None:
                return result
        if failures:
            raise CheckpointError(f"no plugin converted the checkpoint for {spec.name}; " + "; ".join(failures)
                                  + ". Fix or disable the plugin (BACKBONE_SDK_DISABLE_PLUGINS), or pass a native "
                                  "state dict.")
        return None

    # -- queries -----------------------------------------------------------------------------
    def specs(self) -> dict[str, BackboneSpec]:
        self.ensure_loaded()
        return self._specs

    def records(self) -> list[PluginRecord]:
        self.ensure_loaded()
        return list(self._records.values())

    def get(self, name: str) -> BackboneSpec:
        specs = self.specs()
        try:
            return specs[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(specs), n=5, cutoff=0.5)
            raise UnknownBackboneError(name, close) from None

    def names(self, pattern: str = "*", include_test: bool = True) -> list[str]:
        return sorted(
            n for n, s in self.specs().items()
            if fnmatch.fnmatchcase(n, pattern) and (include_test or not s.is_test)
        )


def _unique(eps):
    seen = set()
    for ep in eps:
        if ep.name not in seen:
            seen.add(ep.name)
            yield ep


def _check_spec(spec) -> BackboneSpec:
    if not isinstance(spec, BackboneSpec):
        raise TypeError(f"register() takes a BackboneSpec, got {type(spec).__name__}")
    return spec


default_registry = Registry()


def list_backbones(pattern: str = "*", include_test: bool = True) -> list[str]:
    """Sorted names of registered backbones matching a glob ``pattern`` (e.g. ``"vit_*"``)."""
    return default_registry.names(pattern, include_test=include_test)


def get_spec(name: str) -> BackboneSpec:
    """The :class:`BackboneSpec` registered as ``name``; unknown names list the closest matches."""
    return default_registry.get(name)


def plugin_report() -> list[PluginRecord]:
    """Every discovered plugin with its distribution, version, backbones and error (if any)."""
    return default_registry.records()


def register_plugin(plugin, name: str | None = None) -> PluginRecord:
    """Register an in-process plugin (a module or object with ``@hookimpl`` functions)."""
    return default_registry.register_plugin(plugin, name)


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered with :func:`register_plugin` and its backbones."""
    default_registry.unregister_plugin(name)
