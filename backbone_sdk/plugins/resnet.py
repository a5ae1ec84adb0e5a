"""ResNet (He et al. 2015, https://arxiv.org/abs/1512.03385) on transformers' ``ResNetModel``.

Features ``stage1..stage4`` at strides 4, 8, 16, 32; ``embed`` is the global average pool.
Weights: transformers hub checkpoints (``microsoft/resnet-50``), torchvision and timm state dicts.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from ..backbone import Backbone
from ..hookspecs import hookimpl
from ..specs import BackboneConfig, BackboneSpec, FeatureInfo, InputSpec, count_of, positive
from ._common import has_keys, read_hf_pretrained, rename, run, strip_prefixes

FAMILY = "resnet"


@attrs.frozen(kw_only=True)
class ResNetConfig(BackboneConfig):
    """Architecture of a ResNet variant.

    :param block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50 and deeper).
    :param depths: blocks per stage (4). :param widths: output channels per stage (4): the
        channels of ``stage1..stage4``. :param stem_width: channels of the 7x7 stem convolution.
    """

    block: str = attrs.field(validator=attrs.validators.in_(("basic", "bottleneck")))
    depths: tuple[int, ...] = attrs.field(converter=tuple, validator=count_of(4))
    widths: tuple[int, ...] = attrs.field(converter=tuple, validator=count_of(4))
    stem_width: int = attrs.field(default=64, validator=positive)

    def feature_info(self, input):
        return [FeatureInfo(f"stage{i + 1}", w, 4 * 2**i) for i, w in enumerate(self.widths)]

    def embedding_dim(self):
        return self.widths[-1]


class ResNet(Backbone):
    """transformers ``ResNetModel`` behind the backbone_sdk interface (weights under ``model.``)."""

    def __init__(self, spec: BackboneSpec):
        super().__init__(spec)
        from transformers import ResNetConfig as HFConfig, ResNetModel

        cfg: ResNetConfig = spec.config
        config = HFConfig(
            embedding_size=cfg.stem_width, hidden_sizes=list(cfg.widths), depths=list(cfg.depths),
            layer_type=cfg.block, downsample_in_bottleneck=False,
        )
        self.model = ResNetModel(config)
        self.model.pooler = None  # embed() pools itself; keeps the state dict free of unused modules
        self.grad_checkpointing = False

    def _features(self, images, levels):
        x = self.model.embedder(images)
        names = self.spec.feature_names
        out, last = {}, names.index(levels[-1])
        for i, stage in enumerate(self.model.encoder.stages[: last + 1]):
            x = run(stage, x, self.grad_checkpointing)
            if names[i] in levels:
                out[names[i]] = x
        return out

    def stage_modules(self):
        return [self.model.embedder, *self.model.encoder.stages]

    #: oneDNN's NHWC convolutions: ~1.17x on ResNet-50 (fp32 CPU, benchmarks/bench_embed.py --optimize)
    prefers_channels_last = True

    def norm_folding_pairs(self):
        # transformers' ResNetConvLayer and ResNetShortCut: `convolution` then `normalization`
        return [(m, "convolution", "normalization") for m in self.model.modules()
                if isinstance(getattr(m, "convolution", None), nn.Conv2d)
                and isinstance(getattr(m, "normalization", None), nn.BatchNorm2d)]

    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    def read_pretrained(self, directory):
        return read_hf_pretrained(self.model, directory)


def build(spec: BackboneSpec) -> ResNet:
    return ResNet(spec)


_VARIANTS = {
    # name: (block, depths, widths, stem, hub id)
    "resnet18": ("basic", (2, 2, 2, 2), (64, 128, 256, 512), 64, "microsoft/resnet-18"),
    "resnet34": ("basic", (3, 4, 6, 3), (64, 128, 256, 512), 64, "microsoft/resnet-34"),
    "resnet50": ("bottleneck", (3, 4, 6, 3), (256, 512, 1024, 2048), 64, "microsoft/resnet-50"),
    "resnet101": ("bottleneck", (3, 4, 23, 3), (256, 512, 1024, 2048), 64, "microsoft/resnet-101"),
    "resnet152": ("bottleneck", (3, 8, 36, 3), (256, 512, 1024, 2048), 64, "microsoft/resnet-152"),
    "resnet_test": ("bottleneck", (1, 1, 1, 1), (16, 32, 64, 128), 8, None),
}


def make_spec(name, block, depths, widths, stem, hub_id) -> BackboneSpec:
    config = ResNetConfig(block=block, depths=depths, widths=widths, stem_width=stem)
    return BackboneSpec.from_config(
        config, name=name, family=FAMILY, builder=f"{__name__}:build", input=InputSpec(min_size=32),
        hub_id=hub_id, is_test=hub_id is None,
        description=f"ResNet-{name[6:]} ({block} blocks)" if hub_id else "tiny ResNet for tests",
    )


@hookimpl
def register_backbones(registry):
    for name, args in _VARIANTS.items():
        registry.add(make_spec(name, *args))


# -- checkpoint conversion -------------------------------------------------------------------------
def _torchvision_rules(block: str):
    convs = ("conv1", "conv2", "conv3") if block == "bottleneck" else ("conv1", "conv2")
    rules = [
        (r"^conv1\.", "model.embedder.embedder.convolution."),
        (r"^bn1\.", "model.embedder.embedder.normalization."),
        (r"^layer(\d)\.", lambda m: f"model.encoder.stages.{int(m.group(1)) - 1}.layers."),
        (r"\.downsample\.0\.", ".shortcut.convolution."),
        (r"\.downsample\.1\.", ".shortcut.normalization."),
    ]
    for i, _ in enumerate(convs):
        rules += [(rf"(layers\.\d+)\.conv{i + 1}\.", rf"\1.layer.{i}.convolution."),
                  (rf"(layers\.\d+)\.bn{i + 1}\.", rf"\1.layer.{i}.normalization.")]
    return rules


def with_batch_counters(state: dict) -> dict:
    """Add the BatchNorm ``num_batches_tracked`` counters that checkpoints saved before PyTorch 0.4.1
    lack (torchvision's original ImageNet files among them); the counter only matters when
    ``momentum=None``, and ``nn.BatchNorm`` itself fills it with 0 for such checkpoints."""
    for key in [k for k in state if k.endswith(".running_mean")]:
        state.setdefault(key[: -len("running_mean")] + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return state


def convert(spec: BackboneSpec, state, source_format):
    if source_format in (None, "torchvision", "timm") and has_keys(state, "conv1.", "layer1."):
        state = rename(state, _torchvision_rules(spec.config.block), drop=[r"^fc\."])
        return with_batch_counters(state), source_format or "torchvision"
    if source_format in (None, "transformers") and has_keys(state, "resnet.embedder."):
        state = strip_prefixes(state, ["resnet."])
        state = {f"model.{k}": v for k, v in state.items() if not k.startswith("classifier.")}
        return with_batch_counters(state), "transformers"
    if source_format in (None, "transformers") and has_keys(state, "embedder.", "encoder."):
        state = {f"model.{k}": v for k, v in state.items() if not k.startswith("pooler")}
        return with_batch_counters(state), "transformers"
    return None


@hookimpl
def convert_checkpoint(spec, state_dict, source_format):
    return convert(spec, state_dict, source_format)
