"""The SDK backbone as an mmseg backbone (registered as ``BackboneSDK``), with its level and checkpoint helpers."""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import torch
from mmengine.model import BaseModule, initialize
from mmseg.registry import MODELS

from ...adapters.finetune import FinetunePolicy, apply_finetune, unit_of
from ...backbone import PYRAMID_LEVELS
from ...errors import CheckpointError, InvalidOptionError
from ...factory import create_backbone
from ...registry import get_spec
from ...specs import BackboneSpec
from ...weights import LoadReport, load_state_dict

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
    from ...weights import read_state_dict

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
        from ...weights import load_weights

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

