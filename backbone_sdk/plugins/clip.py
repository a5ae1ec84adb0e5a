"""CLIP (Radford et al. 2021, https://arxiv.org/abs/2103.00020) on transformers' ``CLIPModel``.

The image tower is the backbone: features ``block{i}`` (every vision block, stride = patch size),
``tokens()`` for VLMs, a simple feature pyramid, and ``embed(images)`` = the projected CLIP image
embedding ``visual_projection(post_layernorm(CLS))`` (not normalized), so ``spec.embed_dim`` is the
projection width. ``tokens(norm=True)`` applies ``post_layernorm`` to every token, as open_clip's
``ln_post`` does.

The text tower comes along (spec capability ``"text"``): :meth:`CLIP.embed_text` takes strings or
token ids and returns projected text embeddings; :attr:`CLIP.logit_scale` is the learned log
temperature (initialized to ``ln(1 / 0.07)``); :meth:`CLIP.tokenize` / :func:`tokenize` equal
open_clip's tokenizer (see :mod:`backbone_sdk.plugins._clip_tokenizer`). Text embeddings pool
the EOT token, found as ``argmax(token ids)`` like open_clip and OpenAI CLIP (EOT has the highest
id). The text tower is the optional part ``"text"``: ``create_backbone(name, parts=())`` (or any
``parts`` without it) drops it and ``logit_scale`` (the image tower alone, e.g. for detection);
text keys of checkpoints are then ignored.

Weights: transformers checkpoints (``openai/clip-vit-*`` hub ids, ``CLIPModel`` /
``CLIPVisionModelWithProjection`` state dicts), the OpenAI release / open_clip layout
(``visual.transformer.resblocks.*``, fused ``in_proj_weight``, ``visual.proj`` and
``text_projection`` used as ``x @ P``), formats ``"openai"`` / ``"open_clip"``, and timm's image
towers (``vit_*_clip_*``: ``norm_pre``, ``blocks.N.attn.qkv``, ``head`` = projection), format
``"timm"``, which hold no text tower: load them without the ``"text"`` part.

The ResNet CLIP models (RN50, RN101, RN50x4...) are not registered: transformers has no
implementation of their modified ResNet with attention pooling.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import attrs
import torch
from torch import nn

from ..errors import CheckpointError, UnsupportedOperationError
from ..hookspecs import hookimpl
from ..specs import CLIP_MEAN, CLIP_STD, BackboneSpec, InputSpec, divides, positive
from . import _clip_tokenizer
from ._common import TextCheckpointing, has_keys, hf_model, rename, split_qkv, strip_prefixes, token_ids
from ._plainvit import PlainViT, PlainViTConfig

FAMILY = "clip"
LOGIT_SCALE_INIT = math.log(1 / 0.07)

__all__ = ["CLIP", "build", "tokenize"]


def tokenize(texts: str | Sequence[str], context_length: int = _clip_tokenizer.CONTEXT_LENGTH) -> torch.Tensor:
    """CLIP token ids ``LongTensor [B, context_length]``, equal to ``open_clip.tokenize``.

    Texts longer than the context are truncated with EOT kept last. The tokenizer is built on
    first use from the BPE vocabulary shipped with ``open_clip_torch`` (works offline).
    """
    return _clip_tokenizer.tokenize(texts, context_length)


TEXT = "text"


@attrs.frozen(kw_only=True)
class CLIPConfig(PlainViTConfig):
    """Architecture of a CLIP variant: a ViT image tower and (optional part ``"text"``) a text tower.

    ``dim``/``depth``/``heads``: image tower; ``text_*``: text tower; ``projection_dim``: width of the
    shared embedding space (``embed_dim``); ``patch_size``: image patch side (the stride).
    """

    OPTIONAL_PARTS = frozenset({TEXT})

    text_dim: int = attrs.field(validator=positive)
    text_depth: int = attrs.field(validator=positive)
    text_heads: int = attrs.field(validator=divides("text_dim"))
    projection_dim: int = attrs.field(validator=positive)
    vocab_size: int = attrs.field(default=_clip_tokenizer.VOCAB_SIZE, validator=positive)
    context_length: int = attrs.field(default=_clip_tokenizer.CONTEXT_LENGTH, validator=positive)

    def embedding_dim(self):
        return self.projection_dim


class _VisionStem(nn.Module):
    """Patch embedding + CLS + position embeddings, then ``pre_layrnorm``: CLIP's input to block 0.

    Kept out of the module tree (it only references modules of ``CLIPModel``) so that state-dict
    keys are not duplicated; :meth:`CLIP.stage_modules` hands it out as the stem group.
    """

    def __init__(self, vision_model: nn.Module):
        super().__init__()
        self.embeddings = vision_model.embeddings
        self.pre_layrnorm = vision_model.pre_layrnorm

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pre_layrnorm(self.embeddings(images, interpolate_pos_encoding=True))


class CLIP(TextCheckpointing, PlainViT):
    """transformers ``CLIPModel`` (weights under ``model.``) behind the backbone_sdk interface."""

    def __init__(self, spec: BackboneSpec):
        super().__init__(spec)
        cfg: CLIPConfig = spec.config
        self.with_text = TEXT in spec.parts
        from transformers import CLIPConfig as HFCLIPConfig, CLIPModel

        self.model = hf_model(CLIPModel, HFCLIPConfig(
            vision_config=_tower(cfg, "", image_size=spec.input.image_size[0], patch_size=self.patch_size),
            text_config=_tower(cfg, "text_", vocab_size=cfg.vocab_size,
                               max_position_embeddings=cfg.context_length, eos_token_id=_clip_tokenizer.EOT_ID,
                               bos_token_id=_clip_tokenizer.SOT_ID, pad_token_id=0),
            projection_dim=cfg.projection_dim, logit_scale_init_value=LOGIT_SCALE_INIT,
        ))
        if not self.with_text:
            self.model.text_model = None
            self.model.text_projection = None
            self.model.logit_scale = None
        self.__dict__["_stem"] = _VisionStem(self.model.vision_model)

    # -- image tower (PlainViT hooks) -----------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.vision_model.encoder.layers

    def embed_tokens(self, images):
        return self._stem(images)

    def call_block(self, x, block):
        return block(x, None)

    def final_norm(self, x):
        return self.model.vision_model.post_layernorm(x)

    def stem(self):
        return self._stem

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Projected CLIP image embedding ``[B, projection_dim]`` (not normalized)."""
        self.check_images(images)
        x, _ = self.run_blocks(images, len(self.blocks) - 1)
        return self.model.visual_projection(self.final_norm(x[:, 0]))

    # -- text tower ---------------------------------------------------------------------------
    @property
    def logit_scale(self) -> nn.Parameter | None:
        """Learned log temperature: similarity logits are ``logit_scale.exp() * cos(image, text)``
        (``None`` without the text tower)."""
        return self.model.logit_scale

    @property
    def context_length(self) -> int:
        return self.spec.config.context_length

    def tokenize(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Token ids ``[B, context_length]`` for this model (see :func:`tokenize`)."""
        return tokenize(texts, context_length or self.context_length)

    def embed_text(self, texts: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Projected CLIP text embeddings ``[B, projection_dim]`` (not normalized).

        ``texts``: strings (tokenized with :meth:`tokenize`) or token ids ``[B, L]`` with
        ``L <= context_length``, as open_clip's tokenizer makes them (EOT = highest id per row).
        """
        if not self.with_text:
            raise UnsupportedOperationError(f"{self.spec.name} was created without its text tower (parts="
                                            f"{sorted(self.spec.parts)}); create it with parts including 'text'")
        tokens = self._as_tokens(texts)
        eot = tokens.argmax(dim=-1)
        # attention is causal: positions after the last EOT cannot change the pooled tokens, skip them
        tokens = tokens[:, : int(eot.max()) + 1]
        hidden = self.model.text_model(input_ids=tokens).last_hidden_state
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), eot.to(hidden.device)]
        return self.model.text_projection(pooled)

    def _as_tokens(self, texts) -> torch.Tensor:
        tokens = token_ids(self.spec.name, texts, self.context_length, self.tokenize)
        return tokens.to(self.model.text_projection.weight.device)

    # -- training support ---------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """The image stem's tokens and position table, the text position table and ``logit_scale``."""
        text = {n for n, _ in self.named_parameters() if n.startswith("model.text_model.embeddings.position")}
        return super().no_weight_decay() | text | ({"model.logit_scale"} if self.with_text else set())


