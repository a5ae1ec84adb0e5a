"""transformers ``AutoBackbone`` integration: every backbone_sdk backbone as a transformers backbone.

Importing this module registers :class:`BackboneSDKConfig` (``model_type="backbone_sdk"``) with
``AutoConfig`` and :class:`BackboneSDKBackbone` with ``AutoBackbone``, so that transformers' task
models that build their backbone with ``load_backbone(config)`` (UperNet, DPT, DETR, Mask2Former,
...) take an SDK backbone from ``backbone_config=BackboneSDKConfig(...)``::

    import backbone_sdk.integrations.hf_backbone  # registers the classes
    from transformers import UperNetConfig, UperNetForSemanticSegmentation

    backbone = BackboneSDKConfig(backbone="swin_tiny_patch4_window7_224", out_indices=[0, 1, 2, 3])
    model = UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone, num_labels=150))

Outputs (``output=``):

- ``"maps"``: NCHW maps of the SDK's feature levels (``spec.feature_names``: ``stage1..stage4``,
  ``block{i}`` for plain ViTs), as :meth:`Backbone.features` returns them;
- ``"pyramid"``: the maps ``p2..p5`` at strides 4-32 of :meth:`Backbone.pyramid` (native levels, or
  the trainable simple feature pyramid neck for plain ViTs);
- ``"tokens"``: ``[B, 1 + N, C]`` sequences after each block of a plain ViT (what DPT's neck
  takes): the CLS token first, then the ``N`` patch tokens in row-major order; other prefix tokens
  (registers, distillation) are dropped. Backbones without a CLS token get the mean of their patch
  tokens in its place. ``config.patch_size`` and ``config.hidden_size`` are set from the spec.

``save_pretrained`` writes the SDK weights under ``body.`` (the SDK backbone's own state-dict keys
after that prefix); ``from_pretrained`` reads them back. See docs/hf_backbone.md.
"""

from __future__ import annotations

import os

from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoBackbone, AutoConfig, PreTrainedConfig, PreTrainedModel
from transformers.backbone_utils import BackboneConfigMixin, BackboneMixin
from transformers.modeling_outputs import BackboneOutput

from ..adapters.finetune import FinetunePolicy, apply_finetune
from ..errors import InvalidOptionError
from ..factory import create_backbone
from ..registry import get_spec
from ..specs import BackboneSpec

__all__ = ["OUTPUTS", "BackboneSDKBackbone", "BackboneSDKConfig", "image_processor_for"]

#: what :class:`BackboneSDKBackbone` returns, see the module docstring
OUTPUTS = ("maps", "pyramid", "tokens")


def _overrides(name: str, overrides: dict | None, output: str) -> dict[str, Any]:
    """``create_backbone`` overrides of a config: the user's, plus ``parts`` = only the optional
    parts ``output`` runs (the neck for the pyramid). Unused parts (a text tower, an unused neck)
    would be parameters without gradients: dead weight, and an error under DDP."""
    overrides = dict(overrides or {})
    base = get_spec(name)
    if "parts" not in overrides and base.config is not None:
        overrides["parts"] = base.with_config(**overrides).needed_parts(pyramid=output == "pyramid")
    return overrides


def _resolve_spec(name: str, overrides: dict | None, output: str) -> BackboneSpec:
    """The spec of the backbone a config builds; errors name the fix."""
    if not isinstance(name, str) or not name:
        raise InvalidOptionError(f"BackboneSDKConfig: backbone must be a registered backbone_sdk name "
                                 f"(backbone_sdk.list_backbones()), got {name!r}")
    if output not in OUTPUTS:
        raise InvalidOptionError(f"BackboneSDKConfig: output must be one of {list(OUTPUTS)}, got {output!r}")
    spec = get_spec(name).with_config(**_overrides(name, overrides, output))
    if output == "pyramid" and spec.pyramid is None:
        raise InvalidOptionError(f"BackboneSDKConfig(backbone={name!r}, output='pyramid'): {name} has no pyramid "
                                 f"(level strides {[f.stride for f in spec.features]}, no neck); use output='maps'.")
    if output == "tokens":
        widths = {f.channels for f in spec.features}
        strides = {f.stride for f in spec.features}
        if len(widths) != 1 or len(strides) != 1:
            raise InvalidOptionError(
                f"BackboneSDKConfig(backbone={name!r}, output='tokens'): token sequences need a single-scale "
                f"transformer (one width and stride for all levels); {name} has widths {sorted(widths)} and "
                f"strides {sorted(strides)}. Use output='maps' or 'pyramid'.")
    return spec


