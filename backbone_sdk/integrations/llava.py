"""transformers' ``LlavaForConditionalGeneration`` with a backbone_sdk vision tower.

:func:`llava_with_backbone` builds the LLaVA model around an existing causal LM and puts any SDK
backbone in as its ``vision_tower`` through :class:`LlavaVisionShim`, which presents the backbone's
token sequences (``Backbone.run_layers``) as transformers' ``hidden_states``. For a LLaVA-style
model on any causal LM without transformers' LLaVA classes, see
:class:`backbone_sdk.integrations.llm.MultimodalLM`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters.vlm import VisionTower
from ..backbone import Backbone
from ..errors import InvalidOptionError

__all__ = ["LlavaVisionShim", "llava_with_backbone"]


class LlavaVisionShim(nn.Module):
    """Presents a backbone as the ``vision_tower`` that transformers' LLaVA calls.

    ``LlavaModel.get_image_features`` calls ``vision_tower(pixel_values, output_hidden_states=...,
    return_dict=True)`` and takes ``hidden_states[vision_feature_layer]``; with strategy
    ``"default"`` it drops the first token (CLS). ``hidden_states`` here follow transformers'
    convention for plain ViTs: entry 0 is the embedding output, entry ``i`` the output of block
    ``i - 1``, so negative indices equal ``VisionTower(select_layer=...)``. For hierarchical nets the
    entries are the flattened levels ``stage1..stage4`` (no CLS: use strategy ``"full"``).
    Only the requested entries are computed (the others are ``None``) and the network stops at the
    deepest one; ``last_hidden_state`` is that deepest computed entry. Register tokens (DINOv2
    registers, DeiT's distillation token) are removed when ``drop_registers``.
    """

    def __init__(self, backbone: Backbone, drop_registers: bool = True):
        super().__init__()
        self.backbone = backbone
        self.drop_registers = drop_registers
        self.plain = backbone.spec.plain
        self.patch_size = backbone.spec.input.patch_size or backbone.spec.features[-1].stride

    def _count(self) -> int:
        return len(self.backbone.spec.features) + int(self.plain)

    def _wanted(self, output_hidden_states) -> set[int]:
        count = self._count()
        if output_hidden_states is True or output_hidden_states is None or output_hidden_states is False:
            return set(range(count))
        layers = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
        for layer in layers:
            if not -count <= layer < count:
                raise IndexError(f"{self.backbone.spec.name} has {count} hidden states; got index {layer}")
        return {layer % count for layer in layers}

    def forward(self, pixel_values: torch.Tensor, output_hidden_states=None, return_dict: bool = True, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        self.backbone.check_images(pixel_values)
        wanted = self._wanted(output_hidden_states)
        states = self._plain(pixel_values, wanted) if self.plain else self._stages(pixel_values, wanted)
        last = states[max(wanted)]
        return BaseModelOutputWithPooling(last_hidden_state=last, hidden_states=tuple(states))

    def _plain(self, pixels, wanted):
        bb, states = self.backbone, [None] * self._count()
        blocks = {i - 1 for i in wanted if i > 0}
        if 0 in wanted:
            states[0] = bb.stem_tokens(pixels)
        for i, seq in (bb.run_layers(pixels, blocks) if blocks else {}).items():
            states[i + 1] = seq
        prefix = bb.spec.prefix_tokens
        if self.drop_registers and prefix.extra:
            first, n = int(prefix.cls), prefix.count
            states = [s if s is None else torch.cat([s[:, :first], s[:, n:]], dim=1) for s in states]
        return states

    def _stages(self, pixels, wanted):
        names = self.backbone.spec.feature_names
        maps = self.backbone.features(pixels, [names[i] for i in sorted(wanted)])
        return [maps[n].flatten(2).transpose(1, 2) if n in maps else None for n in names]


def llava_with_backbone(backbone: Backbone | VisionTower, lm: nn.Module, image_token_id: int, *,
                        select_layer: int | None = None, select_feature: str | None = None,
                        drop_registers: bool | None = None, projector: nn.Module | None = None):
    """A transformers ``LlavaForConditionalGeneration`` whose vision tower is an SDK backbone.

    ``lm`` (an ``AutoModelForCausalLM``) is reused, not copied: its base model becomes
    ``model.language_model`` and its head ``lm_head``. ``projector`` (any module, e.g. a
    :class:`MultimodalLM`'s) replaces LLaVA's ``multi_modal_projector`` if given. A
    :class:`VisionTower` supplies the selection defaults. The LLaVA model is built on the meta
    device and its placeholder modules are swapped out, so nothing is allocated twice.

    LLaVA embeds ``input_ids`` before it writes the image features, so ``image_token_id`` must be
    inside the LM's vocabulary (``lm.resize_token_embeddings(len(tokenizer))`` after adding
    ``<image>``), and each image needs as many placeholder ids as it has tokens
    (``VisionTower.num_tokens()``): transformers' LLaVA processors expand them, here you do.
    The config's ``vision_config`` is a placeholder of the right width; ``save_pretrained`` /
    ``from_pretrained`` of the result do not rebuild the SDK tower (re-attach it after loading).
    """
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    if isinstance(backbone, VisionTower):
        if backbone.multi_layer or backbone.token_merge != 1:
            raise InvalidOptionError(
                f"llava_with_backbone takes a tower with one select_layer and token_merge=1, got select_layer="
                f"{backbone.select_layer}, token_merge={backbone.token_merge}; use MultimodalLM for multi-layer or "
                "merged tokens.")
        select_layer = backbone.select_layer if select_layer is None else select_layer
        select_feature = backbone.select_feature if select_feature is None else select_feature
        drop_registers = backbone.drop_registers if drop_registers is None else drop_registers
        backbone = backbone.backbone
    select_layer = -2 if select_layer is None else select_layer
    if isinstance(select_layer, bool) or not isinstance(select_layer, int):
        raise InvalidOptionError(f"llava_with_backbone takes one select_layer (an int), got {select_layer!r}")
    select_feature = select_feature or "patch"
    drop_registers = True if drop_registers is None else drop_registers
    has_cls = backbone.spec.prefix_tokens.cls
    if select_feature == "cls_patch" and not has_cls:
        raise InvalidOptionError(f"{backbone.spec.name} has no CLS token (spec.prefix_tokens="
                                 f"{backbone.spec.prefix_tokens}); use select_feature='patch'")
    # "default" drops token 0 (CLS); a CLS-less token map must be taken whole
    strategy = "default" if select_feature == "patch" and has_cls else "full"
    width = backbone.spec.features[select_layer].channels
    shim = LlavaVisionShim(backbone, drop_registers)
    # the shim's hidden_states of a plain ViT start with the embedding output: block k is entry k + 1
    feature_layer = select_layer + 1 if shim.plain and select_layer >= 0 else select_layer
    placeholder = CLIPVisionConfig(hidden_size=width, intermediate_size=width, num_hidden_layers=1,
                                   num_attention_heads=1, patch_size=shim.patch_size)
    config = LlavaConfig(vision_config=placeholder, text_config=lm.config, image_token_id=image_token_id,
                         vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                         projector_hidden_act="gelu")
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    llava.model.vision_tower = shim
    llava.model.language_model = lm.base_model
    llava.lm_head = lm.get_output_embeddings()
    weight = lm.get_input_embeddings().weight
    llava.model.multi_modal_projector = projector if projector is not None else \
        LlavaMultiModalProjector(config).to(device=weight.device, dtype=weight.dtype)
    return llava