def _tower(cfg: CLIPConfig, prefix: str, **extra) -> dict:
    """transformers config dict of one tower from the config's ``{prefix}dim/depth/heads``."""
    dim = getattr(cfg, f"{prefix}dim")
    return dict(hidden_size=dim, intermediate_size=dim * 4, num_hidden_layers=getattr(cfg, f"{prefix}depth"),
                num_attention_heads=getattr(cfg, f"{prefix}heads"), hidden_act="quick_gelu", layer_norm_eps=1e-5,
                projection_dim=cfg.projection_dim, **extra)


def build(spec: BackboneSpec) -> CLIP:
    return CLIP(spec)


# name: (vision dim/depth/heads, patch, resolution, text dim/depth/heads, projection, hub id, description)
_VARIANTS = {
    "clip_vitb32": ((768, 12, 12), 32, 224, (512, 12, 8), 512, "openai/clip-vit-base-patch32", "CLIP ViT-B/32 (OpenAI)"),
    "clip_vitb16": ((768, 12, 12), 16, 224, (512, 12, 8), 512, "openai/clip-vit-base-patch16", "CLIP ViT-B/16 (OpenAI)"),
    "clip_vitl14": ((1024, 24, 16), 14, 224, (768, 12, 12), 768, "openai/clip-vit-large-patch14", "CLIP ViT-L/14 (OpenAI)"),
    "clip_vitl14_336": ((1024, 24, 16), 14, 336, (768, 12, 12), 768, "openai/clip-vit-large-patch14-336",
                        "CLIP ViT-L/14 @336 (OpenAI)"),
}


