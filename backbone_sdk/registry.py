"""The registry of backbone specs, filled by the plugins the :class:`PluginManager` loads.

Names: built-in plugins load first and keep their names. A plugin that registers a name another
plugin already holds keeps its other variants; the conflicting ones are reported (both plugins
named) and stay reachable under the qualified name ``plugin:name``. Every spec can be addressed as
``plugin:name`` (e.g. ``"resnet:resnet50"``).
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import logging
import threading
from typing import Iterator

import attrs

from .errors import CheckpointError, InvalidOptionError, PluginError, UnknownBackboneError
from .plugin_manager import DISABLE_ENV, PLUGIN_FAILURES, PluginManager, PluginRecord, _entry_points
from .specs import BackboneSpec

__all__ = [
    "PluginRecord", "Registry", "SpecRegistrar", "default_registry", "plugin_report", "list_backbones", "get_spec",
    "register_plugin", "unregister_plugin", "use_registry", "active_registry", "DISABLE_ENV",
]

log = logging.getLogger(__name__)


@attrs.define
class SpecRegistrar:
    """What ``register_backbones(registry)`` receives: collects one plugin's specs."""

    plugin: str
    specs: list[BackboneSpec] = attrs.Factory(list)

    def add(self, spec: BackboneSpec) -> None:
        """Register one variant."""
        if not isinstance(spec, BackboneSpec):
            raise TypeError(f"registry.add() takes a BackboneSpec, got {type(spec).__name__}")
        self.specs.append(spec)

    def __call__(self, spec: BackboneSpec) -> None:
        """Deprecated spelling of :meth:`add` (plugins written as ``register_backbones(register)``)."""
        self.add(spec)


