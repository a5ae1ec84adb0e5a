"""mmsegmentation (1.x) integration: every backbone_sdk backbone as an mmseg backbone.

Importing this module registers :class:`BackboneSDK` in ``mmseg.registry.MODELS`` and
:class:`BackboneSDKHook` in ``mmseg.registry.HOOKS``; configs load it with
``custom_imports=dict(imports=['backbone_sdk.integrations.mmseg'], allow_failed_imports=False)``::

    model = dict(
        type='EncoderDecoder',
        data_preprocessor=data_preprocessor_for('swin_tiny_patch4_window7_224', (512, 512)),
        backbone=dict(type='BackboneSDK', name='swin_tiny_patch4_window7_224', frozen_stages=1,
                      init_cfg=dict(type='Pretrained', checkpoint='seg.pth', prefix='backbone.')),
        decode_head=dict(type='UPerHead', in_channels=backbone_channels('swin_tiny_patch4_window7_224'), ...))

A ``Pretrained`` ``init_cfg`` is loaded through backbone_sdk's strict loader: every missing,
unexpected or mis-shaped key raises :class:`~backbone_sdk.CheckpointMismatchError` with the key
report instead of mmengine's silent partial load. See docs/mmseg.md.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import torch

from ..errors import CheckpointError, require

require("mmseg", "mmseg")
require("mmengine", "mmseg")

from mmengine.hooks import Hook  # noqa: E402
from mmengine.model import BaseModule, initialize, is_model_wrapper  # noqa: E402
from mmseg.registry import HOOKS, MODELS  # noqa: E402

from ..adapters.finetune import FinetunePolicy, apply_finetune, unit_of  # noqa: E402
from ..backbone import PYRAMID_LEVELS  # noqa: E402
from ..errors import InvalidOptionError  # noqa: E402
from ..factory import create_backbone  # noqa: E402
from ..pixels import close  # noqa: E402
from ..registry import get_spec  # noqa: E402
from ..specs import BackboneSpec  # noqa: E402
from ..weights import LoadReport, load_state_dict  # noqa: E402

__all__ = [
    "MMSegBackbone",
    "BackboneSDK",
    "BackboneSDKHook",
    "backbone_channels",
    "backbone_strides",
    "data_preprocessor_for",
    "check_data_preprocessor",
    "read_checkpoint",
    "safe_checkpoint",
    "restore_checkpoint",
]

log = logging.getLogger(__name__)
_PRETRAINED = "Pretrained"


# -- levels ----------------------------------------------------------------------------------------
def _level_names(spec: BackboneSpec, pyramid: bool) -> list[str]:
    return [p for p, _ in PYRAMID_LEVELS] if pyramid else list(spec.feature_names)


def _default_indices(spec: BackboneSpec, pyramid: bool) -> tuple[int, ...]:
    count = len(_level_names(spec, pyramid))
    if pyramid or not spec.plain:
        return tuple(range(count))
    # plain ViTs: four evenly spaced blocks ending with the last (2, 5, 8, 11 for depth 12)
    return tuple(sorted({max(0, (i + 1) * count // 4 - 1) for i in range(4)}))


def _resolve_indices(spec: BackboneSpec, out_indices, pyramid: bool) -> tuple[int, ...]:
    names = _level_names(spec, pyramid)
    if out_indices is None:
        return _default_indices(spec, pyramid)
    indices = (out_indices,) if isinstance(out_indices, int) else out_indices
    if not isinstance(indices, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in indices):
        raise InvalidOptionError(f"out_indices must be an int or a list/tuple of ints (level indices, negative from "
                                 f"the end), got {out_indices!r}")
    indices = tuple(indices)
    what = "pyramid levels p2..p5" if pyramid else ("blocks" if spec.plain else "feature levels " + ", ".join(names))
    resolved = []
    for i in indices:
        j = i + len(names) if i < 0 else i
        if not 0 <= j < len(names):
            raise ValueError(f"out_indices {out_indices!r}: {spec.name} has {len(names)} {what}; "
                             f"indices must be in [-{len(names)}, {len(names) - 1}]")
        resolved.append(j)
    if not resolved or len(set(resolved)) != len(resolved):
        raise ValueError(f"out_indices {out_indices!r} must name at least one level, each once")
    return tuple(resolved)


def _out_levels(name: str, out_indices, pyramid: bool) -> tuple[list[str], list[int], list[int]]:
    spec = get_spec(name)
    indices = _resolve_indices(spec, out_indices, pyramid)
    if pyramid:
        if spec.pyramid is None:
            raise InvalidOptionError(f"pyramid=True: {spec.name} has no pyramid (level strides "
                                     f"{[f.stride for f in spec.features]}, no neck); use pyramid=False")
        infos = [(f.name, f.channels, f.stride) for f in spec.pyramid.levels]
    else:
        infos = [(f.name, f.channels, f.stride) for f in spec.features]
    chosen = [infos[i] for i in indices]
    return [c[0] for c in chosen], [c[1] for c in chosen], [c[2] for c in chosen]


def backbone_channels(name: str, out_indices=None, pyramid: bool = False) -> list[int]:
    """Channels of the maps :class:`BackboneSDK` returns: ``decode_head.in_channels``. No model is built."""
    return _out_levels(name, out_indices, pyramid)[1]


def backbone_strides(name: str, out_indices=None, pyramid: bool = False) -> list[int]:
    """Strides of the maps :class:`BackboneSDK` returns (``FPNHead.feature_strides``)."""
    return _out_levels(name, out_indices, pyramid)[2]


# -- fine-tune policy ------------------------------------------------------------------------------
def _policy(spec: BackboneSpec, frozen_stages: int | None, finetune, norm_eval: bool,
            frozen_norm: bool = False) -> FinetunePolicy:
    """One :class:`FinetunePolicy` from mmseg's ``frozen_stages`` and/or a policy string."""
    if frozen_stages is None:
        frozen_stages = -1
    if not isinstance(frozen_stages, int) or frozen_stages < -1:
        raise ValueError(f"frozen_stages must be an int >= -1 (-1: train everything), got {frozen_stages!r}")
    mode = unit_of(spec)
    from_frozen = FinetunePolicy(mode, frozen_stages, norm_eval, frozen_norm) if frozen_stages >= 0 else None
    if finetune is None:
        return from_frozen or FinetunePolicy("none", 0, norm_eval, frozen_norm)
    policy = FinetunePolicy.parse(finetune, norm_eval, frozen_norm)
    agrees = policy.mode in ("stages", "blocks") and policy.n == frozen_stages
    if from_frozen is not None and not agrees:
        raise ValueError(
            f"BackboneSDK({spec.name}): frozen_stages={frozen_stages} (= '{mode}:{frozen_stages}') conflicts with "
            f"finetune={finetune!r}. Set only one of them: frozen_stages for mmseg-style configs, or finetune "
            "for any policy ('frozen', 'stages:N', 'blocks:N', 'none')."
        )
    return policy


