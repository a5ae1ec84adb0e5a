"""DINOv3 vision transformers (Siméoni et al. 2025, https://arxiv.org/abs/2508.10104) on
transformers' ``DINOv3ViTModel``.

Features ``block{i}`` (every block, stride 16); ``embed`` is the final-normed CLS token
(``DINOv3ViTModel.pooler_output``, the release's ``x_norm_clstoken``, timm with
``global_pool='token'``; timm's default ``'avg'`` pools the patch tokens instead); ``tokens()``
separates CLS, the 4 register ("storage") tokens and the patch tokens; ``pyramid`` is a simple
feature pyramid. Positions are 2-D rotary embeddings (RoPE) of the patch centres normalized to
[-1, 1] per axis, applied to the queries and keys of the patch tokens only: any H, W that are
multiples of 16 work without resampling anything. The tables are computed once per forward (in
fp32) and passed to every block. The release and transformers also rescale the coordinates by a
random factor in [1/2, 2] in training mode, a pre-training augmentation; here that is off by default
(as in timm), so fine-tuning is deterministic and resumable: ``rope_rescale=2.0`` turns it on.

Variants: ViT-S/16, S+/16, B/16, L/16, H+/16 and 7B/16 (LVD-1689M), L/16 and 7B/16 (SAT-493M, with
their own mean/std). S+, H+ and 7B have a SwiGLU MLP; 7B has no q/v bias.

Weights: transformers checkpoints (current and 4.x key names), the original release
(``dinov3``: ``storage_tokens``, fused ``qkv`` whose key bias ``bias_mask`` zeroes,
``ls1.gamma``, ``w1/w2/w3``) and timm (``timm``, ``vit_*_patch16_dinov3[_qkvb]``). timm's models
without ``_qkvb`` have no q/v bias; they load as zero biases (what they compute with). The release's
``rope_embed.periods`` buffer is dropped and the periods recomputed in fp32, as transformers and timm
do (timm notes the released buffers hold them rounded to bf16, which the original code uses). The
mask token is only used for masked pre-training: checkpoints without it (timm) load strictly and
report it as initialized.
"""

from __future__ import annotations

import math
from functools import partial

import attrs
import torch

from ..hookspecs import hookimpl
from ..specs import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, InputSpec, PrefixTokens, non_negative, positive_float
from ._common import has_keys, hf_model, rename, split_qkv
from ..layers.convert import convert_detected
from ._plainvit import PlainViT, PlainViTConfig

FAMILY = "dinov3"
REGISTERS = 4
SAT_MEAN = (0.430, 0.411, 0.296)
SAT_STD = (0.213, 0.156, 0.143)


def _at_least_one(instance, attribute, value):
    positive_float(instance, attribute, value)
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1 (1 turns the augmentation off), got {value!r}")


