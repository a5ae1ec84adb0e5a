"""Plain Vision Transformers: ViT (Dosovitskiy et al. 2020, https://arxiv.org/abs/2010.11929),
DeiT (Touvron et al. 2020, https://arxiv.org/abs/2012.12877) and DINO v1
(Caron et al. 2021, https://arxiv.org/abs/2104.14294), on transformers' ``ViTModel``/``DeiTModel``.

Features ``block{i}`` (every block, stride = patch size); ``embed`` is the final-normed CLS token
(mean of CLS and distillation tokens for distilled DeiT, as timm and the DeiT paper do);
``pyramid`` is a simple feature pyramid. Weights: transformers hub checkpoints and timm state dicts.
"""

from __future__ import annotations

import attrs

from ..hookspecs import hookimpl
from ..specs import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, InputSpec, PrefixTokens, positive
from ._common import has_keys, hf_model, rename, split_qkv, strip_prefixes
from ._plainvit import PlainViT, PlainViTConfig

FAMILY = "vit"


@attrs.frozen(kw_only=True)
class ViTConfig(PlainViTConfig):
    """Architecture of a ViT / DeiT / DINO variant.

    :param dim: token width. :param depth: number of blocks. :param heads: attention heads (divide ``dim``).
    :param mlp_ratio: MLP hidden width / ``dim``. :param patch_size: patch side in pixels (the stride).
    :param layer_norm_eps: LayerNorm epsilon (1e-6 in the original ViT, DeiT and DINO code).
    :param distilled: DeiT's distillation token after CLS (``embed`` averages the two).
    """

    mlp_ratio: int = attrs.field(default=4, validator=positive)
    layer_norm_eps: float = 1e-6
    distilled: bool = False

    def prefix_tokens(self):
        return PrefixTokens(cls=True, distillation=self.distilled)


class ViT(PlainViT):
    """transformers ``ViTModel`` (or ``DeiTModel`` when distilled) behind the backbone_sdk interface."""

    def __init__(self, spec: BackboneSpec):
        super().__init__(spec)
        cfg: ViTConfig = spec.config
        self.distilled = cfg.distilled
        if self.distilled:
            from transformers import DeiTConfig as Config, DeiTModel as Model
        else:
            from transformers import ViTConfig as Config, ViTModel as Model
        config = Config(
            hidden_size=cfg.dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
            intermediate_size=cfg.dim * cfg.mlp_ratio, image_size=spec.input.image_size[0],
            patch_size=cfg.patch_size, layer_norm_eps=cfg.layer_norm_eps, qkv_bias=True,
        )
        self.model = hf_model(Model, config, add_pooling_layer=False)

    @property
    def blocks(self):
        return self.model.layers

    def embed_tokens(self, images):
        return self.model.embeddings(images, interpolate_pos_encoding=True)

    def call_block(self, x, block):
        return block(x, None)

    def final_norm(self, x):
        return self.model.layernorm(x)

    def stem(self):
        return self.model.embeddings

    def embed(self, images):
        x = self.last_hidden_state(images)
        return (x[:, 0] + x[:, 1]) / 2 if self.distilled else x[:, 0]


def build(spec: BackboneSpec) -> ViT:
    return ViT(spec)


_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
_HALF = (0.5, 0.5, 0.5)