class Registry:
    """Backbone specs by name, with the plugin manager that supplies them."""

    def __init__(self, entry_points=_entry_points):
        self.plugins = PluginManager(entry_points)
        self._lock = threading.RLock()
        self._loaded = False
        self._specs: dict[str, BackboneSpec] = {}
        self._qualified: dict[str, BackboneSpec] = {}

    @property
    def pm(self):
        return self.plugins.pm

    def ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if not self._loaded:
                self.plugins.discover(self._collect)
                self._loaded = True

    # -- registration ----------------------------------------------------------------------------
    def register_plugin(self, plugin, name: str | None = None) -> PluginRecord:
        """Register an in-process plugin object or module (tests, notebooks, applications)."""
        self.ensure_loaded()
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        with self._lock:
            held = self.plugins.records.get(name)
            if held is not None and held.ok:
                raise PluginError(f"a plugin named {name!r} is already registered")
            record = PluginRecord(name=name, module=getattr(plugin, "__name__", repr(plugin)))
            self.plugins.records[name] = record
            if self.plugins.add(plugin, record):
                self._collect(record)
            return record

    def unregister_plugin(self, name: str) -> None:
        with self._lock:
            record = self.plugins.records.get(name)
            if record is None:
                raise PluginError(f"no plugin named {name!r}")
            for backbone in record.backbones:
                self._specs.pop(backbone, None)
            for key in [k for k, s in self._qualified.items() if s.plugin == name]:
                del self._qualified[key]
            self.plugins.remove(name)

    def _collect(self, record: PluginRecord) -> None:
        record.on_demand = record.name in self.plugins.implementers("resolve_backbone")
        registrar = SpecRegistrar(record.name)
        try:
            self.plugins.hook_of("register_backbones", record.name)(registry=registrar, register=registrar)
        except PLUGIN_FAILURES as exc:
            self.plugins.remove(record.name)
            self.plugins.records[record.name] = record
            self.plugins.fail(record, f"register_backbones raised {type(exc).__name__}: {exc}")
            return
        names = [s.name for s in registrar.specs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            self.plugins.remove(record.name)
            self.plugins.records[record.name] = record
            self.plugins.fail(record, f"registers names twice: {', '.join(map(repr, twice))}; rename its variants")
            return
        for spec in registrar.specs:
            spec = spec.evolve(plugin=record.name)
            self._qualified[f"{record.name}:{spec.name}"] = spec
            holder = self._specs.get(spec.name)
            if holder is not None:
                record.shadowed.append(spec.name)
                log.warning("backbone_sdk: plugin %r registers %r, which plugin %r holds; the name stays with %r and "
                            "this variant is reachable as %r", record.name, spec.name, holder.plugin, holder.plugin,
                            f"{record.name}:{spec.name}")
                continue
            self._specs[spec.name] = spec
            record.backbones.append(spec.name)

    # -- hooks -----------------------------------------------------------------------------------
    def convert_checkpoint(self, spec: BackboneSpec, state_dict, source_format: str | None):
        """The owner plugin's conversion, else the first converter plugin's (plugins without backbones)."""
        self.ensure_loaded()
        candidates = [spec.plugin] if spec.plugin and self.pm.has_plugin(spec.plugin) else []
        candidates += [n for n in self.plugins.implementers("convert_checkpoint")
                       if n not in candidates and not self.plugins.records.get(n, PluginRecord(n, "")).backbones]
        failures = []
        for name in candidates:
            try:
                result = self.plugins.hook_of("convert_checkpoint", name)(
                    spec=spec, state_dict=state_dict, source_format=source_format)
            except PLUGIN_FAILURES as exc:
                failures.append(f"plugin {name!r} raised {type(exc).__name__}: {exc}")
                continue
            if result is not None:
                return result
        if failures:
            raise CheckpointError(f"no plugin converted the checkpoint for {spec.name}; " + "; ".join(failures)
                                  + f". Fix or disable the plugin ({DISABLE_ENV}), or pass a native state dict.")
        return None

    # -- queries ---------------------------------------------------------------------------------
    def specs(self) -> dict[str, BackboneSpec]:
        self.ensure_loaded()
        return self._specs

    def records(self) -> list[PluginRecord]:
        self.ensure_loaded()
        return list(self.plugins.records.values())

    def get(self, name) -> BackboneSpec:
        if isinstance(name, BackboneSpec):
            return name
        if not isinstance(name, str) or not name.strip():
            raise InvalidOptionError(f"a backbone name must be a non-empty string, got {name!r}; see "
                                     "backbone_sdk.list_backbones() (or `backbone-sdk list`).")
        specs = self.specs()
        found = self._qualified.get(name) if ":" in name else specs.get(name)
        if found is not None:
            return found
        failures: list[str] = []
        found = self._resolve(name, failures)
        if found is not None:
            return found
        pool = list(self._qualified) if ":" in name else list(specs)
        where = None
        if failures:
            where = ("Plugins that resolve names on demand failed: " + "; ".join(failures)
                     + f". Fix or disable them ({DISABLE_ENV}).")
        raise UnknownBackboneError(name, difflib.get_close_matches(name, pool, n=5, cutoff=0.5), where)

    def _resolve(self, name: str, failures: list[str]) -> BackboneSpec | None:
        """Ask the ``resolve_backbone`` plugins for a name nobody registered; cache what they return."""
        plugin, sep, short = name.partition(":") if ":" in name else ("", "", name)
        resolvers = self.plugins.implementers("resolve_backbone")
        if sep:
            resolvers = [p for p in resolvers if p == plugin]
        for resolver in resolvers:
            try:
                spec = self.plugins.hook_of("resolve_backbone", resolver)(name=short)
            except UnknownBackboneError:
                raise  # the plugin owns this namespace and has no such model: its own suggestions
            except PLUGIN_FAILURES as exc:
                failures.append(f"plugin {resolver!r} raised {type(exc).__name__}: {exc}")
                log.warning("backbone_sdk: plugin %r failed to resolve %r: %s: %s", resolver, short,
                            type(exc).__name__, exc)
                continue
            if spec is None:
                continue
            if not isinstance(spec, BackboneSpec) or spec.name != short:
                failures.append(f"plugin {resolver!r} resolved {short!r} to {spec!r}, not a BackboneSpec named "
                                f"{short!r}")
                continue
            with self._lock:  # another thread may have resolved it meanwhile: keep the first
                spec = self._qualified.setdefault(f"{resolver}:{short}", spec.evolve(plugin=resolver))
                if short not in self._specs:
                    self._specs[short] = spec
                    self.plugins.records[resolver].backbones.append(short)
                return spec if sep else self._specs[short]
        return None

    def names(self, pattern: str = "*", include_test: bool = True) -> list[str]:
        return sorted(n for n, s in self.specs().items()
                      if fnmatch.fnmatchcase(n, pattern) and (include_test or not s.is_test))


default_registry = Registry()
_active = [default_registry]


def active_registry() -> Registry:
    """The registry the module-level functions use (``default_registry`` unless :func:`use_registry`)."""
    return _active[-1]


@contextlib.contextmanager
def use_registry(registry: Registry) -> Iterator[Registry]:
    """Make ``registry`` the active one inside the block (test isolation, embedded applications)."""
    _active.append(registry)
    try:
        yield registry
    finally:
        _active.remove(registry)


def list_backbones(pattern: str = "*", include_test: bool = False) -> list[str]:
    """Sorted names of registered backbones matching a glob ``pattern`` (e.g. ``"vit_*"``).

    The tiny random-init ``*_test`` variants (for tests and examples) are left out unless
    ``include_test=True``, as in ``backbone-sdk list``."""
    return active_registry().names(pattern, include_test=include_test)


def get_spec(name: str | BackboneSpec) -> BackboneSpec:
    """The :class:`BackboneSpec` registered as ``name`` (or ``plugin:name``); unknown names list close matches."""
    return active_registry().get(name)


def plugin_report() -> list[PluginRecord]:
    """Every discovered plugin with its distribution, version, backbones and error (if any)."""
    return active_registry().records()


def register_plugin(plugin, name: str | None = None) -> PluginRecord:
    """Register an in-process plugin (a module or object with ``@hookimpl`` functions)."""
    return active_registry().register_plugin(plugin, name)


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered with :func:`register_plugin` and its backbones."""
    active_registry().unregister_plugin(name)
