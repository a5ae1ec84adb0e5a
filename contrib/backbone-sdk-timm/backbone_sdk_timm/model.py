"""A timm model behind the backbone_sdk interface.

The spec of ``timm/<model>[.<tag>]`` is read off the model itself, built once on the meta device
(no memory, no weights): the levels and strides of its ``feature_info``, the pre-logits width of
its head, its prefix tokens, and the input mean/std/size of its ``pretrained_cfg``. The backbone
then runs timm's own code: ``forward_intermediates`` (stopping after the deepest level asked for)
for ``features``, ``forward_features`` + ``forward_head(pre_logits=True)`` for ``embed``.
"""

from __future__ import annotations

import difflib
import functools
from typing import Any

import attrs
import torch
from torch import nn

import backbone_sdk as bs
from backbone_sdk.specs import IMAGENET_MEAN, IMAGENET_STD

from . import PREFIX

FAMILY = "timm"


def _kwargs(value) -> tuple[tuple[str, Any], ...]:
    """Extra ``timm.create_model`` keyword arguments as sorted, hashable pairs."""
    if isinstance(value, dict):
        value = value.items()
    pairs = tuple((str(k), tuple(v) if isinstance(v, list) else v) for k, v in value)
    return tuple(sorted(pairs))


@attrs.frozen
class Layout:
    """What a meta-device build of a timm model says about it."""

    channels: tuple[int, ...]
    strides: tuple[int, ...]
    modules: tuple[str, ...]
    embed_dim: int
    plain: bool
    prefix: bs.PrefixTokens
    dynamic_size: bool
    classifier: tuple[str, ...]
    pretrained_cfg: dict = attrs.field(eq=False, repr=False)


def create(model: str, kwargs: dict, dynamic_size: bool | None = None):
    """``timm.create_model`` without weights and without a classifier; ViT-like models get
    ``dynamic_img_size=True`` so that they take any size their patch divides. Returns the model and
    whether it took ``dynamic_img_size``."""
    import timm

    if dynamic_size is not False:
        try:
            return timm.create_model(model, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs), True
        except TypeError:
            if dynamic_size:
                raise
    return timm.create_model(model, pretrained=False, num_classes=0, **kwargs), False


@functools.lru_cache(maxsize=512)
def layout(model: str, kwargs: tuple[tuple[str, Any], ...]) -> Layout:
    try:
        with torch.device("meta"):
            net, dynamic = create(model, dict(kwargs))
    except (RuntimeError, NotImplementedError):  # a model whose __init__ computes with tensor values
        net, dynamic = create(model, dict(kwargs))
    info = net.feature_info if isinstance(net.feature_info, list) else net.feature_info.get_dicts()
    if not hasattr(net, "forward_intermediates") or not info:
        raise bs.UnsupportedOperationError(f"timm model {model!r} has no forward_intermediates/feature_info, so "
                                           "the timm bridge cannot return its feature levels.")
    strides = tuple(int(d["reduction"]) for d in info)
    plain = len(info) > 1 and len(set(strides)) == 1 and hasattr(net, "patch_embed")
    prefix = bs.PrefixTokens()
    if plain:
        count = int(getattr(net, "num_prefix_tokens", 0) or 0)
        cls = getattr(net, "cls_token", None) is not None
        dist = getattr(net, "dist_token", None) is not None
        prefix = bs.PrefixTokens(cls=cls, distillation=dist, registers=count - cls - dist)
    cfg = dict(net.pretrained_cfg)
    classifier = cfg.get("classifier") or ()
    return Layout(channels=tuple(int(d["num_chs"]) for d in info), strides=strides,
                  modules=tuple(d["module"] for d in info),
                  embed_dim=int(getattr(net, "head_hidden_size", None) or net.num_features), plain=plain,
                  prefix=prefix, dynamic_size=dynamic,
                  classifier=(classifier,) if isinstance(classifier, str) else tuple(classifier),
                  pretrained_cfg=cfg)


@attrs.frozen(kw_only=True)
class TimmConfig(bs.BackboneConfig):
    """A timm architecture. ``model`` is timm's name (with its pretrained tag, if any);
    ``drop_path_rate`` and ``model_kwargs`` (any other ``timm.create_model`` argument, e.g.
    ``{"drop_rate": 0.1}``) are passed to timm."""

    model: str
    drop_path_rate: float = attrs.field(default=0.0, converter=float, validator=attrs.validators.ge(0.0))
    model_kwargs: tuple[tuple[str, Any], ...] = attrs.field(default=(), converter=_kwargs)

    @property
    def create_kwargs(self) -> dict[str, Any]:
        extra = {"drop_path_rate": self.drop_path_rate} if self.drop_path_rate else {}
        return {**dict(self.model_kwargs), **extra}

    @property
    def layout(self) -> Layout:
        try:
            return layout(self.model, _kwargs(self.create_kwargs))
        except TypeError as exc:
            raise bs.InvalidOptionError(f"timm model {self.model!r} does not take these arguments: {exc}") from None

    @property
    def classifier(self) -> tuple[str, ...]:
        return self.layout.classifier

    @property
    def plain(self) -> bool:
        return self.layout.plain

    def feature_info(self, input):
        lay = self.layout
        stem = "block" if lay.plain else "stage"
        offset = 0 if lay.plain else 1
        return [bs.FeatureInfo(f"{stem}{i + offset}", c, s) for i, (c, s) in enumerate(zip(lay.channels, lay.strides))]

    def embedding_dim(self):
        return self.layout.embed_dim

    def prefix_tokens(self):
        return self.layout.prefix

    def input_spec(self, input):
        lay = self.layout
        unit = max(lay.strides)
        return attrs.evolve(input, patch_size=unit if lay.plain else None, size_divisibility=unit,
                            min_size=max(unit, input.min_size if not lay.plain else unit))


