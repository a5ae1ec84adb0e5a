"""The backbone_sdk hook specification.

A plugin is any module or object with functions marked ``@hookimpl``. Publish it through the
``backbone_sdk`` entry-point group, e.g. in ``pyproject.toml``::

    [project.entry-points.backbone_sdk]
    my_family = "my_package.backbones"

and ``pip install`` the distribution. Built-in families use the same group.
"""

from __future__ import annotations

import pluggy

__all__ = ["PROJECT_NAME", "hookspec", "hookimpl", "BackboneHookSpec", "BackboneSpecs"]

PROJECT_NAME = "backbone_sdk"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class BackboneHookSpec:
    """Hook specifications (pluggy validates implementations against these signatures)."""

    @hookspec
    def register_backbones(self, registry, register):
        """Register every backbone variant the plugin provides.

        :param registry: a :class:`~backbone_sdk.registry.SpecRegistrar`; call ``registry.add(spec)``
            once per :class:`~backbone_sdk.BackboneSpec`. Registration must not build models or
            import heavy modules: the spec's ``builder`` is resolved only when the backbone is created.
        :param register: the same object under its earlier name (deprecated): ``register(spec)``.
        """

    @hookspec(firstresult=True)
    def resolve_backbone(self, name):
        """Build the spec of a backbone name that no plugin registered, on demand.

        For plugins whose names are too many to register up front (a bridge to a model zoo of
        thousands): ``register_backbones`` registers none of them, and this hook is asked when a name
        is looked up (``create_backbone``, ``get_spec``) and not found. The spec it returns is added to
        the registry under the plugin's name, so ``list_backbones()`` shows it from then on. Like
        registration, resolving must not build a full model or load weights.

        :param name: the name looked up, e.g. ``"timm/convnext_tiny"``; for ``"plugin:name"`` only
            that plugin is asked, with the part after the colon.
        :return: a :class:`~backbone_sdk.BackboneSpec` whose ``name`` is ``name``, or ``None`` when
            the name is not the plugin's. A plugin that owns the name's namespace but has no such
            model raises :class:`~backbone_sdk.UnknownBackboneError` with its own close matches;
            any other exception is reported against the plugin and the next one is asked.
        """

    @hookspec(firstresult=True)
    def convert_checkpoint(self, spec, state_dict, source_format):
        """Convert a foreign checkpoint layout into the backbone's native state-dict keys.

        Asked first of the plugin that registered ``spec``; when that one returns ``None``, of the
        converter plugins (those that register no backbones), which must check ``spec.family``.

        :param spec: the :class:`~backbone_sdk.BackboneSpec` being loaded.
        :param state_dict: ``dict[str, Tensor]`` as read from disk (containers such as
            ``{"state_dict": ...}`` and ``module.`` prefixes already removed).
        :param source_format: a format name such as ``"timm"``, ``"torchvision"``, ``"openai"``,
            ``"dinov2"`` or ``"transformers"``, or ``None`` to ask the plugin to detect it.
        :return: ``(native_state_dict, format_name)``, or ``None`` when the layout is not one the
            plugin recognizes. The first non-``None`` result wins.
        """


#: deprecated name of :class:`BackboneHookSpec` (one release)
BackboneSpecs = BackboneHookSpec
