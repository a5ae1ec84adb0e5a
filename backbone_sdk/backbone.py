"""The uniform backbone interface shared by every family."""

from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import torch
from torch import nn

from .errors import InputDtypeError, InputShapeError
from .specs import BackboneSpec, FeatureInfo, Tokens

__all__ = ["Backbone", "PYRAMID_LEVELS"]

#: Names and strides of the maps returned by :meth:`Backbone.pyramid`.
PYRAMID_LEVELS = (("p2", 4), ("p3", 8), ("p4", 16), ("p5", 32))


class Backbone(nn.Module):
    """Base class of every backbone_sdk model.

    Subclasses implement :meth:`_features` (compute the named levels, stopping after the deepest
    one), :meth:`embed` and :meth:`tokens`, and describe their trainable groups in
    :meth:`stage_modules` for fine-tuning policies. Images are float ``[B, 3, H, W]`` normalized
    with ``spec.input.mean/std`` (see :func:`backbone_sdk.preprocess`).
    """

    #: state-dict prefixes that foreign checkpoints are not expected to contain (e.g. the ViT
    #: simple feature pyramid); strict loading reports them instead of failing.
    optional_key_prefixes: tuple[str, ...] = ()

    def __init__(self, spec: BackboneSpec):
        super().__init__()
        self.spec = spec
        #: modules kept in eval mode by ``train()`` (set by fine-tune policies: frozen parts, norms)
        self.keep_eval: list[nn.Module] = []
        #: run the trunk under ``torch.no_grad()`` (the ``frozen`` fine-tune policy): no graph, no
        #: stored activations, even for inputs that require grad; a simple pyramid after it still trains
        self.trunk_no_grad = False

    def train(self, mode: bool = True):
        """``nn.Module.train`` that keeps frozen parts and evaluated norms (``norm_eval``) in eval mode."""
        super().train(mode)
        if mode:
            for module in self.keep_eval:
                module.eval()
        return self

    # -- metadata ----------------------------------------------------------------------------
    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """What :meth:`features` returns: one ``FeatureInfo(name, channels, stride)`` per level."""
        return self.spec.features

    @property
    def pyramid_info(self) -> tuple[FeatureInfo, ...]:
        """What :meth:`pyramid` returns (``p2..p5`` at strides 4, 8, 16, 32)."""
        return tuple(FeatureInfo(n, c, s) for (n, s), c in zip(PYRAMID_LEVELS, self.pyramid_channels))

    @property
    def pyramid_channels(self) -> tuple[int, ...]:
        return tuple(f.channels for f in self.spec.features[-4:])

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    # -- public API --------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Same as :meth:`features` with every level, so frameworks calling the module get maps."""
        return self.features(images)

    def features(self, images: torch.Tensor, levels: Iterable[str] | str | None = None) -> dict[str, torch.Tensor]:
        """Named NCHW feature maps ``{name: [B, C, H/stride, W/stride]}``.

        Only ``levels`` (default: all of ``feature_info``) are returned, and the network stops
        after the deepest requested one.
        """
        self.check_images(images)
        levels = self.resolve_levels(levels)
        with self.trunk_context():
            return self._features(images, levels)

    def pyramid(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Maps ``p2..p5`` at strides 4, 8, 16, 32 (native stages for hierarchical networks)."""
        names = self.spec.feature_names[-4:]
        feats = self.features(images, names)
        return {p: feats[n] for (p, _), n in zip(PYRAMID_LEVELS, names)}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Global embedding ``[B, embed_dim]``."""
        raise NotImplementedError

    def tokens(self, images: torch.Tensor, layer: int = -1) -> Tokens:
        """Token outputs of block ``layer`` (negative counts from the end)."""
        raise NotImplementedError

    # -- fine-tuning support ------------------------------------------------------------------
    def trunk_context(self):
        """``torch.no_grad()`` while the trunk is frozen (:attr:`trunk_no_grad`), else a no-op."""
        return torch.no_grad() if self.trunk_no_grad else contextlib.nullcontext()

    def stage_modules(self) -> list[nn.Module]:
        """Trainable groups in depth order: ``[stem, stage1, ...]`` or ``[embeddings, block0, ...]``.

        Fine-tune policies freeze prefixes of this list; layer-wise LR decay uses its index.
        Parameters in none of the groups (heads, pyramid) are treated as the last layer.
        """
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward to trade compute for memory."""
        raise NotImplementedError

    def read_transformers_checkpoint(self, directory) -> dict[str, torch.Tensor] | None:
        """Native state dict from a transformers ``save_pretrained`` directory (any transformers
        version: ``from_pretrained`` renames legacy keys), or ``None`` if this backbone has no
        transformers model under ``self.model``. Families with several models override this."""
        from transformers import PreTrainedModel

        inner = getattr(self, "model", None)
        if not isinstance(inner, PreTrainedModel):
            return None
        loaded, info = type(inner).from_pretrained(directory, config=inner.config, output_loading_info=True)
        # keys from_pretrained had to initialize are dropped, so strict loading reports them as missing;
        # keys of modules this backbone does not use (poolers, heads) are ignored
        absent = set(info.get("missing_keys", ())) | {m[0] if isinstance(m, tuple) else m
                                                     for m in info.get("mismatched_keys", ())}
        ours = inner.state_dict()
        return {f"model.{k}": v for k, v in loaded.state_dict().items() if k in ours and k not in absent}

    # -- validation ----------------------------------------------------------------------------
    def resolve_levels(self, levels: Iterable[str] | str | None) -> tuple[str, ...]:
        names = self.spec.feature_names
        if levels is None:
            return names
        if isinstance(levels, str):
            levels = (levels,)
        levels = tuple(levels)
        unknown = [lvl for lvl in levels if lvl not in names]
        if unknown or not levels:
            raise InputShapeError(
                f"{self.spec.name} has no feature level(s) {unknown or '[]'}; "
                f"choose from {list(names)}."
            )
        return tuple(n for n in names if n in levels)

    def check_images(self, images) -> None:
        """Raise an SDK error naming the problem and the fix when ``images`` cannot be taken."""
        name, spec = self.spec.name, self.spec.input
        if not isinstance(images, torch.Tensor):
            raise InputDtypeError(
                f"{name} expects a torch.Tensor of shape [B, 3, H, W], got {type(images).__name__}; "
                "convert PIL images or arrays with backbone_sdk.preprocess(images, spec)."
            )
        if images.dim() != 4:
            hint = " Add a batch dimension with images.unsqueeze(0)." if images.dim() == 3 else ""
            raise InputShapeError(f"{name} expects images of shape [B, 3, H, W], got {tuple(images.shape)}.{hint}")
        if images.shape[1] != spec.channels:
            hint = (
                " The tensor looks channels-last (NHWC): use images.permute(0, 3, 1, 2)."
                if images.shape[-1] == spec.channels
                else " Grayscale images can be repeated to 3 channels: images.expand(-1, 3, -1, -1)."
                if images.shape[1] == 1
                else ""
            )
            raise InputShapeError(
                f"{name} expects {spec.channels} input channels (RGB), got {images.shape[1]} "
                f"in shape {tuple(images.shape)}.{hint}"
            )
        if not images.is_floating_point():
            raise InputDtypeError(
                f"{name} expects float images normalized with mean={spec.mean} std={spec.std}, got "
                f"{images.dtype}; use backbone_sdk.preprocess(images, backbone.spec) to convert."
            )
        self._check_size(images.shape[-2], images.shape[-1])
        self._check_dtype(images)

    def _check_size(self, h: int, w: int) -> None:
        spec, div = self.spec.input, self.spec.input.size_divisibility
        if h < spec.min_size or w < spec.min_size:
            raise InputShapeError(
                f"{self.spec.name} needs images of at least {spec.min_size}x{spec.min_size}, got {h}x{w}; "
                "resize or pad the images."
            )
        if h % div or w % div:
            fix = f"{-(-h // div) * div}x{-(-w // div) * div}"
            raise InputShapeError(
                f"{self.spec.name} needs H and W divisible by {div} (patch size), got {h}x{w}; "
                f"resize or pad to e.g. {fix}."
            )

    def _check_dtype(self, images: torch.Tensor) -> None:
        ref = next(self.parameters(), None)
        if ref is None or images.dtype == ref.dtype or torch.is_autocast_enabled(images.device.type):
            return
        raise InputDtypeError(
            f"{self.spec.name} has {ref.dtype} weights but got {images.dtype} images; cast with "
            f"images.to({ref.dtype}) or run under torch.autocast."
        )

    def _features(self, images: torch.Tensor, levels: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.spec.name!r}"