@strict
class BackboneSDKConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""Configuration of :class:`BackboneSDKBackbone`: a backbone_sdk backbone for transformers' task models.

    backbone (`str`, defaults to `"resnet50"`):
        A registered backbone_sdk name (``backbone_sdk.list_backbones()``).
    output (`str`, defaults to `"maps"`):
        ``"maps"`` (the SDK's feature levels), ``"pyramid"`` (``p2..p5``) or ``"tokens"`` (``[B, 1 + N, C]``
        sequences of a plain ViT).
    finetune (`str`, defaults to `"none"`):
        A backbone_sdk fine-tune policy (``"none"``, ``"frozen"``, ``"stages:N"``, ``"blocks:N"``).
    backbone_overrides (`dict`, *optional*):
        Config fields passed to ``backbone_sdk.create_backbone(backbone, **backbone_overrides)`` (e.g. ``depth``).
    out_features / out_indices (`list`, *optional*):
        The levels to return, among ``stage_names`` (the SDK level names, or ``p2..p5`` for the pyramid);
        negative indices count from the end. Default: the last level.
    weights (`str`, *optional*):
        What ``create_backbone(..., weights=...)`` loads when the model is built from this config: ``"hub"``
        (the spec's hub id), a hub id, or a local checkpoint file or directory. ``from_pretrained`` of a
        saved task model does not read it again: the saved weights win.
    patch_size / hidden_size (`int`, *optional*):
        Set from the spec in ``"tokens"`` mode (DPT reads them); ``None`` otherwise.
    """

    model_type = "backbone_sdk"

    backbone: str = "resnet50"
    output: str = "maps"
    finetune: str = "none"
    backbone_overrides: dict | None = None
    weights: str | None = None
    num_channels: int = 3
    patch_size: int | None = None
    hidden_size: int | None = None

    def __post_init__(self, **kwargs):
        spec = _resolve_spec(self.backbone, self.backbone_overrides, self.output)
        self.backbone_overrides = dict(self.backbone_overrides or {})
        if self.weights is not None:
            self.weights = os.fspath(self.weights)  # a Path must survive config.json
        FinetunePolicy.parse(self.finetune)  # a bad policy fails with the config, not at model build
        # stage names always follow the spec (a saved list is recomputed, never trusted)
        kwargs.pop("stage_names", None)
        if self.output == "pyramid":
            self.stage_names = [info.name for info in spec.pyramid.levels]
        else:
            self.stage_names = list(spec.feature_names)
        self.num_channels = spec.input.channels
        if self.output == "tokens":
            self.hidden_size = spec.features[0].channels
            self.patch_size = spec.features[0].stride
        else:
            self.hidden_size = None
            self.patch_size = None
        self.set_output_features_output_indices(out_features=kwargs.pop("out_features", None),
                                                out_indices=kwargs.pop("out_indices", None))
        super().__post_init__(**kwargs)

    @property
    def spec(self) -> BackboneSpec:
        """The spec of the backbone this config builds (optional parts chosen for ``output``)."""
        return _resolve_spec(self.backbone, self.backbone_overrides, self.output)


class BackboneSDKPreTrainedModel(PreTrainedModel):
    config_class = BackboneSDKConfig
    base_model_prefix = "body"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    # transformers' generic ``_init_weights`` runs only on modules of a model built on the meta
    # device (inside ``from_pretrained``) whose weights the checkpoint lacks; modules the SDK
    # initialized are marked initialized at construction (see BackboneSDKBackbone.__init__)


class BackboneSDKBackbone(BackboneMixin, BackboneSDKPreTrainedModel):
    """A backbone_sdk backbone (``self.body``) behind transformers' backbone API.

    ``forward(pixel_values)`` returns :class:`~transformers.modeling_outputs.BackboneOutput` with the
    ``out_features`` levels as ``feature_maps`` (NCHW maps, or ``[B, 1 + N, C]`` tokens with
    ``output="tokens"``); ``hidden_states`` (when asked) holds every level of ``stage_names``;
    ``attentions`` is always ``None``.
    """

    has_attentions = False

    def __init__(self, config: BackboneSDKConfig):
        super().__init__(config)
        overrides = _overrides(config.backbone, config.backbone_overrides, config.output)
        # built on the meta device (from_pretrained): the checkpoint, not config.weights, fills it
        weights = config.weights if torch.get_default_device().type != "meta" else None
        self.body = create_backbone(config.backbone, weights=weights, **overrides)
        self.spec = self.body.spec
        if config.output == "pyramid":
            self.num_features = [info.channels for info in self.spec.pyramid.levels]
        else:
            self.num_features = [info.channels for info in self.spec.features]
        apply_finetune(self.body, config.finetune)
        self._frozen_names = {n for n, p in self.body.named_parameters() if not p.requires_grad}
        first = next(self.body.parameters(), None)
        if first is not None and first.device.type != "meta":
            # the SDK initialized these weights: transformers' generic init must not overwrite them
            for module in self.body.modules():
                module._is_hf_initialized = True
        self.post_init()

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the SDK backbone recomputes activations in backward. transformers'
        ``gradient_checkpointing_enable()`` (of this model or of a task model holding it) sets it, which
        switches the family's own checkpointing (``Backbone.set_grad_checkpointing``)."""
        return bool(self.__dict__.get("_sdk_checkpointing", False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        if enable != self.gradient_checkpointing:
            self.body.set_grad_checkpointing(bool(enable))
        self.__dict__["_sdk_checkpointing"] = bool(enable)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None,
                                    every_n_layers: int = 1) -> None:
        self.gradient_checkpointing = enable

    def train(self, mode: bool = True):
        # transformers' loading replaces parameters (requires_grad back to True); the fine-tune
        # policy's frozen parameters are frozen again here (``from_pretrained`` ends with ``eval()``)
        if self._frozen_names:
            for name, p in self.body.named_parameters():
                if name in self._frozen_names and p.requires_grad:
                    p.requires_grad_(False)
        return super().train(mode)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> BackboneOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        names = list(self.stage_names)
        wanted = names if output_hidden_states else list(self.out_features)
        levels = self._levels(pixel_values, wanted)
        feature_maps = tuple(levels[name] for name in self.out_features)
        hidden_states = tuple(levels[name] for name in names) if output_hidden_states else None
        if not return_dict:
            return (feature_maps,) + ((hidden_states,) if output_hidden_states else ())
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_states, attentions=None)

    def _levels(self, pixel_values: torch.Tensor, wanted: list[str]) -> dict[str, torch.Tensor]:
        output = self.config.output
        if output == "maps":
            return self.body.features(pixel_values, wanted)
        if output == "pyramid":
            return self.body.pyramid(pixel_values)
        body = self.body
        body.check_images(pixel_values)
        indices = [self.stage_names.index(name) for name in wanted]
        with body.trunk_context():
            sequences = body.run_layers(pixel_values, indices)
        return {self.stage_names[i]: self._with_cls(sequences[i]) for i in indices}

    def _with_cls(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, P + N, C]`` with the spec's prefix tokens as ``[B, 1 + N, C]``: CLS (or the mean patch token) first."""
        prefix = self.spec.prefix_tokens
        patches = x[:, prefix.count:]
        cls = x[:, :1] if prefix.cls else patches.mean(dim=1, keepdim=True)
        return torch.cat([cls, patches], dim=1)


def image_processor_for(name_or_config: str | BackboneSDKConfig, size=None):
    """A transformers image processor (``BitImageProcessor``) with the spec's mean, std and size.

    Resizes the short side to ``size / crop_pct`` and center-crops ``size`` (default: the spec's
    ``image_size``), as :func:`backbone_sdk.preprocess` does in ``"crop"`` mode.
    """
    from transformers import BitImageProcessor
    from transformers.image_utils import PILImageResampling

    spec = name_or_config.spec if isinstance(name_or_config, BackboneSDKConfig) else get_spec(name_or_config)
    height, width = (size, size) if isinstance(size, int) else (size or spec.input.image_size)
    resample = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR,
                "nearest": PILImageResampling.NEAREST}.get(spec.input.interpolation, PILImageResampling.BICUBIC)
    return BitImageProcessor(
        do_resize=True, size={"shortest_edge": round(min(height, width) / spec.input.crop_pct)},
        resample=resample, do_center_crop=True, crop_size={"height": int(height), "width": int(width)},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(spec.input.mean),
        image_std=list(spec.input.std), do_convert_rgb=True)


AutoConfig.register(BackboneSDKConfig.model_type, BackboneSDKConfig, exist_ok=True)
AutoBackbone.register(BackboneSDKConfig, BackboneSDKBackbone, exist_ok=True)
