"""Swin Transformer (Liu et al. 2021, https://arxiv.org/abs/2103.14030) on transformers' ``SwinModel``.

Features ``stage1..stage4`` at strides 4, 8, 16, 32 with ``C, 2C, 4C, 8C`` channels: each stage's
output *before* its patch-merging downsample. ``stage1..stage3`` are the raw residual streams;
``stage4`` goes through the model's final ``layernorm``, so it equals ``SwinModel.last_hidden_state``
(and timm's ``forward_features``) and ``embed`` is its mean (``SwinModel.pooler_output``).
Why not per-stage norms like transformers' ``SwinBackbone`` or the mmdet/detectron2 Swin: those
norms are new parameters that classification checkpoints do not hold, so "pretrained" features would
silently pass through randomly initialized layers. Add your own norms in the head if you want them.

Any input size works: the image is padded to a multiple of the patch size, every block pads its map
to whole windows, and odd maps are padded before patch merging, so ``stageN`` is
``ceil(H / stride) x ceil(W / stride)``. Window placement follows the classification model:
blocks with odd index use a shift of ``window // 2`` unless the map is no larger than one window
(``min(h, w) <= window``), where there is nothing to shift. Unlike ``SwinModel.forward``, the window
is never shrunk below its trained size (that breaks the relative-position table and, in transformers
5.24, raises for maps smaller than a window) and no state is stored on the modules between calls
(``SwinModel`` rewrites ``shift_size`` of its layers on every call, so an earlier small input changes
later outputs).

Weights: transformers hub checkpoints (``microsoft/swin-*``), timm state dicts (``downsample`` at the
start of stages 1-3) and the original Microsoft release / timm < 0.9 (``downsample`` at the end of
stages 0-2, persistent ``relative_position_index``/``attn_mask`` buffers).
"""

from __future__ import annotations

import attrs
import torch
from torch.nn import functional as F

from ..backbone import Backbone
from ..hookspecs import hookimpl
from ..specs import BackboneConfig, BackboneSpec, FeatureInfo, InputSpec, count_of, positive
from ._common import has_keys, hf_model, read_hf_pretrained, rename, run, split_qkv, strip_prefixes

FAMILY = "swin"
_MASKED = -100.0  # the additive mask value of the reference implementation (exactly reproduced)


def _heads(instance, attribute, value):
    count_of(4)(instance, attribute, value)
    bad = [(i, h) for i, h in enumerate(value) if (instance.embed_dim * 2**i) % h]
    if bad:
        raise ValueError(f"heads {value!r} must divide the stage widths {[instance.embed_dim * 2**i for i in range(4)]}")


def _unit_interval(instance, attribute, value):
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1), got {value!r}")


@attrs.frozen(kw_only=True)
class SwinConfig(BackboneConfig):
    """Architecture of a Swin variant.

    :param embed_dim: channels ``C`` of stage 1 (stages have ``C, 2C, 4C, 8C``). :param depths: blocks
    per stage. :param heads: attention heads per stage (dividing its width). :param window: window
    side in tokens. :param patch_size: side of the stem's patches (stride of stage 1).
    :param drop_path_rate: stochastic-depth rate of the last block (linear from 0).
    """

    embed_dim: int = attrs.field(validator=positive)
    depths: tuple[int, ...] = attrs.field(converter=tuple, validator=count_of(4))
    heads: tuple[int, ...] = attrs.field(converter=tuple, validator=_heads)
    window: int = attrs.field(default=7, validator=positive)
    patch_size: int = attrs.field(default=4, validator=positive)
    drop_path_rate: float = attrs.field(default=0.0, validator=_unit_interval)

    def feature_info(self, input):
        return [FeatureInfo(f"stage{i + 1}", self.embed_dim * 2**i, self.patch_size * 2**i) for i in range(4)]

    def embedding_dim(self):
        return self.embed_dim * 8

    def input_spec(self, input):
        return attrs.evolve(input, patch_size=self.patch_size)