@attrs.frozen(kw_only=True)
class DINOv3Config(PlainViTConfig):
    """Architecture of a DINOv3 ViT variant.

    :param dim: token width. :param depth: blocks. :param heads: attention heads (``dim / heads``
        a multiple of 4, for the 2-D RoPE). :param registers: register tokens after CLS (4 in the releases).
    :param mlp_ratio: MLP hidden width / ``dim``; for SwiGLU the width of the gated layer (the
        release's ``ffn_ratio`` x 2/3: 4 for S+/H+, 2 for 7B). :param swiglu: SwiGLU MLP (SiLU), else GELU.
    :param qkv_bias: query and value biases (the key never has one). :param rope_theta: RoPE base period.
    :param rope_rescale: training-time random rescale of the RoPE coordinates, log-uniform in
        [1/r, r]; 1 (default) is off, 2 is the pre-training augmentation (the release's and transformers').
    """

    registers: int = attrs.field(default=REGISTERS, validator=non_negative)
    mlp_ratio: float = attrs.field(default=4.0, validator=positive_float)
    swiglu: bool = False
    qkv_bias: bool = True
    rope_theta: float = attrs.field(default=100.0, validator=positive_float)
    rope_rescale: float = attrs.field(default=1.0, validator=_at_least_one)
    layer_norm_eps: float = attrs.field(default=1e-5, validator=positive_float)

    def __attrs_post_init__(self):
        if (self.dim // self.heads) % 4:
            raise ValueError(f"dim / heads = {self.dim // self.heads} must be a multiple of 4 (2-D RoPE: "
                             "a sine and a cosine per axis)")
        if self.mlp_width < 1:
            raise ValueError(f"mlp_ratio={self.mlp_ratio} gives no MLP width for dim={self.dim}")

    @property
    def mlp_width(self) -> int:
        return int(self.dim * self.mlp_ratio)

    def prefix_tokens(self):
        return PrefixTokens(cls=True, registers=self.registers)


class DINOv3ViT(PlainViT):
    """transformers ``DINOv3ViTModel`` behind the backbone_sdk interface (weights under ``model.``)."""

    optional_keys = ("model.embeddings.mask_token",)

    def __init__(self, spec: BackboneSpec):
        super().__init__(spec)
        from transformers import DINOv3ViTConfig as HFConfig, DINOv3ViTModel

        cfg: DINOv3Config = spec.config
        config = HFConfig(
            hidden_size=cfg.dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
            intermediate_size=cfg.mlp_width, patch_size=cfg.patch_size, image_size=spec.input.image_size[0],
            num_register_tokens=cfg.registers, use_gated_mlp=cfg.swiglu, hidden_act="silu" if cfg.swiglu else "gelu",
            query_bias=cfg.qkv_bias, key_bias=False, value_bias=cfg.qkv_bias, rope_theta=cfg.rope_theta,
            pos_embed_rescale=cfg.rope_rescale if cfg.rope_rescale > 1 else None, layer_norm_eps=cfg.layer_norm_eps,
        )
        self.model = hf_model(DINOv3ViTModel, config)
        # RoPE is computed here from the config, not from the model's ``inv_freq`` buffer: that buffer
        # is in no checkpoint and would follow ``.half()``/``.to(torch.bfloat16)`` casts
        self.rope_theta, self.rope_rescale = cfg.rope_theta, cfg.rope_rescale
        self.head_dim = cfg.dim // cfg.heads

    @property
    def blocks(self):
        return self.model.model.layer

    def embed_tokens(self, images):
        return self.model.embeddings(images)

    def block_inputs(self, images):
        """``(cos, sin)`` RoPE tables ``[N, dim / heads]`` of this grid, in fp32 whatever the weights'
        dtype, cast to the images' dtype (as transformers does); randomly rescaled in training if
        ``rope_rescale > 1``."""
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        f32 = {"device": images.device, "dtype": torch.float32}
        # patch centres, normalized per axis to [-1, 1]
        ys, xs = torch.arange(0.5, h, **f32) / h, torch.arange(0.5, w, **f32) / w
        coords = 2.0 * torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1) - 1.0
        if self.model.training and self.rope_rescale > 1:
            bound = math.log(self.rope_rescale)
            coords = coords * torch.empty(1, **f32).uniform_(-bound, bound).exp()
        inv_freq = 1 / self.rope_theta ** torch.arange(0, 1, 4 / self.head_dim, **f32)
        angles = (2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]).flatten(1, 2).tile(2)
        return angles.cos().to(images.dtype), angles.sin().to(images.dtype)

    def call_block(self, x, block, cos, sin):
        return block(x, position_embeddings=(cos, sin))

    def final_norm(self, x):
        return self.model.norm(x)

    def stem(self):
        return self.model.embeddings

    def embed(self, images):
        return self.last_hidden_state(images)[:, 0]


def build(spec: BackboneSpec) -> DINOv3ViT:
    return DINOv3ViT(spec)


_VARIANTS = {
    # name: (dim, depth, heads, mlp_ratio, swiglu, qkv_bias, hub id, description)
    "dinov3_vits16": (384, 12, 6, 4.0, False, True, "facebook/dinov3-vits16-pretrain-lvd1689m", "ViT-S/16"),
    "dinov3_vits16plus": (384, 12, 6, 4.0, True, True, "facebook/dinov3-vits16plus-pretrain-lvd1689m", "ViT-S+/16"),
    "dinov3_vitb16": (768, 12, 12, 4.0, False, True, "facebook/dinov3-vitb16-pretrain-lvd1689m", "ViT-B/16"),
    "dinov3_vitl16": (1024, 24, 16, 4.0, False, True, "facebook/dinov3-vitl16-pretrain-lvd1689m", "ViT-L/16"),
    "dinov3_vith16plus": (1280, 32, 20, 4.0, True, True, "facebook/dinov3-vith16plus-pretrain-lvd1689m",
                          "ViT-H+/16"),
    "dinov3_vit7b16": (4096, 40, 32, 2.0, True, False, "facebook/dinov3-vit7b16-pretrain-lvd1689m", "ViT-7B/16"),
}
#: the satellite-imagery (SAT-493M) releases: same architectures, their own normalization
_SATELLITE = {"dinov3_vitl16_sat493m": "dinov3_vitl16", "dinov3_vit7b16_sat493m": "dinov3_vit7b16"}


def make_spec(name, dim, depth, heads, mlp_ratio=4.0, swiglu=False, qkv_bias=True, hub_id=None, description="", *,
              mean=IMAGENET_MEAN, std=IMAGENET_STD, image_size=224, neck=256, test=False) -> BackboneSpec:
    config = DINOv3Config(dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio, swiglu=swiglu, qkv_bias=qkv_bias,
                          neck_channels=neck)
    return BackboneSpec.from_config(
        config, name=name, family=FAMILY, builder=f"{__name__}:build",
        input=InputSpec(mean=mean, std=std, image_size=image_size, crop_pct=1.0),
        hub_id=hub_id, is_test=test, description=description,
    )


@hookimpl
def register_backbones(registry):
    for name, (*arch, hub_id, what) in _VARIANTS.items():
        registry.add(make_spec(name, *arch, hub_id, f"DINOv3 {what} (LVD-1689M)"))
    for name, base in _SATELLITE.items():
        *arch, hub_id, what = _VARIANTS[base]
        registry.add(make_spec(name, *arch, hub_id.replace("lvd1689m", "sat493m"), f"DINOv3 {what} (SAT-493M)",
                               mean=SAT_MEAN, std=SAT_STD))
    registry.add(make_spec("dinov3_test", 32, 2, 2, description="tiny DINOv3 ViT for tests", image_size=64, neck=16,
                           test=True))


