"""DINOv3 ConvNeXt (Siméoni et al. 2025, https://arxiv.org/abs/2508.10104; ConvNeXt: Liu et al.
2022, https://arxiv.org/abs/2201.03545), distilled from DINOv3 ViT-7B, on transformers'
``DINOv3ConvNextModel``.

Features ``stage1..stage4`` at strides 4, 8, 16, 32 with the stage widths; they are the native
pyramid ``p2..p5``. ``stage1..stage3`` are the raw stage outputs; ``stage4`` goes through the
model's final LayerNorm, so it equals the patch tokens of ``DINOv3ConvNextModel.last_hidden_state``
and the release's ``x_norm_patchtokens`` / ``get_intermediate_layers(norm=True)``, as in the Swin
plugin (transformers' ``DINOv3ConvNextBackbone`` and timm's ``forward_intermediates`` return the last
stage before that norm). ``embed`` is that LayerNorm applied to the global average of the raw last
stage (``pooler_output``, the release's ``x_norm_clstoken``, timm's ``forward_head(pre_logits=True)``).
Only the stages needed for the requested levels run. H and W must be multiples of 32 (the four
downsamplings floor odd sizes).

Weights: transformers checkpoints (current and 4.x key names), the original release (``dinov3``:
``downsample_layers.*``, ``stages.N.M.dwconv/pwconv1/pwconv2/gamma``, ``norm``) and timm's
``convnext_*`` layout (``timm``: ``stem.*``, ``stages.N.downsample.*``, ``stages.N.blocks.M.*``,
``head.norm``; Linear pointwise convs, ``conv_mlp=False``).
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from ..backbone import Backbone
from ..hookspecs import hookimpl
from ..specs import IMAGENET_MEAN, IMAGENET_STD, BackboneConfig, BackboneSpec, FeatureInfo, InputSpec, count_of, \
    positive_float
from ..layers.convert import convert_detected
from ._common import has_keys, read_hf_pretrained, rename, run

FAMILY = "dinov3_convnext"
DIVISOR = 32


def _rate(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1), got {value!r}")


@attrs.frozen(kw_only=True)
class DINOv3ConvNextConfig(BackboneConfig):
    """Architecture of a DINOv3 ConvNeXt variant.

    :param depths: blocks per stage (4). :param dims: channels per stage (4): the widths of
        ``stage1..stage4``. :param drop_path_rate: stochastic depth of the last block (linear from 0).
    :param layer_norm_eps: epsilon of every LayerNorm.
    """

    depths: tuple[int, ...] = attrs.field(converter=tuple, validator=count_of(4))
    dims: tuple[int, ...] = attrs.field(converter=tuple, validator=count_of(4))
    drop_path_rate: float = attrs.field(default=0.0, validator=_rate)
    layer_norm_eps: float = attrs.field(default=1e-6, validator=positive_float)

    def feature_info(self, input):
        return [FeatureInfo(f"stage{i + 1}", d, 4 * 2**i) for i, d in enumerate(self.dims)]

    def embedding_dim(self):
        return self.dims[-1]

    def input_spec(self, input):
        return attrs.evolve(input, size_divisibility=DIVISOR, min_size=DIVISOR)


def _apply(x, group):
    """Run a stage group: a transformers stage (downsample + blocks) or a list of blocks."""
    if isinstance(group, nn.ModuleList):
        for layer in group:
            x = layer(x)
        return x
    return group(x)


class DINOv3ConvNext(Backbone):
    """transformers ``DINOv3ConvNextModel`` behind the backbone_sdk interface (weights under ``model.``)."""

    #: NHWC weights: 1.08x on ConvNeXt-T (fp32 CPU, batch 8, 224x224), identical outputs
    prefers_channels_last = True

    def __init__(self, spec: BackboneSpec):
        super().__init__(spec)
        from transformers import DINOv3ConvNextConfig as HFConfig, DINOv3ConvNextModel

        cfg: DINOv3ConvNextConfig = spec.config
        config = HFConfig(hidden_sizes=list(cfg.dims), depths=list(cfg.depths), drop_path_rate=cfg.drop_path_rate,
                          layer_norm_eps=cfg.layer_norm_eps, image_size=spec.input.image_size[0])
        self.model = DINOv3ConvNextModel(config)
        self.grad_checkpointing = False

    @property
    def _stem(self) -> nn.Module:
        # the first stage's downsample layers are the 4x4 patchify convolution and its LayerNorm
        return self.model.model.stages[0].downsample_layers

    def _groups(self) -> list[nn.Module]:
        stages = self.model.model.stages
        return [stages[0].layers, *stages[1:]]

    def _raw(self, images, last: int, keep) -> dict[int, torch.Tensor]:
        """Raw outputs of stages ``0..last`` (those in ``keep``), the stem run once outside checkpoints."""
        out = {}
        x = self._stem[1](self._stem[0](images))
        for i, group in enumerate(self._groups()[: last + 1]):
            x = run(_apply, x, self.grad_checkpointing, group, owner=group)
            if i in keep:
                out[i] = x
        return out

    def _norm_map(self, x):
        return self.model.layer_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def _features(self, images, levels):
        names = self.spec.feature_names
        indices = [names.index(n) for n in levels]
        raw = self._raw(images, max(indices), set(indices))
        final = len(names) - 1
        return {n: self._norm_map(raw[i]) if i == final else raw[i] for n, i in zip(levels, indices)}

    def embed(self, images):
        """LayerNorm of the global average of the raw last stage (``pooler_output``)."""
        self.check_images(images)
        with self.trunk_context():
            last = len(self.spec.features) - 1
            return self.model.layer_norm(self._raw(images, last, {last})[last].mean(dim=(2, 3)))

    def stage_modules(self):
        return [self._stem, *self._groups()]

    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    def read_pretrained(self, directory):
        return read_hf_pretrained(self.model, directory)


def build(spec: BackboneSpec) -> DINOv3ConvNext:
    return DINOv3ConvNext(spec)


_VARIANTS = {
    # size: (depths, dims)
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
}


def make_spec(name, depths, dims, hub_id=None, description="", image_size=224, test=False) -> BackboneSpec:
    return BackboneSpec.from_config(
        DINOv3ConvNextConfig(depths=depths, dims=dims), name=name, family=FAMILY, builder=f"{__name__}:build",
        input=InputSpec(mean=IMAGENET_MEAN, std=IMAGENET_STD, image_size=image_size, crop_pct=1.0),
        hub_id=hub_id, is_test=test, description=description,
    )


@hookimpl
def register_backbones(registry):
    for size, (depths, dims) in _VARIANTS.items():
        registry.add(make_spec(f"dinov3_convnext_{size}", depths, dims,
                               f"facebook/dinov3-convnext-{size}-pretrain-lvd1689m",
                               f"DINOv3 ConvNeXt-{size[0].upper()} (distilled, LVD-1689M)"))
    registry.add(make_spec("dinov3_convnext_test", (1, 1, 2, 1), (8, 16, 16, 32),
                           description="tiny DINOv3 ConvNeXt for tests", image_size=64, test=True))


# -- checkpoint conversion -------------------------------------------------------------------------
_STAGE = r"model.model.stages.\1"
_BLOCK_NAMES = [
    (r"\.(?:dwconv|conv_dw)\.", ".depthwise_conv."),
    (r"\.norm\.", ".layer_norm."),
    (r"\.(?:pwconv1|mlp\.fc1)\.", ".pointwise_conv1."),
    (r"\.(?:pwconv2|mlp\.fc2)\.", ".pointwise_conv2."),
]
_RELEASE_RULES = [
    (r"^downsample_layers\.(\d)\.(\d)\.", _STAGE + r".downsample_layers.\2."),
    (r"^stages\.(\d)\.(\d+)\.", _STAGE + r".layers.\2."),
    *_BLOCK_NAMES,
    (r"^norm\.", "model.layer_norm."),
]
_TIMM_RULES = [
    (r"^stem\.(\d)\.", r"model.model.stages.0.downsample_layers.\1."),
    (r"^stages\.(\d)\.downsample\.(\d)\.", _STAGE + r".downsample_layers.\2."),
    (r"^head\.norm\.", "model.layer_norm."),
    (r"^stages\.(\d)\.blocks\.(\d+)\.", _STAGE + r".layers.\2."),
    *_BLOCK_NAMES,
]


def convert_release(state):
    """Original release -> native keys (``norms.3`` is the final ``norm`` registered a second time)."""
    return rename(state, _RELEASE_RULES, drop=[r"^norms\.", r"^head\."])


def convert_timm(state):
    return rename(state, _TIMM_RULES, drop=[r"^head\.fc\.", r"^norm_pre\."])


def convert_transformers(state):
    """transformers layouts: 5.x (``model.stages``) and the hub's 4.x (``stages``)."""
    state = rename(state, [(r"^stages\.", "model.stages.")])
    return {f"model.{k}": v for k, v in state.items()}


def detect_format(state) -> str | None:
    if has_keys(state, "downsample_layers.0.", "stages.0."):
        return "dinov3"
    if has_keys(state, "stem.0.", "stages.0.blocks."):
        return "timm"
    if has_keys(state, "model.stages.0.downsample_layers.") or has_keys(state, "stages.0.downsample_layers."):
        return "transformers"
    return None


_CONVERTERS = {"dinov3": convert_release, "timm": convert_timm, "transformers": convert_transformers}


@hookimpl
def convert_checkpoint(spec, state_dict, source_format):
    return convert_detected(state_dict, source_format, detect_format(state_dict), _CONVERTERS)