# name: (size, patch, resolution, mean, std, hub id, distilled, description). LayerNorm eps is 1e-6
# for all of them, as in the original ViT (JAX), DeiT and DINO code and timm (transformers' hub
# configs of the google/ and facebook/deit checkpoints say 1e-12, which the original code never used).
_VARIANTS = {
    "vit_small_patch16_224": ("small", 16, 224, _HALF, _HALF, "timm/vit_small_patch16_224.augreg_in21k_ft_in1k", False, "ViT-S/16"),
    "vit_small_patch16_384": ("small", 16, 384, _HALF, _HALF, "timm/vit_small_patch16_384.augreg_in21k_ft_in1k", False, "ViT-S/16 @384"),
    "vit_base_patch16_224": ("base", 16, 224, _HALF, _HALF, "google/vit-base-patch16-224", False, "ViT-B/16"),
    "vit_base_patch16_384": ("base", 16, 384, _HALF, _HALF, "google/vit-base-patch16-384", False, "ViT-B/16 @384"),
    "vit_base_patch32_224": ("base", 32, 224, _HALF, _HALF, "google/vit-base-patch32-224-in21k", False, "ViT-B/32 (ImageNet-21k)"),
    "vit_base_patch32_384": ("base", 32, 384, _HALF, _HALF, "google/vit-base-patch32-384", False, "ViT-B/32 @384"),
    "vit_large_patch16_224": ("large", 16, 224, _HALF, _HALF, "google/vit-large-patch16-224", False, "ViT-L/16"),
    "vit_large_patch16_384": ("large", 16, 384, _HALF, _HALF, "google/vit-large-patch16-384", False, "ViT-L/16 @384"),
    "deit_tiny_patch16_224": ("tiny", 16, 224, IMAGENET_MEAN, IMAGENET_STD, "facebook/deit-tiny-patch16-224", False, "DeiT-Ti/16"),
    "deit_small_patch16_224": ("small", 16, 224, IMAGENET_MEAN, IMAGENET_STD, "facebook/deit-small-patch16-224", False, "DeiT-S/16"),
    "deit_base_patch16_224": ("base", 16, 224, IMAGENET_MEAN, IMAGENET_STD, "facebook/deit-base-patch16-224", False, "DeiT-B/16"),
    "deit_base_patch16_384": ("base", 16, 384, IMAGENET_MEAN, IMAGENET_STD, "facebook/deit-base-patch16-384", False, "DeiT-B/16 @384"),
    "deit_tiny_distilled_patch16_224": ("tiny", 16, 224, IMAGENET_MEAN, IMAGENET_STD, "facebook/deit-tiny-distilled-patch16-224", True, "DeiT-Ti/16 distilled"),
    "deit_small_distilled_patch16_224": ("small", 16, 224, IMAGENET_MEAN, IMAGENET_STD, "facebook/deit-small-distilled-patch16-224", True, "DeiT-S/16 distilled"),
    "deit_base_distilled_patch16_224": ("base", 16, 224, IMAGENET_MEAN, IMAGENET_STD, "facebook/deit-base-distilled-patch16-224", True, "DeiT-B/16 distilled"),
    "deit_base_distilled_patch16_384": ("base", 16, 384, IMAGENET_MEAN, IMAGENET_STD, "facebook/deit-base-distilled-patch16-384", True, "DeiT-B/16 distilled @384"),
    "dino_vits16": ("small", 16, 224, IMAGENET_MEAN, IMAGENET_STD, "facebook/dino-vits16", False, "DINO ViT-S/16"),
    "dino_vits8": ("small", 8, 224, IMAGENET_MEAN, IMAGENET_STD, "facebook/dino-vits8", False, "DINO ViT-S/8"),
    "dino_vitb16": ("base", 16, 224, IMAGENET_MEAN, IMAGENET_STD, "facebook/dino-vitb16", False, "DINO ViT-B/16"),
    "dino_vitb8": ("base", 8, 224, IMAGENET_MEAN, IMAGENET_STD, "facebook/dino-vitb8", False, "DINO ViT-B/8"),
}


def make_spec(name, size, patch, res, mean, std, hub_id, distilled, description, *, test=False, dims=None,
              neck=256) -> BackboneSpec:
    dim, depth, heads = dims or _SIZES[size]
    config = ViTConfig(dim=dim, depth=depth, heads=heads, patch_size=patch, distilled=distilled, neck_channels=neck)
    return BackboneSpec.from_config(
        config, name=name, family=FAMILY, builder=f"{__name__}:build",
        input=InputSpec(mean=mean, std=std, image_size=res), hub_id=hub_id, is_test=test, description=description,
    )


@hookimpl
def register_backbones(registry):
    for name, args in _VARIANTS.items():
        registry.add(make_spec(name, *args))
    tiny = (None, 8, 32, IMAGENET_MEAN, IMAGENET_STD, None)
    registry.add(make_spec("vit_test", *tiny, False, "tiny ViT for tests", test=True, dims=(32, 3, 2), neck=16))
    registry.add(make_spec("deit_distilled_test", *tiny, True, "tiny distilled DeiT for tests", test=True,
                           dims=(32, 2, 2), neck=16))


# -- checkpoint conversion -------------------------------------------------------------------------
_TIMM_RULES = [
    (r"^cls_token$", "model.embeddings.cls_token"),
    (r"^dist_token$", "model.embeddings.distillation_token"),
    (r"^pos_embed$", "model.embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.", "model.embeddings.patch_embeddings.projection."),
    (r"^blocks\.(\d+)\.norm1\.", r"model.layers.\1.layernorm_before."),
    (r"^blocks\.(\d+)\.norm2\.", r"model.layers.\1.layernorm_after."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"model.layers.\1.attention.o_proj."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"model.layers.\1.attention.qkv."),
    (r"^blocks\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
    (r"^norm\.", "model.layernorm."),
]


def convert_timm(state):
    state = rename(state, _TIMM_RULES, drop=[r"^head", r"^fc_norm\.", r"^pre_logits"])
    return split_qkv(state, "qkv")


def convert_transformers(state):
    state = strip_prefixes(state, ["vit.", "deit."])
    drop = ("pooler.", "classifier.", "distillation_classifier.", "cls_classifier.")
    return {f"model.{k}": v for k, v in state.items() if not k.startswith(drop)}


@hookimpl
def convert_checkpoint(spec, state_dict, source_format):
    if source_format in (None, "timm") and has_keys(state_dict, "patch_embed.proj.", "blocks.0."):
        return convert_timm(state_dict), "timm"
    if source_format in (None, "transformers") and (
        has_keys(state_dict, "embeddings.") or has_keys(state_dict, "vit.") or has_keys(state_dict, "deit.")
    ):
        return convert_transformers(state_dict), "transformers"
    return None
