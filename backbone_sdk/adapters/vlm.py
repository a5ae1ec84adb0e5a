"""Vision towers and projectors for LLaVA-style multimodal LLMs (framework-neutral).

A :class:`VisionTower` turns images into a ``[B, N, D]`` token sequence taken from one layer of
any registered backbone (or several layers, concatenated or summed; optionally with a ``s x s``
pixel-shuffle merge of neighbouring patch tokens, :func:`pixel_shuffle`); :func:`build_projector`
maps those tokens to the LLM's hidden size.
:class:`backbone_sdk.integrations.llm.MultimodalLM` splices them into a transformers causal LM.
On a native-resolution backbone (SigLIP 2 NaFlex: ``naflex_inputs`` / ``naflex_tokens``) raw images
keep their aspect ratio within a patch budget, so each image gets its own token count and the
tower returns a list of ``[N_i, D]`` tensors instead of one ``[B, N, D]`` tensor.

>>> tower = VisionTower("dinov2_vits14", weights="hub")           # doctest: +SKIP
>>> tokens = tower([pil_image])          # [1, 256, 384]: patch tokens of the second-to-last block
>>> projector = build_projector("mlp2x_gelu", tower.hidden_size, 4096)
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Protocol, Sequence, cast

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone
from ..errors import InputShapeError, InvalidOptionError, LayerIndexError
from ..factory import create_backbone
from ..preprocess import preprocess
from ..specs import Tokens
from .finetune import FinetunePolicy, add_lora, apply_finetune

__all__ = ["VisionTower", "build_projector", "pixel_shuffle", "tower_from_config", "PROJECTOR_TYPES", "LAYER_MERGES"]

SELECT_FEATURES = ("patch", "cls_patch")
IMAGE_ASPECTS = ("pad", "resize")
#: how :class:`VisionTower` combines the layers of a list ``select_layer``
LAYER_MERGES = ("concat", "sum")
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


def pixel_shuffle(patches: torch.Tensor, grid: tuple[int, int], factor: int = 2) -> torch.Tensor:
    """Space-to-depth merge of a patch-token grid: ``[B, h*w, D] -> [B, ceil(h/s)*ceil(w/s), s*s*D]``.

    ``patches`` are in row-major order over ``grid = (h, w)`` (the :class:`~backbone_sdk.Tokens`
    convention); the output is row-major over the ``ceil(h/s) x ceil(w/s)`` grid. Merged token
    ``(i, j)`` holds the ``s x s`` block of tokens ``(s*i + dy, s*j + dx)``, block by block in
    row-major order of the offsets::

        out[b, i * W + j, (dy * s + dx) * D + d] == x[b, (s*i + dy) * w + (s*j + dx), d]

    This is the channel order of Idefics3 / SmolVLM (``Idefics3Connector.pixel_shuffle`` in
    transformers), which transformers' InternVL ``pixel_shuffle`` (InternVL's ``ps_version="v2"``)
    equals on square grids; it is *not* ``torch.nn.functional.pixel_unshuffle`` / ``F.unfold``
    order (``d * s*s + dy * s + dx``, channel-major, e.g. DeepSeek-VL2's downsample projector), and
    not InternVL's ``ps_version="v1"`` (same channels, tokens in column-major order).
    Grids with ``h`` or ``w`` not divisible by ``s`` are zero-padded at the bottom / right first
    (as DeepSeek-VL2 does), so odd grids work: a 7x7 grid gives 4x4 merged tokens.
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise InvalidOptionError(f"pixel_shuffle factor must be an integer >= 1, got {factor!r}")
    b, n, d = patches.shape
    h, w = grid
    if n != h * w:
        raise InputShapeError(f"pixel_shuffle got {n} tokens for a {h}x{w} grid; pass patch tokens only "
                              "(no CLS / registers), row-major over the grid")
    x = patches.reshape(b, h, w, d)
    pad_h, pad_w = -h % factor, -w % factor
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    gh, gw = (h + pad_h) // factor, (w + pad_w) // factor
    x = x.reshape(b, gh, factor, gw, factor, d).permute(0, 1, 3, 2, 4, 5)  # [b, i, j, dy, dx, d]
    return x.reshape(b, gh * gw, factor * factor * d)


class _NaFlexBackbone(Protocol):
    """What a native-resolution backbone (SigLIP 2 NaFlex) adds to :class:`Backbone`."""

    def naflex_inputs(self, images: Sequence[Any], max_num_patches: int | None = None) -> Any: ...

    def naflex_tokens(self, batch: Any, layer: int = -1) -> Tokens: ...


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
    """Image tokens ``[B, N, D]`` from one or several layers of a backbone, LLaVA style.

    :param backbone: a registered name (built with ``weights`` and without optional parts: no
        pyramid neck, no text tower) or a :class:`~backbone_sdk.Backbone` instance.
    :param select_layer: the layer passed to ``backbone.tokens(layer=...)``: a block index for plain
        ViTs (``-2``, the LLaVA-1.5 default, is the output of the second-to-last block, before the
        final norm), a stage index for ResNet/Swin (``-2`` = ``stage3``, stride 16). A list
        (e.g. ``[4, 8, -2]``) taps several layers in one forward pass that stops after the deepest;
        they are combined by ``layer_merge``.
    :param layer_merge: for a list ``select_layer``: ``"concat"`` the layers' tokens along the
        channels, in list order (``hidden_size`` = sum of the widths; transformers' LLaVA with a
        list ``vision_feature_layer``) or ``"sum"`` them (equal widths only). Layers at different
        strides (ResNet / Swin stages) are average-pooled to the grid of the coarsest one
        (``adaptive_avg_pool2d``: a plain ``k x k`` mean when the grids differ by a factor ``k``).
        Prefix tokens are combined the same way: the output's CLS is the layers' CLS tokens merged.
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
    :param token_merge: ``s >= 1``: merge each ``s x s`` block of patch tokens into one of width
        ``s*s*D`` (:func:`pixel_shuffle`: Idefics3 / SmolVLM channel order; odd grids zero-padded),
        after ``layer_merge``, so ``num_tokens()`` drops about ``s*s``-fold. Prefix tokens (CLS with
        ``"cls_patch"``, registers with ``drop_registers=False``) are not merged: each stays one token,
        repeated ``s*s`` times along the channels to the same width. ``token_merge=2`` with
        ``projector="mlp2x_gelu"`` is the InternVL / Idefics3 "pixel shuffle + MLP" connector.
    :param max_num_patches: native-resolution (NaFlex) backbones only: the patch budget of each raw
        image (default: the spec's ``config.max_num_patches``). Raw images (PIL, ``uint8``) go through
        the backbone's own ``naflex_inputs`` (aspect ratio kept, at most that many patches) and
        :meth:`forward` returns a **list** of ``[N_i, hidden_size]`` tensors, one per image, holding only
        its real tokens (``token_merge`` merges each image's own grid; ``select_layer`` lists are
        supported). Float ``[B, 3, H, W]`` pixels keep the fixed-size path and its ``[B, N, D]`` tensor.

    A tower with no trainable parameter runs the backbone under ``torch.no_grad()``: no autograd
    graph, no stored activations. The projector after it still trains.
    """

    def __init__(self, backbone: Backbone | str, select_layer: int | Sequence[int] = -2, select_feature: str = "patch",
                 drop_registers: bool = True, finetune: Any = "frozen", image_aspect: str = "pad",
                 image_size: int | tuple[int, int] | None = None, lora: int | dict | None = None,
                 weights: Any = None, layer_merge: str = "concat", token_merge: int = 1,
                 max_num_patches: int | None = None):
        super().__init__()
        if select_feature not in SELECT_FEATURES:
            raise InvalidOptionError(f"select_feature must be one of {SELECT_FEATURES}, got {select_feature!r}")
        if image_aspect not in IMAGE_ASPECTS:
            raise InvalidOptionError(f"image_aspect must be one of {IMAGE_ASPECTS}, got {image_aspect!r}")
        if layer_merge not in LAYER_MERGES:
            raise InvalidOptionError(f"layer_merge must be one of {LAYER_MERGES}, got {layer_merge!r}")
        if isinstance(token_merge, bool) or not isinstance(token_merge, int) or token_merge < 1:
            raise InvalidOptionError(f"token_merge must be an integer >= 1 (1 = no merge, 2 = 2x2), got {token_merge!r}")
        if isinstance(backbone, str):
            backbone = self._create(backbone, weights)
        elif weights is not None:
            raise ValueError("weights= is only used with a backbone name; load weights into the instance yourself")
        if not isinstance(backbone, Backbone):
            raise TypeError(
                f"VisionTower needs a backbone_sdk.Backbone or a registered name, got {type(backbone).__name__}")
        self.backbone = backbone
        spec = backbone.spec
        self.select_feature = select_feature
        self.drop_registers = drop_registers
        self.image_aspect = image_aspect
        size = spec.input.image_size if image_size is None else image_size
        self.image_size = (size, size) if isinstance(size, int) else cast("tuple[int, int]", tuple(size))
        #: ``select_layer`` as given (a list stays a list: it is what :attr:`config` stores); an int or a
        #: list of ints once ``_layer_indices`` accepts it
        given = list(select_layer) if isinstance(select_layer, (list, tuple)) else select_layer
        self.select_layer = cast("int | list[int]", given)
        #: the tapped layers as indices into ``feature_info``, in ``select_layer`` order
        self.layers = self._layer_indices(spec, self.select_layer)
        self.levels = tuple(spec.features[i] for i in self.layers)
        #: the level whose grid the tokens are on (the coarsest tapped one)
        self.level = max(self.levels, key=lambda level: level.stride)
        self.layer_merge = layer_merge
        self.token_merge = token_merge
        widths = {level.name: level.channels for level in self.levels}
        if layer_merge == "sum" and len(set(widths.values())) > 1:
            raise InvalidOptionError(f"layer_merge='sum' needs layers of one width, but {spec.name}'s are {widths}; "
                                     "use layer_merge='concat' or layers of equal width.")
        self.naflex = callable(getattr(backbone, "naflex_inputs", None)) and callable(
            getattr(backbone, "naflex_tokens", None))
        self.max_num_patches = self._budget(spec, max_num_patches)
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
    def _layer_indices(spec, select_layer) -> list[int]:
        depth = len(spec.features)
        layers = select_layer if isinstance(select_layer, list) else [select_layer]
        bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int) or not -depth <= x < depth]
        if bad or not layers:
            raise LayerIndexError(f"{spec.name} has {depth} {'blocks' if spec.plain else 'stages'}; select_layer must "
                                  f"be in [-{depth}, {depth - 1}] (an index into feature_info) or a non-empty list of "
                                  f"such indices, got {select_layer!r}")
        indices = [x % depth for x in layers]
        if len(set(indices)) < len(indices):
            raise LayerIndexError(f"select_layer={select_layer!r} names a layer of {spec.name} twice "
                                  f"(indices {indices} of {depth}); list each layer once.")
        return indices

    def _budget(self, spec, max_num_patches) -> int | None:
        if not self.naflex:
            if max_num_patches is not None:
                raise InvalidOptionError(f"max_num_patches is for native-resolution (NaFlex) backbones; {spec.name} "
                                         "takes fixed-size images (use image_size=)")
            return None
        budget = getattr(spec.config, "max_num_patches", None) if max_num_patches is None else max_num_patches
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise InvalidOptionError(f"max_num_patches must be a positive integer, got {budget!r}")
        if self.multi_layer and spec.prefix_tokens.count:
            raise InvalidOptionError(f"select_layer lists on native-resolution images need a backbone without prefix "
                                     f"tokens, but {spec.name} has {spec.prefix_tokens}; tap one layer.")
        return budget

    @property
    def multi_layer(self) -> bool:
        """Whether ``select_layer`` is a list (even of one layer)."""
        return isinstance(self.select_layer, list)

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
        """Width ``D`` of the tokens: the selected layer's channels (for CLIP the tower width, not
        the projection width); summed over the layers with ``layer_merge="concat"``; times
        ``token_merge ** 2``."""
        widths = [level.channels for level in self.levels]
        width = sum(widths) if self.layer_merge == "concat" else widths[0]
        return width * self.token_merge ** 2

    @property
    def config(self) -> dict:
        """JSON-friendly arguments that rebuild this tower (used by ``MultimodalLM.save_pretrained``)."""
        layers = list(self.select_layer) if isinstance(self.select_layer, list) else self.select_layer
        return {"backbone": self.spec.name, "select_layer": layers, "select_feature": self.select_feature,
                "drop_registers": self.drop_registers, "finetune": self.finetune, "lora": self.lora,
                "image_aspect": self.image_aspect, "image_size": list(self.image_size),
                "layer_merge": self.layer_merge, "token_merge": self.token_merge,
                "max_num_patches": self.max_num_patches}

    def grid(self, image_size=None) -> tuple[int, int]:
        """Grid of the output patch tokens for ``image_size`` pixel images (no forward pass): the
        selected layer's (the coarsest one of a list), then ``ceil(/ token_merge)``. On a NaFlex
        backbone ``image_size`` is a raw image's ``(H, W)``: its grid is the one ``naflex_size`` picks
        within ``max_num_patches`` (the tower's default ``image_size`` is already within budget)."""
        h, w = self._size(image_size)
        stride = self.level.stride
        if self.naflex:
            from ..plugins.siglip2 import naflex_size

            assert self.max_num_patches is not None  # _budget() gives every NaFlex tower one
            h, w = naflex_size(h, w, self.spec.input.patch_size, self.max_num_patches)
        # the contract: every level is ceil(size / stride) (exact for patch models, which need H % patch == 0)
        gh, gw = math.ceil(h / stride), math.ceil(w / stride)
        return math.ceil(gh / self.token_merge), math.ceil(gw / self.token_merge)

    def num_tokens(self, image_size=None) -> int:
        """Tokens per image for ``image_size`` (default: the tower's), computed without running.

        For a NaFlex backbone the count depends on each image's size: ``num_tokens((H, W))`` is what a
        raw ``H x W`` image gets (its budgeted grid). Float pixels fed to such a tower keep their own
        size instead: ``(H / patch) * (W / patch)``.
        """
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
    def forward(self, images) -> torch.Tensor | list[torch.Tensor]:
        """Image tokens ``[B, num_tokens, hidden_size]`` (see :meth:`prepare_images` for inputs).

        On a NaFlex backbone, raw images (PIL / ``uint8``) give a list of ``[N_i, hidden_size]``
        tensors, ``N_i = num_tokens(image_i size)``; float pixels give the ``[B, N, D]`` tensor.
        """
        raw = self._native_items(images) if self.naflex else None
        if raw is not None:
            return self._forward_native(raw)
        pixels = self.prepare_images(images)
        context = contextlib.nullcontext() if self.trainable else torch.no_grad()
        with context:
            taps = self._taps(pixels)
        prefix, patches, grid = self._combine(taps)
        return self._merge(prefix, patches, grid)

    def _merge(self, prefix: torch.Tensor, patches: torch.Tensor, grid) -> torch.Tensor:
        if self.token_merge > 1:
            s = self.token_merge
            patches = pixel_shuffle(patches, grid, s)
            prefix = prefix.repeat(1, 1, s * s)
        return torch.cat([prefix, patches], dim=1) if prefix.shape[1] else patches

    @staticmethod
    def _native_items(images) -> list | None:
        """The images as a list when they are raw (go through ``naflex_inputs``), ``None`` for float pixels."""
        batched = isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4
        items = list(images) if batched or isinstance(images, (list, tuple)) else [images]
        is_float = [isinstance(x, torch.Tensor) and x.is_floating_point() for x in items]
        if all(is_float):
            return None
        if any(is_float):
            raise InputShapeError("a native-resolution tower got raw images (PIL / uint8) mixed with float pixel "
                                  "tensors in one call; pass either raw images or normalized float pixels")
        return items

    def _forward_native(self, items: list) -> list[torch.Tensor]:
        batch = cast(_NaFlexBackbone, self.backbone).naflex_inputs(items, self.max_num_patches)
        context = contextlib.nullcontext() if self.trainable else torch.no_grad()
        with context:
            taps = self._native_taps(batch)
        grids = taps[0].grids
        out = []
        for i, grid in enumerate(grids):
            real = taps[0].mask[i]
            one = [attrs.evolve(t, patches=t.patches[i:i + 1, real[: t.patches.shape[1]]], grid=tuple(grid),
                                cls=None if t.cls is None else t.cls[i:i + 1],
                                registers=None if t.registers is None else t.registers[i:i + 1], mask=None,
                                grids=None) for t in taps]
            prefix, patches, grid = self._combine(one)
            out.append(self._merge(prefix, patches, grid)[0])
        return out

    def _native_taps(self, batch) -> list:
        """``naflex_tokens`` of each tapped layer; a list ``select_layer`` runs once, up to the deepest
        layer, and reads the others from forward hooks on ``stage_modules()`` (one per level)."""
        bb = self.backbone
        naflex = cast(_NaFlexBackbone, bb)
        if not isinstance(self.select_layer, list):
            return [naflex.naflex_tokens(batch, layer=self.select_layer)]
        groups = bb.stage_modules()[1:]
        seen: dict[int, torch.Tensor] = {}

        def keep(index):
            def hook(module, args, output):
                seen[index] = output[0] if isinstance(output, (tuple, list)) else output
            return hook

        handles = [groups[i].register_forward_hook(keep(i)) for i in self.layers]
        try:
            last = naflex.naflex_tokens(batch, layer=max(self.layers))
        finally:
            for handle in handles:
                handle.remove()
        return [attrs.evolve(last, patches=seen[i]) for i in self.layers]

    def _taps(self, pixels: torch.Tensor) -> list:
        """:class:`~backbone_sdk.Tokens` of each tapped layer, from one pass that stops at the deepest."""
        bb = self.backbone
        if not isinstance(self.select_layer, list):
            return [bb.tokens(pixels, layer=self.select_layer)]
        bb.check_images(pixels)
        sequences = bb.run_layers(pixels, self.layers)
        return [bb.split_tokens(sequences[i], bb.grid(pixels, i)) for i in self.layers]

    def _prefix(self, tokens) -> torch.Tensor:
        parts = [tokens.patches[:, :0]]
        if self.select_feature == "cls_patch":
            parts.append(tokens.cls[:, None])
        if not self.drop_registers and tokens.registers is not None:
            parts.append(tokens.registers)
        return torch.cat(parts, dim=1)

    def _combine(self, taps: list) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """``(prefix [B, P, D], patches [B, N, D], grid)``: the layers pooled to the coarsest grid and merged."""
        if len(taps) == 1:
            return self._prefix(taps[0]), taps[0].patches, tuple(taps[0].grid)
        target = tuple(taps[self.levels.index(self.level)].grid)
        patches = [_pool_tokens(t.patches, tuple(t.grid), target) for t in taps]
        prefixes = [self._prefix(t) for t in taps]
        if self.layer_merge == "concat":
            return torch.cat(prefixes, dim=-1), torch.cat(patches, dim=-1), target
        return sum(prefixes[1:], prefixes[0]), sum(patches[1:], patches[0]), target

    def extra_repr(self) -> str:
        merge = f", layer_merge={self.layer_merge!r}" if self.multi_layer else ""
        merge += f", token_merge={self.token_merge}" if self.token_merge > 1 else ""
        merge += f", max_num_patches={self.max_num_patches}" if self.naflex else ""
        return (f"backbone={self.spec.name!r}, select_layer={self.select_layer}{merge}, "
                f"select_feature={self.select_feature!r}, finetune={self.finetune!r}, lora={self.lora}")


def _pool_tokens(patches: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """Row-major patch tokens on ``grid`` average-pooled to ``target`` (unchanged when equal)."""
    if grid == target:
        return patches
    b, _, d = patches.shape
    maps = patches.transpose(1, 2).reshape(b, d, *grid)
    return F.adaptive_avg_pool2d(maps, target).flatten(2).transpose(1, 2)


def tower_from_config(config: dict, weights: Any = None) -> VisionTower:
    """Rebuild a :class:`VisionTower` from its :attr:`VisionTower.config` (``weights`` for the backbone)."""
    cfg = dict(config)
    name = cfg.pop("backbone")
    cfg["finetune"] = _parse_policy(cfg.get("finetune"))
    return VisionTower(name, weights=weights, **cfg)
