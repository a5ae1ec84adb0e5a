"""AIMv2 (Fini et al. 2024, https://arxiv.org/abs/2411.14402) image encoders on transformers'
``Aimv2VisionModel``.

A plain ViT with RMSNorm (eps 1e-5) after the patch embedding, in every block and at the end,
SwiGLU MLPs and no biases except the patch embedding's. There is no CLS token
(``PrefixTokens(cls=False)``): ``tokens()`` returns every token as a patch token and
``VisionTower(select_feature="patch")`` keeps all of them.

Features ``block{i}`` (every block, stride 14); ``pyramid`` is a simple feature pyramid.
``embed`` is the mean of the final-normed tokens, as timm's ``forward_head(pre_logits=True)``
(``global_pool="avg"``) gives: the published image towers have no pooling head (transformers
returns ``pooler_output=None`` for them). With ``use_head=True`` (the attention-pooling head of the
LiT model's image tower) ``embed`` is that head's output, transformers' ``pooler_output``.
``tokens(norm=True)`` applies the final RMSNorm, as ``last_hidden_state`` does.

Position embeddings: the 224/336/448 models learn a table for their input size. transformers
runs them at that size only; at other sizes the table is resampled bicubically with antialiasing
in fp32, as timm (``dynamic_img_size=True``) does. The native-resolution model
(``aimv2_large_patch14_native``, ``native=True``) has no table: fixed 2D sin-cos embeddings are
computed for each grid by transformers itself.

Weights: transformers checkpoints (``Aimv2VisionModel``, and ``Aimv2Model`` ones whose image tower
is under ``vision_model.``; the text tower, projections and ``logit_scale`` are ignored), timm's
``aimv2_*`` state dicts (format ``"timm"``) and the original release's layout
(``preprocessor.patchifier``, ``trunk.blocks``; format ``"aimv2"``). A checkpoint with a pooling
head loads strictly only into ``use_head=True``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import attrs
import torch
import torch.nn.functional as F

from ..hookspecs import hookimpl
from ..specs import (
    CLIP_MEAN,
    CLIP_STD,
    BackboneSpec,
    InputSpec,
    PrefixTokens,
    positive,
    positive_float,
)
from ._common import (
    has_keys,
    hf_model,
    read_hf_pretrained,
    rename,
    split_qkv,
    strip_prefixes,
)
from ..layers.convert import convert_detected
from ._plainvit import PlainViT, PlainViTConfig

FAMILY = "aimv2"
PATCH = 14
RMS_NORM_EPS = 1e-5

__all__ = ["AIMv2", "AIMv2Config", "build"]


def _sincos_width(instance, attribute, value):
    if value and instance.dim % 4:
        raise ValueError(f"native=True (2D sin-cos positions) needs dim divisible by 4, got dim={instance.dim}")


@attrs.frozen(kw_only=True)
class AIMv2Config(PlainViTConfig):
    """Architecture of an AIMv2 image encoder.

    :param dim: token width. :param depth: blocks. :param heads: attention heads (divide ``dim``).
    :param mlp_dim: SwiGLU hidden width (transformers' ``intermediate_size``).
    :param pos_embed_size: image side the learned position table was trained for (224 = 16x16 patches).
    :param native: fixed 2D sin-cos positions for any grid instead of a learned table.
    :param use_head: include the attention-pooling head; ``embed`` is then its output.
    :param rms_norm_eps: epsilon of every RMSNorm.
    """

    mlp_dim: int = attrs.field(validator=positive)
    patch_size: int = attrs.field(default=PATCH, validator=positive)
    pos_embed_size: int = attrs.field(default=224, validator=positive)
    native: bool = attrs.field(default=False, validator=_sincos_width)
    use_head: bool = False
    rms_norm_eps: float = attrs.field(default=RMS_NORM_EPS, validator=positive_float)

    def prefix_tokens(self):
        return PrefixTokens(cls=False)


class AIMv2(PlainViT):
    """transformers ``Aimv2VisionModel`` (weights under ``model.``) behind the backbone_sdk interface."""

    def __init__(self, spec: BackboneSpec):
        super().__init__(spec)
        cfg: AIMv2Config = spec.config
        from transformers import Aimv2VisionConfig, Aimv2VisionModel

        self.model = hf_model(Aimv2VisionModel, Aimv2VisionConfig(
            hidden_size=cfg.dim, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.depth,
            num_attention_heads=cfg.heads, image_size=cfg.pos_embed_size, patch_size=cfg.patch_size,
            rms_norm_eps=cfg.rms_norm_eps, use_head=cfg.use_head, is_native=cfg.native, qkv_bias=False,
            mlp_bias=False,
        ))
        self.native = cfg.native
        self.use_head = cfg.use_head

    @property
    def blocks(self):
        return self.model.encoder.layers

    def pos_embed(self, height: int, width: int) -> torch.Tensor:
        """Learned position embeddings ``[1, N, D]`` for ``height x width`` pixel images: the table
        itself at its own grid, else resampled bicubically (antialiased, fp32) as timm does."""
        table = self.model.embeddings.position_embedding.weight
        grid = (height // self.patch_size, width // self.patch_size)
        side = math.isqrt(table.shape[0])
        if grid == (side, side):
            return table[None]
        pos = table.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        pos = F.interpolate(pos, size=grid, mode="bicubic", align_corners=False, antialias=True)
        return pos.to(table.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)

    def embed_tokens(self, images):
        emb = self.model.embeddings
        if self.native:
            return emb(images)
        x = emb.rms_norm(emb.patch_embed(images).flatten(2).transpose(1, 2))
        return x + self.pos_embed(images.shape[-2], images.shape[-1])

    def final_norm(self, x):
        return self.model.rms_norm(x)

    def stem(self):
        return self.model.embeddings

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, dim]``: the attention-pooling head's output (``use_head``), else the mean of the
        final-normed tokens (timm's average pool)."""
        x = self.last_hidden_state(images)
        return self.model.head(x) if self.use_head else x.mean(dim=1)

    def no_weight_decay(self) -> set[str]:
        """The position table, the patch-embedding bias and the pooling head's query token."""
        return super().no_weight_decay() | ({"model.head.cls_token"} if self.use_head else set())

    def read_pretrained(self, directory):
        """``Aimv2VisionModel`` directories through transformers; for a full ``Aimv2Model``
        directory ``None``, so that its state dict is read and converted (``vision_model.`` keys)."""
        config = json.loads((Path(directory) / "config.json").read_text())
        if config.get("model_type") == "aimv2":
            return None
        return read_hf_pretrained(self.model, directory)


def build(spec: BackboneSpec) -> AIMv2:
    return AIMv2(spec)


# size: (dim, depth, heads, SwiGLU width, hub name), as transformers' configs and timm's aimv2_* define them
_SIZES = {"large": (1024, 24, 8, 2816, "large"), "huge": (1536, 24, 12, 4096, "huge"),
          "1b": (2048, 24, 16, 5632, "1B"), "3b": (3072, 24, 24, 8192, "3B")}
RESOLUTIONS = (224, 336, 448)
#: distilled variants published for the large model
DISTILLED = (224, 336)


def make_spec(name, dim, depth, heads, mlp_dim, *, res=224, native=False, use_head=False, hub_id=None,
              description="", neck=256, test=False) -> BackboneSpec:
    config = AIMv2Config(dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim, pos_embed_size=res, native=native,
                         use_head=use_head, neck_channels=neck)
    return BackboneSpec.from_config(
        config, name=name, family=FAMILY, builder=f"{__name__}:build",
        input=InputSpec(mean=CLIP_MEAN, std=CLIP_STD, image_size=res, crop_pct=1.0),
        hub_id=hub_id, is_test=test, description=description,
    )


@hookimpl
def register_backbones(registry):
    for size, (dim, depth, heads, mlp, hub) in _SIZES.items():
        for res in RESOLUTIONS:
            registry.add(make_spec(f"aimv2_{size}_patch14_{res}", dim, depth, heads, mlp, res=res,
                                   hub_id=f"apple/aimv2-{hub}-patch14-{res}",
                                   description=f"AIMv2 {hub}/14 @{res}"))
    large = _SIZES["large"][:4]
    for res in DISTILLED:
        registry.add(make_spec(f"aimv2_large_patch14_{res}_distilled", *large, res=res,
                               hub_id=f"apple/aimv2-large-patch14-{res}-distilled",
                               description=f"AIMv2 large/14 @{res}, distilled"))
    registry.add(make_spec("aimv2_large_patch14_native", *large, native=True,
                           hub_id="apple/aimv2-large-patch14-native",
                           description="AIMv2 large/14, native resolution (sin-cos positions)"))
    tiny = {"res": 56, "neck": 16, "test": True}
    registry.add(make_spec("aimv2_test", 32, 2, 2, 88, description="tiny AIMv2 for tests", **tiny))
    registry.add(make_spec("aimv2_native_test", 32, 2, 2, 88, native=True,
                           description="tiny native-resolution AIMv2 for tests", **tiny))


# -- checkpoint conversion -------------------------------------------------------------------------
# the original release (apple/ml-aim, and the hub's first custom-code checkpoints) -> timm's names
_RELEASE_RULES = [
    (r"^image_encoder\.", ""),
    (r"^preprocessor\.patchifier\.", "patch_embed."),
    (r"^preprocessor\.pos_embed$", "pos_embed"),
    (r"^trunk\.post_trunk_norm\.", "norm."),
    (r"^trunk\.", ""),
    (r"\.norm_(1|2)\.", r".norm\1."),
    (r"\.mlp\.fc1\.", ".mlp.fc1_g."),
    (r"\.mlp\.fc3\.", ".mlp.fc1_x."),
    (r"^head\.k\.", "head.k_proj."),
    (r"^head\.v\.", "head.v_proj."),
    (r"^head\.linear\.", "head.output_proj."),
]
_RELEASE_DROP = [r"^(text_encoder|text_projector|image_projector)\.", r"^log_logit_scale$"]

_TIMM_RULES = [
    (r"^patch_embed\.proj\.", "model.embeddings.patch_embed."),
    (r"^patch_embed\.norm\.", "model.embeddings.rms_norm."),
    (r"^pos_embed$", "model.embeddings.position_embedding.weight"),
    (r"^blocks\.(\d+)\.norm(1|2)\.", r"model.encoder.layers.\1.rms_norm\2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"model.encoder.layers.\1.attention.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"model.encoder.layers.\1.attention.out_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc1_g\.", r"model.encoder.layers.\1.ffn.gate_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc1_x\.", r"model.encoder.layers.\1.ffn.up_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"model.encoder.layers.\1.ffn.down_proj."),
    (r"^norm\.", "model.rms_norm."),
    (r"^head\.(k_proj|v_proj|output_proj|cls_token)", r"model.head.\1"),
]
# timm's classifier (head.weight/bias when num_classes > 0) and its identity fc_norm
_TIMM_DROP = [r"^head\.(weight|bias)$", r"^fc_norm\."]
_TRANSFORMERS_DROP = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")


def convert_timm(state):
    """timm ``aimv2_*`` layout -> native keys (fused qkv split, ``pos_embed`` ``[1, N, D]`` squeezed)."""
    state = dict(state)
    if "pos_embed" in state:
        state["pos_embed"] = state["pos_embed"].reshape(-1, state["pos_embed"].shape[-1])
    return split_qkv(rename(state, _TIMM_RULES, drop=_TIMM_DROP), "qkv")


def convert_release(state):
    """Original AIMv2 release layout (``image_encoder.`` prefixed in the LiT model) -> native keys."""
    return convert_timm(rename(state, _RELEASE_RULES, drop=_RELEASE_DROP))


def convert_transformers(state):
    """transformers ``Aimv2VisionModel`` keys, or an ``Aimv2Model``'s ``vision_model.`` ones -> native keys."""
    state = {k: v for k, v in state.items() if not k.startswith(_TRANSFORMERS_DROP)}
    return {f"model.{k}": v for k, v in strip_prefixes(state, ["vision_model."]).items()}


def detect_format(state) -> str | None:
    if has_keys(state, "preprocessor.patchifier.") or has_keys(state, "image_encoder.preprocessor.patchifier."):
        return "aimv2"
    if has_keys(state, "patch_embed.proj.", "blocks."):
        return "timm"
    if has_keys(state, "embeddings.patch_embed.") or has_keys(state, "vision_model.embeddings.patch_embed."):
        return "transformers"
    return None


_CONVERTERS = {"aimv2": convert_release, "timm": convert_timm, "transformers": convert_transformers}


@hookimpl
def convert_checkpoint(spec, state_dict, source_format):
    return convert_detected(state_dict, source_format, detect_format(state_dict), _CONVERTERS)