class _Params(nn.Module):
    """Top-level parameters of a timm model (class token, position table) as one module, so that
    the stem group of :meth:`TimmBackbone.stage_modules` holds them."""

    def __init__(self, params: dict[str, nn.Parameter]):
        super().__init__()
        for name, p in params.items():
            self.register_parameter(name, p)


def stage_groups(net: nn.Module, modules: tuple[str, ...]) -> list[nn.ModuleList]:
    """``[stem, level 1, ...]`` from the modules of ``feature_info``: each group holds the modules
    run after the previous level's module up to its own (timm defines modules in run order); the
    head after the last level is in no group. A model whose first level is its stem gets no
    separate stem group."""
    taps = set(modules)

    def atoms(module: nn.Module, prefix: str):
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if path in taps or not any(t.startswith(path + ".") for t in taps):
                yield path, child
            else:
                yield from atoms(child, path + ".")

    stem: list[nn.Module] = []
    levels: list[list[nn.Module]] = []
    pending: list[nn.Module] = []
    for path, child in atoms(net, ""):
        if len(levels) == len(modules):
            break
        pending.append(child)
        if path in taps:
            if levels:
                levels.append(pending)
            else:
                stem, levels = pending[:-1], [pending[-1:]]
            pending = []
    own = {n: p for n, p in net.named_parameters(recurse=False)}
    if own:
        stem.insert(0, _Params(own))
    groups = [stem, *levels]
    if not any(True for m in stem for _ in m.parameters()) and len(groups) > 1:
        groups = [stem + levels[0], *levels[1:]]
    return [nn.ModuleList(g) for g in groups]


class TimmBackbone(bs.Backbone):
    """timm's model (classifier removed) under ``model.``; its code runs unchanged."""

    def __init__(self, spec: bs.BackboneSpec):
        super().__init__(spec)
        cfg: TimmConfig = spec.config
        self.model, _ = create(cfg.model, cfg.create_kwargs, cfg.layout.dynamic_size)
        self._groups = stage_groups(self.model, cfg.layout.modules)  # a list: not registered twice

    def _features(self, images, levels):
        names = self.spec.feature_names
        maps = self.model.forward_intermediates(images, indices=[names.index(n) for n in levels],
                                                intermediates_only=True, stop_early=True)
        return dict(zip(levels, maps))

    def run_layers(self, images, layers):
        if not self.spec.plain:
            return super().run_layers(images, layers)
        indices = sorted({self.layer_index(i) for i in layers})
        prefix = self.spec.prefix_tokens.count
        with self.trunk_context():
            out = self.model.forward_intermediates(images, indices=indices, output_fmt="NLC", intermediates_only=True,
                                                   stop_early=True, **({"return_prefix_tokens": True} if prefix else {}))
        return {i: torch.cat([x[1], x[0]], dim=1) if prefix else x for i, x in zip(indices, out)}

    def stem_tokens(self, images):
        net = self.model
        if not self.spec.plain or not hasattr(net, "_pos_embed"):
            return super().stem_tokens(images)
        with self.trunk_context():
            return net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(images))))

    def embed(self, images):
        self.check_images(images)
        with self.trunk_context():
            return self.model.forward_head(self.model.forward_features(images), pre_logits=True)

    def stage_modules(self):
        return list(self._groups)

    def set_grad_checkpointing(self, enable=True):
        try:
            self.model.set_grad_checkpointing(enable)
        except (AssertionError, NotImplementedError) as exc:
            raise bs.UnsupportedOperationError(f"{self.spec.name}: timm's {type(self.model).__name__} does not "
                                               f"support gradient checkpointing ({exc}).") from None

    def no_weight_decay(self):
        names = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else ()
        return {f"model.{n}" for n in names}


def build(spec: bs.BackboneSpec) -> TimmBackbone:
    return TimmBackbone(spec)


def _unknown(name: str, model: str) -> bs.UnknownBackboneError:
    import timm

    arch = model.partition(".")[0]
    pool = timm.list_pretrained(f"{arch}.*") if timm.is_model(arch) else timm.list_models()
    close = [PREFIX + m for m in difflib.get_close_matches(model, pool, n=5, cutoff=0.5)]
    return bs.UnknownBackboneError(name, close, "The timm bridge resolves 'timm/<model>[.<tag>]' for the names of "
                                   "timm.list_models() and, with a tag, timm.list_pretrained().")


def make_spec(name: str, **config) -> bs.BackboneSpec:
    """The spec of ``timm/<model>[.<tag>]`` (``config``: :class:`TimmConfig` fields)."""
    import timm

    model = name[len(PREFIX):]
    arch, _, tag = model.partition(".")
    if not timm.is_model(arch) or tag and model not in timm.list_pretrained(model):
        raise _unknown(name, model)
    cfg = TimmConfig(model=model, **config)
    pre = cfg.layout.pretrained_cfg
    size = tuple(pre.get("input_size", (3, 224, 224)))[-2:]
    input = bs.InputSpec(mean=pre.get("mean", IMAGENET_MEAN), std=pre.get("std", IMAGENET_STD),
                         image_size=size, interpolation=pre.get("interpolation") or "bicubic",
                         crop_pct=pre.get("crop_pct") or 1.0)
    tag = pre.get("tag")
    return bs.BackboneSpec.from_config(
        cfg, name=name, family=FAMILY, builder=f"{__name__}:build", input=input, hub_id=pre.get("hf_hub_id"),
        description=f"timm {arch}" + (f" ({tag} weights)" if tag else ""))