# -- checkpoint conversion -------------------------------------------------------------------------
_BLOCK = r"model.model.layer.\1"
# the original release and timm share most of the block layout
_SHARED_RULES = [
    (r"^cls_token$", "model.embeddings.cls_token"),
    (r"^(storage_tokens|reg_token)$", "model.embeddings.register_tokens"),
    (r"^mask_token$", "model.embeddings.mask_token"),
    (r"^patch_embed\.proj\.", "model.embeddings.patch_embeddings."),
    (r"^blocks\.(\d+)\.norm(1|2)\.", _BLOCK + r".norm\2."),
    (r"^blocks\.(\d+)\.attn\.proj\.", _BLOCK + ".attention.o_proj."),
    (r"^blocks\.(\d+)\.attn\.(q|k|v)_proj\.", _BLOCK + r".attention.\2_proj."),
    (r"^blocks\.(\d+)\.attn\.(q|v)_bias$", _BLOCK + r".attention.\2_proj.bias"),
    (r"^blocks\.(\d+)\.(?:ls(1|2)\.gamma|gamma_(1|2))$",
     lambda m: f"model.model.layer.{m.group(1)}.layer_scale{m.group(2) or m.group(3)}.lambda1"),
    (r"^blocks\.(\d+)\.mlp\.(?:w1|fc1_g)\.", _BLOCK + ".mlp.gate_proj."),
    (r"^blocks\.(\d+)\.mlp\.(?:w2|fc1_x|fc1)\.", _BLOCK + ".mlp.up_proj."),
    (r"^blocks\.(\d+)\.mlp\.(?:w3|fc2)\.", _BLOCK + ".mlp.down_proj."),
    (r"^norm\.", "model.norm."),
]
# buffers recomputed here, training-only parts (local-crop CLS norm, distillation heads), classifiers
_DROP = [r"^rope_embed\.", r"^rope\.", r"\.bias_mask$", r"\.k_bias$", r"^local_cls_norm\.", r"^projectors\.",
         r"^head\.", r"^fc_norm\."]


def _mask_qkv_bias(state):
    """Apply the release's ``bias_mask`` (it zeroes the key part) to fused qkv biases."""
    for key in [k for k in state if k.endswith(".attn.qkv.bias")]:
        mask = state.get(key[: -len("bias")] + "bias_mask")
        if mask is not None:
            state[key] = state[key] * mask.to(state[key].dtype)
    return state


def _drop_zero_key_bias(state):
    """The model has no key bias: drop key biases that are zero (masked); others stay and fail loudly."""
    for key in [k for k in state if k.endswith(".attention.k_proj.bias")]:
        if not bool((state[key] == 0).all()):
            continue
        del state[key]
    return state


def _zero_qv_bias(state, qkv_bias: bool):
    """timm's models without ``_qkvb`` have no q/v bias: give them the zero bias they compute with."""
    if not qkv_bias:
        return state
    for key in [k for k in state if k.endswith(".attention.q_proj.weight")]:
        for c in "qv":
            name = key.replace(".q_proj.weight", f".{c}_proj.bias")
            state.setdefault(name, state[key].new_zeros(state[key].shape[0]))
    return state


def convert_release(state, qkv_bias: bool, fmt: str):
    """Original DINOv3 release (``fmt="dinov3"``) or timm layout -> native keys."""
    state = dict(state)
    mask = state.get("mask_token")
    if mask is not None and mask.dim() == 2:
        state["mask_token"] = mask.unsqueeze(1)  # the release stores [1, D]
    state = _mask_qkv_bias(state)
    state = rename(split_qkv(state, "qkv"), _SHARED_RULES, drop=_DROP)
    state = _drop_zero_key_bias(state)
    return _zero_qv_bias(state, qkv_bias) if fmt == "timm" else state


def convert_transformers(state):
    """transformers ``DINOv3ViTModel``/``Backbone`` layouts: 5.x (``model.layer.N``) and the hub's 4.x (``layer.N``)."""
    state = rename(state, [(r"^layer\.", "model.layer.")], drop=[r"inv_freq$"])
    return {f"model.{k}": v for k, v in state.items()}


def detect_format(state) -> str | None:
    if has_keys(state, "patch_embed.proj.", "blocks."):
        if "storage_tokens" in state or any(k.endswith((".ls1.gamma", ".mlp.w1.weight")) for k in state):
            return "dinov3"
        return "timm"
    if has_keys(state, "embeddings.patch_embeddings."):
        return "transformers"
    return None


@hookimpl
def convert_checkpoint(spec, state_dict, source_format):
    release = {f: partial(convert_release, qkv_bias=spec.config.qkv_bias, fmt=f) for f in ("dinov3", "timm")}
    return convert_detected(state_dict, source_format, detect_format(state_dict),
                            {**release, "transformers": convert_transformers}, same_layout=[release])