def make_spec(name, vision, patch, res, text, proj, hub_id, description, *, test=False, neck=256) -> BackboneSpec:
    dim, depth, heads = vision
    text_dim, text_depth, text_heads = text
    config = CLIPConfig(dim=dim, depth=depth, heads=heads, patch_size=patch, text_dim=text_dim, text_depth=text_depth,
                        text_heads=text_heads, projection_dim=proj, neck_channels=neck)
    return BackboneSpec.from_config(
        config, name=name, family=FAMILY, builder=f"{__name__}:build",
        input=InputSpec(mean=CLIP_MEAN, std=CLIP_STD, image_size=res, crop_pct=1.0),
        hub_id=hub_id, is_test=test, capabilities={TEXT}, description=description,
    )


@hookimpl
def register_backbones(registry):
    for name, args in _VARIANTS.items():
        registry.add(make_spec(name, *args))
    registry.add(make_spec("clip_test", (32, 2, 2), 8, 32, (32, 2, 2), 16, None, "tiny CLIP for tests", test=True,
                           neck=16))


# -- checkpoint conversion -------------------------------------------------------------------------
_OPENAI_RULES = [
    (r"^visual\.class_embedding$", "model.vision_model.embeddings.class_embedding"),
    (r"^visual\.positional_embedding$", "model.vision_model.embeddings.position_embedding.weight"),
    (r"^visual\.conv1\.", "model.vision_model.embeddings.patch_embedding."),
    (r"^visual\.ln_pre\.", "model.vision_model.pre_layrnorm."),
    (r"^visual\.transformer\.resblocks\.", "model.vision_model.encoder.layers."),
    (r"^visual\.ln_post\.", "model.vision_model.post_layernorm."),
    (r"^visual\.proj$", "model.visual_projection.weight"),
    (r"^token_embedding\.", "model.text_model.embeddings.token_embedding."),
    (r"^positional_embedding$", "model.text_model.embeddings.position_embedding.weight"),
    (r"^transformer\.resblocks\.", "model.text_model.encoder.layers."),
    (r"^ln_final\.", "model.text_model.final_layer_norm."),
    (r"^text_projection$", "model.text_projection.weight"),
    (r"^logit_scale$", "model.logit_scale"),
    (r"\.ln_1\.", ".layer_norm1."),
    (r"\.ln_2\.", ".layer_norm2."),
    (r"\.attn\.in_proj_(weight|bias)$", r".self_attn.in_proj.\1"),
    (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
]
# metadata tensors of the OpenAI release and open_clip's causal-mask buffer: not weights
_OPENAI_DROP = [r"^(input_resolution|context_length|vocab_size|attn_mask)$"]
_TEXT_KEYS = r"^model\.(text_model\.|text_projection\.|logit_scale$)"


def convert_openai(state):
    """OpenAI release / open_clip ``CLIP`` state dict -> native keys (``x @ P`` projections transposed)."""
    state = {k: v.t() if k in ("visual.proj", "text_projection") else v for k, v in state.items()}
    state = rename(state, _OPENAI_RULES, drop=_OPENAI_DROP)
    return split_qkv(state, "in_proj")


_TIMM_RULES = [
    (r"^cls_token$", "model.vision_model.embeddings.class_embedding"),
    (r"^pos_embed$", "model.vision_model.embeddings.position_embedding.weight"),
    (r"^patch_embed\.proj\.", "model.vision_model.embeddings.patch_embedding."),
    (r"^norm_pre\.", "model.vision_model.pre_layrnorm."),
    (r"^blocks\.(\d+)\.norm1\.", r"model.vision_model.encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"model.vision_model.encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"model.vision_model.encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"model.vision_model.encoder.layers.\1.self_attn.out_proj."),
    (r"^blocks\.(\d+)\.mlp\.", r"model.vision_model.encoder.layers.\1.mlp."),
    (r"^norm\.", "model.vision_model.post_layernorm."),
    (r"^head\.weight$", "model.visual_projection.weight"),
]


def convert_timm(state):
    """timm ``vit_*_clip_*`` image tower (``norm_pre``, fused ``attn.qkv``, ``head`` = projection) -> native keys.

    timm stores CLIP's bias-free projection as ``head`` with an all-zero bias; a non-zero one (a
    fine-tuned classifier) has no place in CLIP and is refused.
    """
    bias = state.get("head.bias")
    if bias is not None and bool(bias.abs().max() > 0):
        raise CheckpointError("this timm checkpoint has a classifier head (non-zero head.bias), not CLIP's "
                              "projection; load the image tower without it (drop the head.* keys) into a "
                              "model without the 'text' part, or use the OpenAI/open_clip release.")
    state = {k: v for k, v in state.items() if k != "head.bias"}
    state = {k: v.flatten() if k == "cls_token" else v[0] if k == "pos_embed" else v for k, v in state.items()}
    state = rename(state, _TIMM_RULES)
    return split_qkv(state, "qkv")


def convert_transformers(state):
    """``CLIPModel`` / ``CLIPVisionModelWithProjection`` state dict -> native keys."""
    state = strip_prefixes(state, ["clip."])
    return {f"model.{k}": v for k, v in state.items() if not k.endswith(".position_ids")}


def _drop_text(state):
    return {k: v for k, v in state.items() if not re.match(_TEXT_KEYS, k)}


@hookimpl
def convert_checkpoint(spec, state_dict, source_format):
    if source_format in (None, "openai", "open_clip") and has_keys(state_dict, "visual.transformer.resblocks."):
        fmt = source_format or ("openai" if "input_resolution" in state_dict else "open_clip")
        converted = convert_openai(state_dict)
    elif source_format in (None, "timm") and has_keys(state_dict, "norm_pre.", "blocks.0.attn.qkv."):
        fmt, converted = "timm", convert_timm(state_dict)
    elif source_format in (None, "transformers") and (
        has_keys(state_dict, "vision_model.") or has_keys(state_dict, "clip.vision_model.")
    ):
        fmt, converted = "transformers", convert_transformers(state_dict)
    else:
        return None
    if TEXT not in spec.parts:
        converted = _drop_text(converted)
    return converted, fmt
