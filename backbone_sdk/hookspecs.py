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