class Swin(Backbone):
    """transformers ``SwinModel`` behind the backbone_sdk interface (weights under ``model.``)."""

    def __init__(self, spec: BackboneSpec):
        super().__init__(spec)
        from transformers import SwinConfig as HFSwinConfig, SwinModel

        cfg: SwinConfig = spec.config
        config = HFSwinConfig(
            image_size=spec.input.image_size[0], patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
            depths=list(cfg.depths), num_heads=list(cfg.heads), window_size=cfg.window,
            drop_path_rate=cfg.drop_path_rate, layer_norm_eps=1e-5,
        )
        self.model = hf_model(SwinModel, config, add_pooling_layer=False)
        self.window = cfg.window
        self.grad_checkpointing = False

    def _features(self, images, levels):
        names = self.spec.feature_names
        out, last = {}, names.index(levels[-1])
        x, dims = self.model.embeddings(images)
        for i, stage in enumerate(self.model.encoder.layers[: last + 1]):
            x = self._run_stage(stage, x, dims)
            name = names[i]
            if i == len(names) - 1:
                x = self.model.layernorm(x)
            if name in levels:
                out[name] = x.transpose(1, 2).reshape(x.shape[0], x.shape[-1], *dims)
            if i < last:
                x = stage.downsample(x, dims)
                dims = ((dims[0] + 1) // 2, (dims[1] + 1) // 2)
        return out

    def _run_stage(self, stage, x, dims):
        """The blocks of one stage on a ``[B, h*w, C]`` sequence (no downsample)."""
        ws = self.window
        shift = ws // 2 if min(dims) > ws else 0
        mask = shift_mask(-(-dims[0] // ws) * ws, -(-dims[1] // ws) * ws, ws, shift, x.device) if shift else None
        for j, layer in enumerate(stage.blocks):
            odd = j % 2 == 1 and shift > 0
            x = run(swin_block, x, self.grad_checkpointing, layer, dims, ws, shift if odd else 0, mask if odd else None,
                    owner=layer)
        return x

    def embed(self, images):
        """Mean of the final-normed last stage (``SwinModel.pooler_output``)."""
        return self.features(images, "stage4")["stage4"].mean(dim=(2, 3))

    def stage_modules(self):
        return [self.model.embeddings, *self.model.encoder.layers]

    def set_grad_checkpointing(self, enable=True):
        """Recompute each Swin block in backward (per block, so deep stages do not hold all activations)."""
        self.grad_checkpointing = enable

    def no_weight_decay(self):
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}

    def read_pretrained(self, directory):
        return read_hf_pretrained(self.model, directory)


def _partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """``[B, H, W, C]`` (H, W multiples of ``ws``) -> ``[B * windows, ws * ws, C]``, windows row-major."""
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).transpose(2, 3).reshape(-1, ws * ws, c)


def _merge(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`_partition`: ``[B * windows, ws * ws, C]`` -> ``[B, H, W, C]``."""
    c = windows.shape[-1]
    return windows.view(-1, h // ws, w // ws, ws, ws, c).transpose(2, 3).reshape(-1, h, w, c)


def shift_mask(h: int, w: int, ws: int, shift: int, device) -> torch.Tensor:
    """Additive ``[windows, ws*ws, ws*ws]`` mask keeping shifted-window attention inside the regions
    that were contiguous before the cyclic shift (``h``, ``w``: the padded map size)."""
    def regions(n):
        idx = torch.arange(n, device=device)
        return (idx >= n - ws).long() + (idx >= n - shift).long()

    label = (regions(h)[:, None] * 3 + regions(w)[None, :]).view(1, h, w, 1)
    label = _partition(label, ws).squeeze(-1)
    return torch.zeros(label.shape[0], ws * ws, ws * ws, device=device).masked_fill(
        label[:, None, :] != label[:, :, None], _MASKED)


def swin_block(x, layer, dims, ws: int, shift: int, mask):
    """One Swin block (``SwinLayer`` weights): (shifted-)window attention + MLP on ``[B, h*w, C]``.

    Stochastic depth applies to both residual branches as in the paper (``SwinLayer`` skips the MLP one).
    """
    b, n, c = x.shape
    h, w = dims
    y = layer.layernorm_before(x).view(b, h, w, c)
    pad_h, pad_w = -h % ws, -w % ws
    y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))  # zero tokens, attended unmasked as in the reference
    if shift:
        y = torch.roll(y, (-shift, -shift), dims=(1, 2))
    attn = layer.attention(_partition(y, ws), None if mask is None else mask.to(y.dtype))[0]
    y = _merge(attn, ws, h + pad_h, w + pad_w)
    if shift:
        y = torch.roll(y, (shift, shift), dims=(1, 2))
    x = x + layer.drop_path(y[:, :h, :w].reshape(b, n, c))
    return x + layer.drop_path(layer.mlp(layer.layernorm_after(x)))


def build(spec: BackboneSpec) -> Swin:
    return Swin(spec)


_SIZES = {
    # size: (embed dim C, depths, heads)
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}

_VARIANTS = {
    # name: (size, window, resolution, hub id, description)
    "swin_tiny_patch4_window7_224": ("tiny", 7, 224, "microsoft/swin-tiny-patch4-window7-224", "Swin-T"),
    "swin_small_patch4_window7_224": ("small", 7, 224, "microsoft/swin-small-patch4-window7-224", "Swin-S"),
    "swin_base_patch4_window7_224": ("base", 7, 224, "microsoft/swin-base-patch4-window7-224", "Swin-B"),
    "swin_base_patch4_window12_384": ("base", 12, 384, "microsoft/swin-base-patch4-window12-384", "Swin-B @384"),
    "swin_large_patch4_window7_224": ("large", 7, 224, "microsoft/swin-large-patch4-window7-224", "Swin-L (IN-22k, ft IN-1k)"),
    "swin_large_patch4_window12_384": ("large", 12, 384, "microsoft/swin-large-patch4-window12-384", "Swin-L @384 (IN-22k, ft IN-1k)"),
}


def make_spec(name, size, window, res, hub_id, description, *, dims=None) -> BackboneSpec:
    dim, depths, heads = dims or _SIZES[size]
    return BackboneSpec.from_config(
        SwinConfig(embed_dim=dim, depths=depths, heads=heads, window=window),
        name=name, family=FAMILY, builder=f"{__name__}:build",
        # crop_pct as timm's pretrained configs (0.9 at 224, 1.0 at 384)
        input=InputSpec(image_size=res, min_size=32, crop_pct=0.9 if res < 384 else 1.0),
        hub_id=hub_id, is_test=hub_id is None, description=description,
    )


@hookimpl
def register_backbones(registry):
    for name, args in _VARIANTS.items():
        registry.add(make_spec(name, *args))
    registry.add(make_spec("swin_test", None, 2, 64, None, "tiny Swin for tests", dims=(16, (2, 2, 1, 1), (1, 1, 2, 2))))


# -- checkpoint conversion -------------------------------------------------------------------------
_BLOCK_RULES = [
    (r"^patch_embed\.proj\.", "model.embeddings.patch_embeddings.projection."),
    (r"^patch_embed\.norm\.", "model.embeddings.norm."),
    (r"^layers\.(\d+)\.blocks\.", r"model.encoder.layers.\1.blocks."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
    (r"\.attn\.proj\.", ".attention.o_proj."),
    (r"\.attn\.qkv\.", ".attention.qkv."),
    (r"\.attn\.relative_position_bias_table$", ".attention.relative_position_bias.relative_position_bias_table"),
    (r"^norm\.", "model.layernorm."),
]
# buffers older checkpoints saved (recomputed here) and the classifier
_TIMM_DROP = [r"^head\.", r"relative_position_index$", r"attn_mask$"]


def convert_timm(state, downsample_first: bool):
    """timm (``downsample_first``: timm >= 0.9) or original-release Swin keys -> native keys."""
    shift = 1 if downsample_first else 0
    rules = [(r"^layers\.(\d+)\.downsample\.",
              lambda m: f"model.encoder.layers.{int(m.group(1)) - shift}.downsample."), *_BLOCK_RULES]
    state = rename(state, rules, drop=_TIMM_DROP)
    return split_qkv(state, "qkv")


# transformers 4.x names (checkpoints on the hub still use them)
_LEGACY_RULES = [
    (r"\.attention\.self\.(query|key|value)\.", lambda m: f".attention.{m.group(1)[0]}_proj."),
    (r"\.attention\.self\.relative_position_bias_table$",
     ".attention.relative_position_bias.relative_position_bias_table"),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
]


def convert_transformers(state):
    state = strip_prefixes(state, ["swin."])
    state = rename(state, _LEGACY_RULES, drop=[r"^classifier\.", r"^pooler", r"relative_position_index$"])
    return {f"model.{k}": v for k, v in state.items()}


@hookimpl
def convert_checkpoint(spec, state_dict, source_format):
    if source_format in (None, "timm", "original") and has_keys(state_dict, "patch_embed.proj.", "layers.0.blocks."):
        original = has_keys(state_dict, "layers.0.downsample.")
        return convert_timm(state_dict, downsample_first=not original), "original" if original else "timm"
    if source_format in (None, "transformers") and (
        has_keys(state_dict, "swin.embeddings.") or has_keys(state_dict, "embeddings.patch_embeddings.")
    ):
        return convert_transformers(state_dict), "transformers"
    return None
