"""DINOv2 (Oquab et al. 2023, https://arxiv.org/abs/2304.07193) and DINOv2 with registers
(Darcet et al. 2023, https://arxiv.org/abs/2309.16588), on transformers' ``Dinov2Model`` and
``Dinov2WithRegistersModel``.

Features ``block{i}`` (every block, stride 14); ``embed`` is the final-normed CLS token;
``tokens()`` separates CLS, the 4 register tokens and the patch tokens; ``pyramid`` is a simple
feature pyramid. Position embeddings are trained for 518x518 (a 37x37 grid) and resampled
bicubically for other sizes.

Resampling, as in the original releases by default: the four original models (``dinov2_vit*14``)
stretch the bicubic scale factor by 0.1 patch (``scale_factor=(h + 0.1) / 37``) without
antialiasing, as ``dinov2==0.0.1`` does; the register models resample to the exact grid with
antialiasing, as their release does. transformers' ``Dinov2Model`` and timm resample to the exact
grid (``pos_embed_offset=0``; antialias off in transformers' non-register model, on in timm):
pick them with the ``pos_embed_offset`` / ``pos_embed_antialias`` overrides. At the native size no
resampling happens and the choice has no effect.

Weights: transformers checkpoints (current and 4.x key names), the original DINOv2 release
(``dinov2``) and timm (``timm``) state dicts. The mask token is only used for masked pre-training:
checkpoints without it (timm) load strictly and report it as initialized.
"""

from __future__ import annotations

import math
from functools import partial

import attrs
import torch
import torch.nn.functional as F

from ..hookspecs import hookimpl
from ..specs import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, InputSpec, PrefixTokens, non_negative, positive
from ._common import has_keys, hf_model, rename, split_qkv, strip_prefixes
from ..layers.convert import convert_detected
from ._plainvit import PlainViT, PlainViTConfig

FAMILY = "dinov2"
PATCH = 14
NATIVE_SIZE = 518
#: the original release's bicubic scale-factor stretch (dinov2 0.0.1, models without registers)
RELEASE_OFFSET = 0.1


def _offset(instance, attribute, value):
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1), got {value!r}")


@attrs.frozen(kw_only=True)
class DINOv2Config(PlainViTConfig):
    """Architecture of a DINOv2 variant.

    :param dim: token width. :param depth: blocks. :param heads: attention heads (divide ``dim``).
    :param registers: register tokens after CLS (0 or 4 in the releases). :param swiglu: SwiGLU MLP (ViT-g).
    :param pos_embed_size: image side the position table was trained for (518 = 37x37 patches).
    :param pos_embed_offset: patch offset added to the resampling scale factor (0.1 in the original
        release; 0 resamples to the exact grid, as transformers and timm and the register release).
    :param pos_embed_antialias: antialias when resampling (off in the original release, on for registers).
    """

    registers: int = attrs.field(default=0, validator=non_negative)
    swiglu: bool = False
    mlp_ratio: int = attrs.field(default=4, validator=positive)
    patch_size: int = attrs.field(default=PATCH, validator=positive)
    pos_embed_size: int = attrs.field(default=NATIVE_SIZE, validator=positive)
    pos_embed_offset: float = attrs.field(default=RELEASE_OFFSET, validator=_offset)
    pos_embed_antialias: bool = False
    layer_norm_eps: float = 1e-6

    def prefix_tokens(self):
        return PrefixTokens(cls=True, registers=self.registers)