# -- checkpoints -----------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (``state_dict`` unwrapped), restricted to ``prefix`` and stripped of it.

    Files are read with ``weights_only=True`` (no pickled code runs). mmengine Runner checkpoints
    are readable when they were written with :class:`BackboneSDKHook` in ``custom_hooks``.
    """
    from ..weights import read_state_dict

    state = read_state_dict(path)
    if not prefix:
        return state
    picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not picked:
        sample = ", ".join(list(state)[:5])
        raise CheckpointError(f"{os.fspath(path)} has no key starting with prefix {prefix!r} (keys look like: "
                              f"{sample}, ...). Fix init_cfg's prefix, or drop it for a bare backbone checkpoint.")
    return picked


# -- the backbone ----------------------------------------------------------------------------------
@MODELS.register_module(name="BackboneSDK")
class MMSegBackbone(BaseModule):
    """Any backbone_sdk backbone as an mmseg backbone; ``forward`` returns a tuple of NCHW maps.

    :param name: a registered backbone name (``backbone_sdk.list_backbones()``).
    :param weights: checkpoint for :func:`backbone_sdk.create_backbone` (file, hub-layout directory,
        hub id, ``"hub"``), loaded strictly at construction; foreign layouts are converted.
    :param out_indices: indices into the backbone's feature levels (``stage1..stage4`` for
        hierarchical nets, blocks for plain ViTs, ``p2..p5`` with ``pyramid=True``); negative
        indices count from the end. Default: all levels; for plain ViTs four evenly spaced blocks.
    :param pyramid: return maps from ``backbone.pyramid()`` (strides 4-32; a trainable simple
        feature pyramid for plain ViTs) instead of raw feature levels.
    :param frozen_stages: mmseg convention: ``-1`` trains everything, ``N`` freezes the stem and
        the first ``N`` stages (blocks for plain ViTs) = policy ``"stages:N"``.
    :param norm_eval: keep BatchNorm layers in eval mode (frozen statistics) while training.
    :param frozen_norm: also freeze BatchNorm affine parameters (mmseg's ``norm_cfg`` with
        ``requires_grad=False`` plus ``norm_eval``; detectron2's FrozenBN).
    :param finetune: any backbone_sdk fine-tune policy (``"frozen"``, ``"stages:N"``, ``"blocks:N"``,
        ``"none"``); must agree with ``frozen_stages`` when both are set.
    :param init_cfg: ``dict(type='Pretrained', checkpoint=..., prefix='backbone.')`` is loaded
        strictly through backbone_sdk (key report, foreign-format conversion); other mmengine
        initializers are applied as usual.
    :param grad_checkpoint: recompute backbone activations in backward to save memory.
    :param pretrained: mmseg's legacy spelling of ``init_cfg=dict(type='Pretrained', checkpoint=...)``
        (what ``EncoderDecoder(pretrained=...)`` passes down).
    """

    def __init__(self, name: str, weights: Any = None, weights_format: str | None = None, out_indices=None,
                 pyramid: bool = False, frozen_stages: int = -1, norm_eval: bool = False, frozen_norm: bool = False,
                 finetune=None,
                 init_cfg=None, grad_checkpoint: bool = False, pretrained: str | None = None):
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError("BackboneSDK: set either pretrained or init_cfg, not both")
            init_cfg = dict(type=_PRETRAINED, checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        spec = get_spec(name)
        self.pyramid = bool(pyramid)
        self.out_indices = _resolve_indices(spec, out_indices, self.pyramid)
        self.out_names = tuple(_out_levels(name, self.out_indices, self.pyramid)[0])
        policy = _policy(spec, frozen_stages, finetune, norm_eval, frozen_norm)
        self.overrides = _overrides(spec, self.pyramid)
        self.body = create_backbone(spec, **self.overrides)
        self.weights_format = weights_format
        self.load_report: LoadReport | None = None
        if weights is not None:
            self.load_checkpoint(weights, weights_format=weights_format)
        if grad_checkpoint:
            self.body.set_grad_checkpointing(True)
        apply_finetune(self.body, policy)

    @property
    def spec(self) -> BackboneSpec:
        return self.body.spec

    @property
    def policy(self) -> FinetunePolicy:
        return self.body.finetune_policy

    @property
    def channels(self) -> list[int]:
        """Channels of the returned maps, in order (``decode_head.in_channels``)."""
        if self.pyramid:
            return [self.body.pyramid_info[i].channels for i in self.out_indices]
        return [self.spec.feature(n).channels for n in self.out_names]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = self.body.pyramid(images) if self.pyramid else self.body.features(images, self.out_names)
        return tuple(maps[n] for n in self.out_names)

    # -- weights -----------------------------------------------------------------------------
    def load_checkpoint(self, source, prefix: str | None = None, weights_format: str | None = None,
                        strict: bool = True) -> LoadReport:
        """Load a checkpoint into the backbone strictly (raises ``CheckpointMismatchError`` with the key report).

        Accepts bare backbone checkpoints (native, timm, torchvision, ... layouts) and, after
        ``prefix`` is stripped, segmentor checkpoints of a model built with this class.
        """
        from ..weights import load_weights

        if isinstance(source, str) and source == "hub":
            if not self.spec.hub_id:
                raise CheckpointError(f"{self.spec.name} has no published hub id, so weights='hub' cannot be "
                                      "resolved; pass a checkpoint file, a hub-layout directory or a hub id instead.")
            source = self.spec.hub_id
        if prefix is None and not isinstance(source, Mapping) and not _is_local_file(source):
            report = load_weights(self.body, source, weights_format=weights_format, strict=strict)
        else:
            state = dict(source) if isinstance(source, Mapping) else read_checkpoint(source, prefix)
            if isinstance(source, Mapping) and prefix:
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            state = self._own_keys(state)
            label = source if isinstance(source, (str, os.PathLike)) else "<state dict>"
            report = load_state_dict(self.body, state, source=os.fspath(label), weights_format=weights_format,
                                     strict=strict)
        self.load_report = report
        log.info("BackboneSDK(%s): %s", self.spec.name, report)
        return report

    def _own_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # checkpoints of a segmentor built with this class carry our child's name ("body.")
        if state and all(k.startswith("body.") for k in state):
            state = {k[5:]: v for k, v in state.items()}
        if self.spec.parts != get_spec(self.spec.plugin + ":" + self.spec.name).parts:
            # keys of parts left out on purpose (text tower, unused neck) are not an error;
            # a meta-device build lists them without allocating memory
            with torch.device("meta"):
                full = create_backbone(self.spec.plugin + ":" + self.spec.name).state_dict().keys()
            left_out = full - self.body.state_dict().keys()
            state = {k: v for k, v in state.items() if k not in left_out}
        return state

    def init_weights(self) -> None:
        """Apply ``init_cfg``: ``Pretrained`` entries load strictly through backbone_sdk, others via mmengine.

        Without an ``init_cfg`` the backbone keeps its weights (random init or ``weights=``).
        """
        if self._is_init:
            log.warning("BackboneSDK(%s).init_weights called more than once; ignored", self.spec.name)
            return
        cfgs = [] if not self.init_cfg else list(self.init_cfg) if isinstance(self.init_cfg, list) else [self.init_cfg]
        pretrained = [c for c in cfgs if c.get("type") == _PRETRAINED]
        others = [c for c in cfgs if c.get("type") != _PRETRAINED]
        if others:
            initialize(self, others)
        for cfg in pretrained:
            unknown = set(cfg) - {"type", "checkpoint", "prefix", "map_location", "weights_format", "strict"}
            if unknown:
                raise ValueError(f"BackboneSDK init_cfg {dict(cfg)}: unsupported key(s) {sorted(unknown)}")
            self.load_checkpoint(cfg["checkpoint"], prefix=cfg.get("prefix"),
                                 weights_format=cfg.get("weights_format", self.weights_format),
                                 strict=cfg.get("strict", True))
        self._is_init = True


def _overrides(spec: BackboneSpec, pyramid: bool) -> dict:
    """Only the optional parts a segmentation backbone runs (the neck when it uses the pyramid):
    others would be parameters without gradients (dead weight, and an error under DDP)."""
    return {"parts": spec.needed_parts(pyramid=pyramid)}


#: the registry name configs use (``type='BackboneSDK'``); the Python name says which framework it serves
BackboneSDK = MMSegBackbone


def _is_local_file(source) -> bool:
    return isinstance(source, (str, os.PathLike)) and os.path.isfile(os.fspath(source))


# -- data preprocessing ----------------------------------------------------------------------------
def data_preprocessor_for(name: str, size: tuple[int, int] | int | None = None) -> dict:
    """A ``SegDataPreProcessor`` config matching the backbone's normalization (0-255 images, BGR files).

    ``size`` pads training batches to that size (crop size); test batches are padded to the
    backbone's size divisibility (a ViT's patch size).
    """
    spec = get_spec(name)
    cfg = dict(type="SegDataPreProcessor", mean=[round(m * 255, 6) for m in spec.input.mean],
               std=[round(s * 255, 6) for s in spec.input.std], bgr_to_rgb=True, pad_val=0, seg_pad_val=255)
    if size is not None:
        cfg["size"] = (size, size) if isinstance(size, int) else tuple(size)
    div = spec.input.size_divisibility
    if size is None:
        cfg["size_divisor"] = div  # mmseg needs one of size / size_divisor to batch training images
    if div > 1:
        cfg["test_cfg"] = dict(size_divisor=div)
    return cfg


def _get(obj, key, default=None):
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _from_model(model) -> tuple[str, dict]:
    model = model.module if is_model_wrapper(model) else model
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, BackboneSDK):
        raise ValueError(f"{type(model).__name__} has no BackboneSDK backbone to check against")
    dp = getattr(model, "data_preprocessor", None)
    normalizes = getattr(dp, "_enable_normalize", False)
    found = dict(mean=dp.mean.flatten().tolist() if normalizes else None,
                 std=dp.std.flatten().tolist() if normalizes else None,
                 flips=bool(getattr(dp, "channel_conversion", False)))
    return backbone.spec.name, found


def _from_config(cfg) -> tuple[str, dict]:
    model = _get(cfg, "model") or cfg
    backbone = _get(model, "backbone") or {}
    if _get(backbone, "type") not in ("BackboneSDK", BackboneSDK):
        raise ValueError(f"model.backbone is {_get(backbone, 'type')!r}, not BackboneSDK; nothing to check")
    dp = _get(model, "data_preprocessor") or _get(cfg, "data_preprocessor") or {}
    found = dict(mean=_get(dp, "mean"), std=_get(dp, "std"),
                 flips=bool(_get(dp, "bgr_to_rgb", False) or _get(dp, "rgb_to_bgr", False)))
    if _get(dp, "rgb_to_bgr", False):
        found["flips"] = "rgb_to_bgr"
    return _get(backbone, "name"), found


def check_data_preprocessor(cfg_or_model, bgr_input: bool = True) -> None:
    """Raise ``ValueError`` unless the segmentor normalizes images the way its backbone expects.

    Accepts an mmengine ``Config``/``ConfigDict`` (full config or ``model`` section) or a built
    segmentor. Checks ``mean``/``std`` (0-255 scale) against the backbone spec and that BGR-loaded
    images (mmseg's ``LoadImageFromFile``) are flipped to RGB; pass ``bgr_input=False`` if your
    pipeline already loads RGB.
    """
    is_module = isinstance(cfg_or_model, torch.nn.Module)
    name, found = _from_model(cfg_or_model) if is_module else _from_config(cfg_or_model)
    spec = get_spec(name)
    fix = f"use data_preprocessor=data_preprocessor_for({name!r}, crop_size) from backbone_sdk.integrations.mmseg"
    problems = []
    for key, want in (("mean", spec.input.mean), ("std", spec.input.std)):
        got, expected = found[key], [round(v * 255, 4) for v in want]
        if got is None:
            problems.append(f"{key} is not set (images would reach {name} unnormalized); expected {expected}")
        elif not close(got, expected):
            problems.append(f"{key}={list(got)} but {name} was trained with {key}={expected} (RGB, 0-255)")
    if found["flips"] == "rgb_to_bgr":
        problems.append(f"rgb_to_bgr=True feeds BGR images, but {name} expects RGB")
    elif bgr_input and not found["flips"]:
        problems.append("bgr_to_rgb is not set: mmseg loads images as BGR, so the backbone would see BGR "
                        "(set bgr_to_rgb=True, or check_data_preprocessor(..., bgr_input=False) for RGB pipelines)")
    elif not bgr_input and found["flips"]:
        problems.append("the channels are flipped, but the pipeline loads RGB: the backbone would see BGR")
    if problems:
        lines = "\n  ".join(problems)
        raise ValueError(f"data_preprocessor does not match the backbone:\n  {lines}\nFix: {fix}.")


# -- runner hook: checks and weights_only-loadable checkpoints -------------------------------------
_HISTORY = "__mmengine_history_buffer__"


def safe_checkpoint(obj):
    """A copy of (part of) an mmengine checkpoint that ``torch.load(weights_only=True)`` can read.

    ``HistoryBuffer`` objects (whose pickles call ``getattr``) become plain dicts of tensors, numpy
    scalars become Python numbers and numpy arrays lists. :func:`restore_checkpoint` undoes the
    ``HistoryBuffer`` part.
    """
    import numpy as np
    from mmengine.logging import HistoryBuffer

    if isinstance(obj, HistoryBuffer):
        log, count = obj.data
        return {_HISTORY: True, "log": torch.as_tensor(np.asarray(log)), "count": torch.as_tensor(np.asarray(count)),
                "max_length": int(obj.max_length)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Mapping):
        return type(obj)((k, safe_checkpoint(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(safe_checkpoint(v) for v in obj)
    return obj


def restore_checkpoint(obj):
    """Undo :func:`safe_checkpoint` for ``HistoryBuffer`` objects (so the message hub resumes fully)."""
    from mmengine.logging import HistoryBuffer

    if isinstance(obj, Mapping) and obj.get(_HISTORY) is True:
        return HistoryBuffer(obj["log"].numpy(), obj["count"].numpy(), obj["max_length"])
    if isinstance(obj, Mapping):
        return type(obj)((k, restore_checkpoint(v)) for k, v in obj.items())
    return obj


@HOOKS.register_module()
class BackboneSDKHook(Hook):
    """Runner hook for configs using :class:`BackboneSDK`: ``custom_hooks=[dict(type='BackboneSDKHook')]``.

    - before training/testing, runs :func:`check_data_preprocessor` on the model (``check=False``
      turns it off, ``bgr_input=False`` for pipelines that load RGB);
    - writes checkpoints that load with ``torch.load(weights_only=True)``, so that resuming works on
      torch>=2.6 (where mmengine 0.10's plain ``torch.load`` rejects its own ``HistoryBuffer``
      pickles) without turning safe loading off. The model and optimizer states are unchanged.
    """

    priority = "VERY_LOW"  # after other hooks added their entries to the checkpoint

    def __init__(self, check: bool = True, bgr_input: bool = True, safe_checkpoints: bool = True):
        self.check = check
        self.bgr_input = bgr_input
        self.safe_checkpoints = safe_checkpoints

    def before_run(self, runner) -> None:
        if self.check:
            check_data_preprocessor(runner.model, bgr_input=self.bgr_input)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.safe_checkpoints:
            for key in [k for k in checkpoint if k not in ("state_dict", "optimizer")]:
                checkpoint[key] = safe_checkpoint(checkpoint[key])

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if "message_hub" in checkpoint:
            checkpoint["message_hub"] = restore_checkpoint(checkpoint["message_hub"])
