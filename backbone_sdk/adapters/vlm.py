"""Vision towers and projectors for LLaVA-style multimodal LLMs (framework-neutral).

A :class:`VisionTower` turns images into a ``[B, N, D]`` token sequence taken from one layer of
any registered backbone; :func:`build_projector` maps those tokens to the LLM's hidden size.
:class:`backbone_sdk.integrations.llm.MultimodalLM` splices them into a transformers causal LM.

>>> tower = VisionTower("dinov2_vits14", weights="hub")           # doctest: +SKIP
>>> tokens = tower([pil_image])          # [1, 256, 384]: patch tokens of the second-to-last block
>>> projector = build_projector("mlp2x_gelu", tower.hidden_size, 4096)
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any

import numpy as np
import torch
from torch import nn

from ..backbone import Backbone
from ..errors import InputShapeError, InvalidOptionError, LayerIndexError
from ..factory import create_backbone
from ..preprocess import preprocess
from .finetune import FinetunePolicy, add_lora, apply_finetune

__all__ = ["VisionTower", "build_projector", "tower_from_config", "PROJECTOR_TYPES"]

SELECT_FEATURES = ("patch", "cls_patch")
IMAGE_ASPECTS = ("pad", "resize")
#: projector names understood by :func:`build_projector` (``mlp{N}x_gelu`` for any N >= 1)
PROJECTOR_TYPES = ("linear", "identity", "mlp{N}x_gelu")


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """The vision-to-language projector of LLaVA.

    ``"linear"``: one ``Linear(in_dim, out_dim)`` (LLaVA-1); ``"mlp{N}x_gelu"``: ``N`` linear layers
    with GELU between them, the first ``in_dim -> out_dim`` and the rest ``out_dim -> out_dim``
    (``"mlp2x_gelu"`` = LLaVA-1.5: Linear, GELU, Linear); ``"identity"``: no projection
    (``in_dim`` must equal ``out_dim``).
    """
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "identity":
        if in_dim != out_dim:
            raise ValueError(f"an identity projector needs in_dim == out_dim, got {in_dim} and {out_dim}")
        return nn.Identity()
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if match and int(match.group(1)) >= 1:
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(int(match.group(1)) - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        return nn.Sequential(*layers)
    raise ValueError(f"unknown projector {kind!r}; use 'linear', 'identity' or 'mlp{{N}}x_gelu' (e.g. 'mlp2x_gelu')")


def _policy_text(policy) -> str | None:
    if policy is None:
        return None
    policy = FinetunePolicy.parse(policy)
    text = f"{policy.mode}:{policy.n}" if policy.mode in ("stages", "blocks") else policy.mode
    return text + ("+norm_eval" if policy.norm_eval else "")


def _parse_policy(text):
    if isinstance(text, str) and text.endswith("+norm_eval"):
        return FinetunePolicy.parse(text[: -len("+norm_eval")], norm_eval=True)
    return text


def _lora_kwargs(lora) -> dict | None:
    if lora is None or lora is False:
        return None
    if isinstance(lora, int) and not isinstance(lora, bool):
        return {"r": lora}
    if isinstance(lora, dict):
        return dict(lora)
    raise TypeError(f"lora must be None, a rank (int) or a dict of add_lora() arguments, got {lora!r}")


class VisionTower(nn.Module):
    """Image tokens ``[B, N, D]`` from one layer of a backbone, LLaVA style.

    :param backbone: a registered name (built with ``weights`` and without optional parts: no
        pyramid neck, no text tower) or a :class:`~backbone_sdk.Backbone` instance.
    :param select_layer: the layer passed to ``backbone.tokens(layer=...)``: a block index for plain
        ViTs (``-2``, the LLaVA-1.5 default, is the output of the second-to-last block, before the
        final norm), a stage index for ResNet/Swin (``-2`` = ``stage3``, stride 16).
    :param select_feature: ``"patch"`` (patch tokens only) or ``"cls_patch"`` (CLS first, then the
        patches; only for backbones with a CLS token).
    :param drop_registers: leave out register tokens (DINOv2 registers, DeiT's distillation token);
        with ``False`` they come after CLS and before the patches, as in the backbone's sequence.
    :param finetune: a :func:`~backbone_sdk.adapters.finetune.apply_finetune` policy (``"frozen"``,
        ``"blocks:N"``, ``"stages:N"``, ``"none"``) or ``None`` to leave the backbone as it is.
    :param lora: ``None``, a LoRA rank or a dict of :func:`~backbone_sdk.adapters.finetune.add_lora`
        arguments; applied after ``finetune`` (then only the LoRA weights train).
    :param image_aspect: how :meth:`prepare_images` fits raw images to ``image_size``: ``"pad"``
        (keep the aspect ratio, pad to square with the mean colour, as LLaVA-1.5) or ``"resize"``.
    :param image_size: input size for raw images (default: the spec's ``image_size``).

    A tower with no trainable parameter runs the backbone under ``torch.no_grad()``: no autograd
    graph, no stored activations. The projector after it still trains.
    """

    def __init__(self, backbone: Backbone | str, select_layer: int = -2, select_feature: str = "patch",
                 drop_registers: bool = True, finetune: Any = "frozen", image_aspect: str = "pad",
                 image_size: int | tuple[int, int] | None = None, lora: int | dict | None = None,
                 weights: Any = None):
        super().__init__()
        if select_feature not in SELECT_FEATURES:
            raise InvalidOptionError(f"select_feature must be one of {SELECT_FEATURES}, got {select_feature!r}")
        if image_aspect not in IMAGE_ASPECTS:
            raise InvalidOptionError(f"image_aspect must be one of {IMAGE_ASPECTS}, got {image_aspect!r}")
        if isinstance(backbone, str):
            backbone = self._create(backbone, weights)
        elif weights is not None:
            raise ValueError("weights= is only used with a backbone name; load weights into the instance yourself")
        if not isinstance(backbone, Backbone):
            raise TypeError(
                f"VisionTower needs a backbone_sdk.Backbone or a registered name, got {type(backbone).__name__}")
        self.backbone = backbone
        spec = backbone.spec
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.drop_registers = drop_registers
        self.image_aspect = image_aspect
        size = spec.input.image_size if image_size is None else image_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        depth = len(spec.features)
        if isinstance(select_layer, bool) or not isinstance(select_layer, int) or not -depth <= select_layer < depth:
            raise LayerIndexError(f"{spec.name} has {depth} {'blocks' if spec.plain else 'stages'}; select_layer must "
                                  f"be in [-{depth}, {depth - 1}] (an index into feature_info), got {select_layer!r}")
        self.level = spec.features[select_layer]
        self.has_cls = spec.prefix_tokens.cls
        self.num_registers = spec.prefix_tokens.extra
        if select_feature == "cls_patch" and not self.has_cls:
            raise InvalidOptionError(
                f"select_feature='cls_patch' needs a CLS token, but {spec.name} has none "
                f"(spec.prefix_tokens={spec.prefix_tokens}). Use select_feature='patch'."
            )
        self.finetune = _policy_text(finetune)
        if finetune is not None:
            apply_finetune(backbone, finetune)
        self.lora = _lora_kwargs(lora)
        if self.lora is not None:
            add_lora(backbone, **self.lora)

    @staticmethod
    def _create(name: str, weights) -> Backbone:
        # no optional parts: a neck or text tower would be weights without gradients
        return create_backbone(name, weights=weights, parts=())

    # -- metadata ------------------------------------------------------------------------------
    @property
    def spec(self):
        return self.backbone.spec

    @property
    def hidden_size(self) -> int:
        """Width ``D`` of the tokens (the selected layer's channels; for CLIP the tower width, not
        the projection width)."""
        return self.level.channels

    @property
    def config(self) -> dict:
        """JSON-friendly arguments that rebuild this tower (used by ``MultimodalLM.save_pretrained``)."""
        return {"backbone": self.spec.name, "select_layer": self.select_layer, "select_feature": self.select_feature,
                "drop_registers": self.drop_registers, "finetune": self.finetune, "lora": self.lora,
                "image_aspect": self.image_aspect, "image_size": list(self.image_size)}

    def grid(self, image_size=None) -> tuple[int, int]:
        """Token grid of the selected layer for ``image_size`` pixel images (no forward pass)."""
        h, w = self._size(image_size)
        stride = self.level.stride
        # the contract: every level is ceil(size / stride) (exact for patch models, which need H % patch == 0)
        return math.ceil(h / stride), math.ceil(w / stride)

    def num_tokens(self, image_size=None) -> int:
        """Tokens per image for ``image_size`` (default: the tower's), computed without running."""
        gh, gw = self.grid(image_size)
        extra = int(self.select_feature == "cls_patch") + (0 if self.drop_registers else self.num_registers)
        return gh * gw + extra

    def _size(self, image_size) -> tuple[int, int]:
        if image_size is None:
            return self.image_size
        return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)

    @property
    def trainable(self) -> bool:
        """Whether any parameter used by ``tokens()`` requires grad."""
        neck = self._neck_ids()
        return any(p.requires_grad for p in self.backbone.parameters() if id(p) not in neck)

    def _neck_ids(self) -> set[int]:
        return {id(p) for m in self.backbone.neck_modules() for p in m.parameters()}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers of every module with a trainable parameter (LoRA weights, unfrozen
        blocks with their norm statistics), keyed like ``backbone.state_dict()``."""
        out, neck = {}, self._neck_ids()
        for name, module in self.backbone.named_modules():
            own = [p for p in module.parameters(recurse=False) if id(p) not in neck]
            if not any(p.requires_grad for p in own):
                continue
            prefix = f"{name}." if name else ""
            for key, value in module.state_dict(keep_vars=False).items():
                if "." not in key:  # direct members only; children are visited on their own
                    out[prefix + key] = value
        return out

    # -- images ----------------------------------------------------------------------------------
    def prepare_images(self, images) -> torch.Tensor:
        """``[B, 3, H, W]`` float pixels on the tower's device.

        Float torch tensors (``[B, 3, H, W]`` or a list of ``[3, H, W]``) are taken as already
        normalized (the :class:`~backbone_sdk.Backbone` convention). PIL images and ``uint8`` arrays or
        tensors are fitted to ``image_size`` (``image_aspect``) and normalized with the spec's mean/std.
        """
        if isinstance(images, torch.Tensor) and images.is_floating_point() and images.dim() == 4:
            batch = images
        else:
            batched = isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4
            if batched or isinstance(images, (list, tuple)):
                items = list(images)
            else:
                items = [images]
            if not items:
                raise ValueError("prepare_images() got no images")
            done = [img if isinstance(img, torch.Tensor) and img.is_floating_point() and img.dim() == 3
                    else preprocess(img, self.spec, size=self.image_size, mode=self.image_aspect)[0] for img in items]
            shapes = {tuple(t.shape) for t in done}
            if len(shapes) > 1:
                raise InputShapeError(
                    f"images of one batch must have the same size after preprocessing, got {sorted(shapes)}; "
                    "pass raw images (PIL / uint8) to have them fitted to the tower's image_size."
                )
            batch = torch.stack(done)
        ref = next(self.backbone.parameters())
        dtype = batch.dtype if torch.is_autocast_enabled(ref.device.type) else ref.dtype
        return batch.to(device=ref.device, dtype=dtype)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, images) -> torch.Tensor:
        """Image tokens ``[B, num_tokens, hidden_size]`` (see :meth:`prepare_images` for inputs)."""
        pixels = self.prepare_images(images)
        context = contextlib.nullcontext() if self.trainable else torch.no_grad()
        with context:
            tokens = self.backbone.tokens(pixels, layer=self.select_layer)
        parts = []
        if self.select_feature == "cls_patch":
            parts.append(tokens.cls[:, None])
        if not self.drop_registers and tokens.registers is not None:
            parts.append(tokens.registers)
        parts.append(tokens.patches)
        return torch.cat(parts, dim=1) if len(parts) > 1 else tokens.patches

    def extra_repr(self) -> str:
        return (f"backbone={self.spec.name!r}, select_layer={self.select_layer}, "
                f"select_feature={self.select_feature!r}, finetune={self.finetune!r}, lora={self.lora}")


def tower_from_config(config: dict, weights: Any = None) -> VisionTower:
    """Rebuild a :class:`VisionTower` from its :attr:`VisionTower.config` (``weights`` for the backbone)."""
    cfg = dict(config)
    name = cfg.pop("backbone")
    cfg["finetune"] = _parse_policy(cfg.get("finetune"))
    return VisionTower(name, weights=weights, **cfg)
