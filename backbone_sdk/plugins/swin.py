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

import torch
from torch import nn
from torch.nn import functional as F

from ..backbone import Backbone
from ..hookspecs import hookimpl
from ..specs import BackboneSpec, FeatureInfo, InputSpec, Tokens
from ._common import has_keys, hf_model, rename, run, split_qkv, strip_prefixes

FAMILY = "swin"
_MASKED = -100.0  # the additive mask value of the reference implementation (exactly reproduced)


class Swin(Backbone):
    """transformers ``SwinModel`` behind the backbone_sdk interface (weights under ``model.``)."""

    def __init__(self, spec: BackboneSpec):
        super().__init__(spec)
        from transformers import SwinConfig, SwinModel

        cfg = spec.config
        config = SwinConfig(
            image_size=spec.input.image_size[0], patch_size=spec.input.patch_size, embed_dim=cfg["embed_dim"],
            depths=list(cfg["depths"]), num_heads=list(cfg["heads"]), window_size=cfg["window"],
            drop_path_rate=cfg.get("drop_path_rate", 0.0), layer_norm_eps=1e-5,
        )
        self.model = hf_model(SwinModel, config, add_pooling_layer=False)
        self.window = cfg["window"]
        self.grad_checkpointing = False

    def _features(self, images, levels):
        out, last = {}, self.spec.feature_names.index(levels[-1])
        x, dims = self.model.embeddings(images)
        for i, stage in enumerate(self.model.encoder.layers[: last + 1]):
            x = self._run_stage(stage, x, dims)
            name = f"stage{i + 1}"
            if name == "stage4":
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

    def tokens(self, images, layer=-1):
        """Stage ``layer`` (0-3, negative from the end) as ``[B, h*w, C]`` patches; no CLS token."""
        names, n = self.spec.feature_names, len(self.spec.feature_names)
        if not -n <= layer < n:
            raise IndexError(f"{self.spec.name} has {n} stages; layer must be in [-{n}, {n - 1}], got {layer}")
        name = names[layer]
        fmap = self.features(images, name)[name]
        return Tokens(patches=fmap.flatten(2).transpose(1, 2), grid=tuple(fmap.shape[-2:]))

    def stage_modules(self):
        return [self.model.embeddings, *self.model.encoder.layers]

    def set_grad_checkpointing(self, enable=True):
        """Recompute each Swin block in backward (per block, so deep stages do not hold all activations)."""
        self.grad_checkpointing = enable


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
    return BackboneSpec(
        name=name, family=FAMILY, builder=f"{__name__}:build",
        # crop_pct as timm's pretrained configs (0.9 at 224, 1.0 at 384)
        input=InputSpec(image_size=res, patch_size=4, min_size=32, crop_pct=0.9 if res < 384 else 1.0),
        features=[FeatureInfo(f"stage{i + 1}", dim * 2**i, 4 * 2**i) for i in range(4)],
        embed_dim=dim * 8, hub_id=hub_id, is_test=hub_id is None,
        config={"embed_dim": dim, "depths": depths, "heads": heads, "window": window},
        description=description,
    )


@hookimpl
def register_backbones(register):
    for name, args in _VARIANTS.items():
        register(make_spec(name, *args))
    register(make_spec("swin_test", None, 2, 64, None, "tiny Swin for tests", dims=(16, (2, 2, 1, 1), (1, 1, 2, 2))))


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
    for kind in ("weight", "bias"):
        state = split_qkv(state, f".qkv.{kind}", lambda p: tuple(f"{p}.{c}_proj.{kind}" for c in "qkv"))
    return state


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
    if spec.family != FAMILY:
        return None
    if source_format in (None, "timm", "original") and has_keys(state_dict, "patch_embed.proj.", "layers.0.blocks."):
        original = has_keys(state_dict, "layers.0.downsample.")
        return convert_timm(state_dict, downsample_first=not original), "original" if original else "timm"
    if source_format in (None, "transformers") and (
        has_keys(state_dict, "swin.embeddings.") or has_keys(state_dict, "embeddings.patch_embeddings.")
    ):
        return convert_transformers(state_dict), "transformers"
    return None