class DINOv2(PlainViT):
    """transformers ``Dinov2Model`` (or ``Dinov2WithRegistersModel``) behind the backbone_sdk interface."""

    optional_keys = ("model.embeddings.mask_token",)

    def __init__(self, spec: BackboneSpec):
        super().__init__(spec)
        cfg: DINOv2Config = spec.config
        self.num_registers = cfg.registers
        if self.num_registers:
            from transformers import Dinov2WithRegistersConfig as Config, Dinov2WithRegistersModel as Model

            extra = {"num_register_tokens": self.num_registers}
        else:
            from transformers import Dinov2Config as Config, Dinov2Model as Model

            extra = {}
        config = Config(
            hidden_size=cfg.dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio, image_size=cfg.pos_embed_size, patch_size=cfg.patch_size,
            layer_norm_eps=cfg.layer_norm_eps, use_swiglu_ffn=cfg.swiglu, qkv_bias=True, **extra,
        )
        self.model = hf_model(Model, config)
        # what the wrapped transformers model does itself: exact grid, antialias only with registers
        self.native_antialias = bool(self.num_registers)
        self.native_resampling = cfg.pos_embed_offset == 0 and cfg.pos_embed_antialias == self.native_antialias
        self.pos_embed_antialias = cfg.pos_embed_antialias
        self.pos_embed_offset = cfg.pos_embed_offset

    @property
    def blocks(self):
        # a property, not an attribute: assigning the ModuleList would register it a second time
        # and duplicate every block's weights under "blocks." in the state dict
        return self.model.encoder.layer

    def pos_embed(self, height: int, width: int, antialias: bool | None = None,
                  offset: float | None = None) -> torch.Tensor:
        """Position embeddings ``[1, 1 + N, D]`` (CLS first) for ``height x width`` pixel images.

        The patch part of the table is resampled bicubically in fp32 (``align_corners=False``): with
        ``offset > 0`` by the scale factor ``(grid + offset) / side`` as the original release does,
        with ``offset == 0`` to the exact grid. The CLS entry is kept. Defaults: this backbone's config.
        """
        table = self.model.embeddings.position_embeddings
        grid = (height // self.patch_size, width // self.patch_size)
        side = math.isqrt(table.shape[1] - 1)
        if grid == (side, side):
            return table
        antialias = self.pos_embed_antialias if antialias is None else antialias
        offset = self.pos_embed_offset if offset is None else offset
        target = {"scale_factor": ((grid[0] + offset) / side, (grid[1] + offset) / side)} if offset else {"size": grid}
        patch = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        patch = F.interpolate(patch, mode="bicubic", align_corners=False, antialias=antialias, **target)
        patch = patch.to(table.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
        return torch.cat([table[:, :1], patch], dim=1)

    def embed_tokens(self, images):
        emb = self.model.embeddings
        if self.native_resampling:
            return emb(images)
        x = emb.patch_embeddings(images)
        x = torch.cat([emb.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed(images.shape[-2], images.shape[-1])
        if self.num_registers:
            x = torch.cat([x[:, :1], emb.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        return emb.dropout(x)

    def final_norm(self, x):
        return self.model.layernorm(x)

    def stem(self):
        return self.model.embeddings

    def embed(self, images):
        return self.last_hidden_state(images)[:, 0]


def build(spec: BackboneSpec) -> DINOv2:
    return DINOv2(spec)


# letter: (dim, depth, heads, hub size name)
_SIZES = {"s": (384, 12, 6, "small"), "b": (768, 12, 12, "base"), "l": (1024, 24, 16, "large"),
          "g": (1536, 40, 24, "giant")}
REGISTERS = 4


def make_spec(name, dim, depth, heads, *, registers=0, swiglu=False, hub_id=None, description="",
              pos_embed_size=NATIVE_SIZE, image_size=224, neck=256, test=False) -> BackboneSpec:
    # as released: the register models resample to the exact grid with antialiasing
    config = DINOv2Config(dim=dim, depth=depth, heads=heads, registers=registers, swiglu=swiglu,
                          pos_embed_size=pos_embed_size, pos_embed_offset=0.0 if registers else RELEASE_OFFSET,
                          pos_embed_antialias=bool(registers), neck_channels=neck)
    return BackboneSpec.from_config(
        config, name=name, family=FAMILY, builder=f"{__name__}:build",
        input=InputSpec(mean=IMAGENET_MEAN, std=IMAGENET_STD, image_size=image_size),
        hub_id=hub_id, is_test=test, description=description,
    )


@hookimpl
def register_backbones(registry):
    for letter, (dim, depth, heads, size) in _SIZES.items():
        for registers in (0, REGISTERS):
            suffix, hub = ("_reg", "with-registers-") if registers else ("", "")
            registry.add(make_spec(
                f"dinov2_vit{letter}14{suffix}", dim, depth, heads, registers=registers, swiglu=letter == "g",
                hub_id=f"facebook/dinov2-{hub}{size}",
                description=f"DINOv2 ViT-{letter.upper()}/14" + (" with 4 registers" if registers else ""),
            ))
    tiny = dict(pos_embed_size=56, image_size=56, neck=16, test=True)
    registry.add(make_spec("dinov2_test", 32, 2, 2, description="tiny DINOv2 for tests", **tiny))
    registry.add(make_spec("dinov2_reg_test", 32, 2, 2, registers=REGISTERS,
                           description="tiny DINOv2 with registers for tests", **tiny))


# -- checkpoint conversion -------------------------------------------------------------------------
# the original release and timm share the block layout; timm says reg_token and has no mask_token
_RELEASE_RULES = [
    (r"^blocks\.\d+\.(\d+)\.", r"blocks.\1."),  # block chunks of training checkpoints hold global indices
    (r"^cls_token$", "model.embeddings.cls_token"),
    (r"^mask_token$", "model.embeddings.mask_token"),
    (r"^(register_tokens|reg_token)$", "model.embeddings.register_tokens"),
    (r"^pos_embed$", "model.embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.", "model.embeddings.patch_embeddings.projection."),
    (r"^blocks\.(\d+)\.norm(1|2)\.", r"model.encoder.layer.\1.norm\2."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"model.encoder.layer.\1.attention.o_proj."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"model.encoder.layer.\1.attention.qkv."),
    (r"^blocks\.(\d+)\.ls(1|2)\.gamma$", r"model.encoder.layer.\1.layer_scale\2.lambda1"),
    (r"^blocks\.(\d+)\.mlp\.", r"model.encoder.layer.\1.mlp."),
    (r"^norm\.", "model.layernorm."),
]
_LEGACY_TRANSFORMERS_RULES = [
    (r"\.attention\.attention\.(query|key|value)\.", lambda m: f".attention.{m.group(1)[0]}_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.mlp\.weights_in\.", ".mlp.w12."),
    (r"\.mlp\.weights_out\.", ".mlp.down_proj."),
]


def _split_swiglu(state, swiglu: bool):
    """Fused SwiGLU input ``w12`` (first half gate, second half up) and ``w3`` to transformers' names.

    timm packs the same fused layer as ``mlp.fc1``/``mlp.fc2``; only SwiGLU variants split it.
    """
    if swiglu:
        state = rename(state, [(r"\.mlp\.fc1\.", ".mlp.w12."), (r"\.mlp\.(fc2|w3)\.", ".mlp.down_proj.")])
    for kind in ("weight", "bias"):
        for key in [k for k in state if k.endswith(f".mlp.w12.{kind}")]:
            gate, up = state.pop(key).chunk(2, dim=0)
            prefix = key[: -len(f"w12.{kind}")]
            state[f"{prefix}gate_proj.{kind}"], state[f"{prefix}up_proj.{kind}"] = gate.contiguous(), up.contiguous()
    return state


def convert_release(state, swiglu: bool):
    """Original DINOv2 release or timm layout -> native keys."""
    state = dict(state)
    pos = state.get("pos_embed")
    if pos is not None and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
        # timm's register models keep no CLS position (no_embed_class) and fold it into cls_token
        state["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
    state = rename(state, _RELEASE_RULES, drop=[r"^head\.", r"^fc_norm\.", r"^norm_pre\.", r"^pre_logits"])
    return _split_swiglu(split_qkv(state, "qkv"), swiglu)


def convert_transformers(state):
    """transformers ``Dinov2*`` layouts (bare, ``dinov2.``/``dinov2_with_registers.`` prefixed, 4.x names)."""
    state = strip_prefixes(state, ["dinov2_with_registers.", "dinov2."])
    state = {k: v for k, v in state.items() if not k.startswith(("classifier.", "pooler.", "head."))}
    state = rename(state, _LEGACY_TRANSFORMERS_RULES)
    return _split_swiglu({f"model.{k}": v for k, v in state.items()}, swiglu=False)


def detect_format(state) -> str | None:
    if has_keys(state, "patch_embed.proj.", "blocks."):
        original = any(k in state for k in ("mask_token", "register_tokens")) or any(".mlp.w12." in k for k in state)
        return "dinov2" if original else "timm"
    if has_keys(state, "embeddings.patch_embeddings.") or has_keys(state, "dinov2.") \
            or has_keys(state, "dinov2_with_registers."):
        return "transformers"
    return None


@hookimpl
def convert_checkpoint(spec, state_dict, source_format):
    release = partial(convert_release, swiglu=spec.config.swiglu)
    return convert_detected(state_dict, source_format, detect_format(state_dict),
                            {"dinov2": release, "timm": release, "transformers": convert_transformers},
                            same_layout=[("dinov2", "timm")])
