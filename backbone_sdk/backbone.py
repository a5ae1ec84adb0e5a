"""The uniform backbone interface shared by every family."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterable, Sequence, TypeVar

import torch
from torch import nn

from .errors import InputDtypeError, InputShapeError, InvalidOptionError, LayerIndexError, UnsupportedOperationError
from .layers.pyramid import SimpleFeaturePyramid
from .specs import NECK, PYRAMID_LEVELS, BackboneSpec, FeatureInfo, Tokens

if TYPE_CHECKING:
    from .optimize import OptimizationReport
    from .weights import LoadReport

__all__ = ["Backbone", "PYRAMID_LEVELS"]

_B = TypeVar("_B", bound="Backbone")

#: state-dict prefix of the neck in checkpoints written before the neck moved into the base class
_LEGACY_NECK_PREFIX = "simple_" + "pyramid."


class Backbone(nn.Module):
    """Base class of every backbone_sdk model: the contract adapters and integrations rely on.

    A family implements :meth:`_features` (compute the named levels, stopping after the deepest
    one) and :meth:`stage_modules`; everything else has a default derived from the spec:

    - :meth:`pyramid`: the four levels at strides 4-32 (hierarchical nets), or the simple feature
      pyramid neck this base class builds on the last level (part ``"neck"``);
    - :meth:`embed`: the global average of the last level (when ``embed_dim`` equals its width);
    - :meth:`run_layers` / :meth:`tokens`: flattened maps; transformers override
      :meth:`run_layers` to return their whole token sequence, prefix tokens included.

    Images are float ``[B, 3, H, W]`` normalized with ``spec.input.mean/std`` (see
    :func:`backbone_sdk.preprocess`).
    """

    #: state-dict prefixes a foreign checkpoint need not contain (e.g. a mask token used only in
    #: pre-training): strict loading reports them as initialized instead of failing
    optional_keys: tuple[str, ...] = ()
    #: what loading the weights reported (set by ``create_backbone`` when given ``weights``)
    load_report: LoadReport
    #: whether :meth:`optimize` switches the weights to ``torch.channels_last`` (convolutional nets)
    prefers_channels_last: bool = False
    _optimization: OptimizationReport | None = None

    def __init__(self, spec: BackboneSpec):
        super().__init__()
        self.spec = spec
        #: modules kept in eval mode by ``train()`` (set by fine-tune policies: frozen parts, norms)
        self.keep_eval: list[nn.Module] = []
        #: run the trunk under ``torch.no_grad()`` (the ``frozen`` fine-tune policy): no graph, no
        #: stored activations, even for inputs that require grad; the neck after it still trains
        self.trunk_no_grad = False
        pyr = spec.pyramid
        if pyr is not None and not pyr.native:
            source = spec.feature(pyr.sources[0])
            self.neck: SimpleFeaturePyramid | None = SimpleFeaturePyramid(source.channels, pyr.levels[0].channels)
        else:
            self.neck = None

    def train(self: _B, mode: bool = True) -> _B:
        """``nn.Module.train`` that keeps frozen parts and evaluated norms (``norm_eval``) in eval mode."""
        if mode and self._optimization is not None and self._optimization.folded_norms:
            raise UnsupportedOperationError(
                f"{self.spec.name} was optimized for inference: {self._optimization.folded_norms} BatchNorm layers are "
                "folded into their convolutions, which training must not update as one. Call "
                "backbone.optimization.undo() before train().")
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
        """What :meth:`pyramid` returns (``p2..p5`` at strides 4, 8, 16, 32); empty if unavailable."""
        return self.spec.pyramid.levels if self.spec.pyramid is not None else ()

    @property
    def pyramid_channels(self) -> tuple[int, ...]:
        return tuple(f.channels for f in self.pyramid_info)

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @property
    def optional_key_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes strict loading does not require: :attr:`optional_keys` and the neck
        (a foreign checkpoint of the trunk never holds it)."""
        return (*self.optional_keys, *(("neck.",) if self.neck is not None else ()))

    # -- public API --------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Same as :meth:`features` with every level, so frameworks calling the module get maps."""
        return self.features(images)

    def features(self, images: torch.Tensor, levels: Iterable[str] | str | None = None) -> dict[str, torch.Tensor]:
        """Named NCHW feature maps ``{name: [B, C, ceil(H/stride), ceil(W/stride)]}``.

        Only ``levels`` (default: all of ``feature_info``) are returned, and the network stops
        after the deepest requested one.
        """
        self.check_images(images)
        levels = self.resolve_levels(levels)
        with self.trunk_context():
            return self._features(images, levels)

    def pyramid(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Maps ``p2..p5`` at strides 4, 8, 16, 32 (``pyramid_info``): native levels renamed, or the
        simple feature pyramid neck on the last level (trainable, random until trained)."""
        pyr = self.spec.pyramid
        if pyr is None:
            raise UnsupportedOperationError(self._no_pyramid_reason())
        feats = self.features(images, pyr.sources)
        if pyr.native:
            return {info.name: feats[src] for info, src in zip(pyr.levels, pyr.sources)}
        assert self.neck is not None  # built in __init__ for every non-native pyramid
        return self.neck(feats[pyr.sources[0]], tuple(images.shape[-2:]))

    def _no_pyramid_reason(self) -> str:
        strides = [f.stride for f in self.spec.features]
        if self.spec.config is not None and NECK in self.spec.config.optional_parts(self.spec.features):
            return (f"{self.spec.name} was created without its pyramid neck (parts={sorted(self.spec.parts)}); "
                    f"create it with parts including {NECK!r} to use pyramid().")
        return (f"{self.spec.name} has no pyramid: its levels have strides {strides}, not 4, 8, 16 and 32, and "
                "it declares no neck. Use features(), or give its config a neck (see docs/plugins.md).")

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Global embedding ``[B, embed_dim]``; by default the spatial mean of the last level."""
        last = self.spec.features[-1]
        if last.channels != self.spec.embed_dim:
            raise UnsupportedOperationError(
                f"{self.spec.name}: embed_dim {self.spec.embed_dim} differs from its last level's width "
                f"{last.channels}, so the default embed() (mean of {last.name}) does not apply; the plugin must "
                "implement embed().")
        return self.features(images, last.name)[last.name].mean(dim=(2, 3))

    def layer_index(self, layer) -> int:
        """``layer`` (an int, negative from the end) as an index into ``feature_info``."""
        depth = len(self.spec.features)
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise LayerIndexError(f"{self.spec.name}: layer must be an int in [-{depth}, {depth - 1}] "
                                  f"(an index into feature_info), got {layer!r} ({type(layer).__name__})")
        index = layer + depth if layer < 0 else layer
        if not 0 <= index < depth:
            kind = "blocks" if self.spec.plain else "stages"
            raise LayerIndexError(f"{self.spec.name} has {depth} {kind} ({self.spec.features[0].name}.."
                                  f"{self.spec.features[-1].name}); layer must be in [-{depth}, {depth - 1}], got {layer}")
        return index

    def run_layers(self, images: torch.Tensor, layers: Iterable[int]) -> dict[int, torch.Tensor]:
        """Token sequences ``[B, P + N, D]`` after each level in ``layers`` (indices into
        ``feature_info``, normalized to ``0..depth-1`` in the result), stopping after the deepest.

        ``P = spec.prefix_tokens.count`` prefix tokens come first, then ``N = grid[0] * grid[1]``
        patch tokens in row-major order. The default flattens ``features()`` maps (``P = 0``).
        """
        indices = sorted({self.layer_index(i) for i in layers})
        if self.spec.prefix_tokens.count:
            raise UnsupportedOperationError(f"{self.spec.name} declares {self.spec.prefix_tokens} but does not "
                                            "implement run_layers(); the plugin must return its token sequence.")
        names = self.spec.feature_names
        maps = self.features(images, [names[i] for i in indices])
        return {i: maps[names[i]].flatten(2).transpose(1, 2) for i in indices}

    def stem_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The token sequence entering the first layer (``[B, P + N, D]``); transformers only."""
        raise UnsupportedOperationError(f"{self.spec.name} is not a token model; it has no stem token sequence.")

    def grid(self, images: torch.Tensor, layer: int = -1) -> tuple[int, int]:
        """Token grid of level ``layer`` for these images: ``ceil(H / stride) x ceil(W / stride)``."""
        stride = self.spec.features[self.layer_index(layer)].stride
        return -(-images.shape[-2] // stride), -(-images.shape[-1] // stride)

    def tokens(self, images: torch.Tensor, layer: int = -1) -> Tokens:
        """Tokens after level ``layer`` (negative counts from the end; LLaVA's -2 = second to last)."""
        index = self.layer_index(layer)
        self.check_images(images)
        return self.split_tokens(self.run_layers(images, [index])[index], self.grid(images, index))

    def split_tokens(self, x: torch.Tensor, grid: tuple[int, int]) -> Tokens:
        """A ``[B, P + N, D]`` sequence as :class:`Tokens` following ``spec.prefix_tokens``."""
        prefix = self.spec.prefix_tokens
        n, first = prefix.count, int(prefix.cls)
        return Tokens(patches=x[:, n:], grid=grid, cls=x[:, 0] if prefix.cls else None,
                      registers=x[:, first:n] if prefix.extra else None)

    # -- inference optimization ------------------------------------------------------------------
    def optimize(self, *, dtype: torch.dtype | str | None = None, compile: bool = False, fold_norms: bool = True,
                 channels_last: bool | None = None, example: torch.Tensor | None = None,
                 compile_options: dict | None = None) -> OptimizationReport:
        """Make this backbone faster for inference; returns what changed (``report.changes``), and
        ``report.undo()`` (also ``backbone.optimization.undo()``) restores it exactly.

        :param dtype: cast the weights once (``torch.bfloat16`` / ``"bf16"``, ``"fp16"``); images must
            then come in that dtype. ``None`` keeps the dtype.
        :param compile: replace ``embed``/``features``/``pyramid`` by ``torch.compile`` d versions with
            inductor weight freezing (opt-in: compiling takes seconds to minutes; each new input shape
            compiles again). ``compile_options`` are passed on to ``torch.compile(options=...)``.
        :param fold_norms: fold eval-mode BatchNorm layers into the convolutions before them (families
            with BatchNorm; a no-op elsewhere). Afterwards ``train()`` raises until undone.
        :param channels_last: NHWC weights; default: the family's ``prefers_channels_last``.
        :param example: a batch to run once after compiling, to measure ``report.compile_seconds``.

        Outputs match the unoptimized backbone to float rounding (1e-4 in fp32; see the parity tests).
        Calling it again first undoes the previous optimization.
        """
        from .optimize import optimize

        return optimize(self, dtype=dtype, compile=compile, fold_norms=fold_norms, channels_last=channels_last,
                        example=example, compile_options=compile_options)

    @property
    def optimization(self) -> OptimizationReport | None:
        """The active :meth:`optimize` report, ``None`` when not optimized (or undone)."""
        return self._optimization

    def unbuilt_key_prefixes(self) -> tuple[str, ...]:
        """Native state-dict prefixes of optional parts this instance was built without (e.g. a CLIP
        text tower): checkpoints of the full model load with those keys ignored. Default: the neck's
        keys when it was not built."""
        return ("neck.",) if self.neck is None else ()

    def norm_folding_pairs(self) -> list[tuple[nn.Module, str, str]]:
        """``(owner, conv_attr, norm_attr)`` for each convolution directly followed by a BatchNorm that
        :meth:`optimize` may fold; families with BatchNorm override this (default: none)."""
        return []

    # -- training support ----------------------------------------------------------------------
    def trunk_context(self):
        """``torch.no_grad()`` while the trunk is frozen (:attr:`trunk_no_grad`), else a no-op."""
        return torch.no_grad() if self.trunk_no_grad else contextlib.nullcontext()

    def neck_modules(self) -> list[nn.Module]:
        """Modules after the trunk that only :meth:`pyramid` uses (the simple feature pyramid)."""
        return [self.neck] if self.neck is not None else []

    def trunk_modules(self) -> list[nn.Module]:
        """Direct children that are not a neck: what the ``frozen`` policy freezes."""
        necks = {id(m) for m in self.neck_modules()}
        return [m for m in self.children() if id(m) not in necks]

    def stage_modules(self) -> list[nn.Module]:
        """Trainable groups in depth order: ``[stem, stage1, ...]`` or ``[embeddings, block0, ...]``
        (one per level after the stem). Fine-tune policies freeze prefixes of this list; layer-wise
        LR decay uses its index. Parameters in none of the groups (heads, neck) count as the last layer.
        """
        raise UnsupportedOperationError(f"{self.spec.name} does not list its stage modules; fine-tune policies "
                                        "other than 'none'/'frozen' need Backbone.stage_modules().")

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that get no weight decay besides 1-d ones (position tables, special tokens)."""
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward to trade compute for memory."""
        raise UnsupportedOperationError(f"{self.spec.name} does not support gradient checkpointing.")

    # -- weights -------------------------------------------------------------------------------
    def read_pretrained(self, directory: str) -> dict[str, torch.Tensor] | None:
        """Native state dict from a framework's own checkpoint directory (e.g. a transformers
        ``save_pretrained`` directory), or ``None`` when the family reads none. Called by
        :func:`~backbone_sdk.load_weights` before it reads the files itself."""
        return None

    def upgrade_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename keys of checkpoints written by earlier versions of this backbone (native layout)."""
        if self.neck is not None and any(k.startswith(_LEGACY_NECK_PREFIX) for k in state):
            state = {("neck." + k[len(_LEGACY_NECK_PREFIX):] if k.startswith(_LEGACY_NECK_PREFIX) else k): v
                     for k, v in state.items()}
        return state

    # -- validation ----------------------------------------------------------------------------
    def resolve_levels(self, levels: Iterable[str] | str | None) -> tuple[str, ...]:
        names = self.spec.feature_names
        if levels is None:
            return names
        if isinstance(levels, str):
            levels = (levels,)
        if not isinstance(levels, Iterable) or any(not isinstance(lvl, str) for lvl in levels):
            raise InvalidOptionError(f"{self.spec.name}: levels must be a level name or a list of names from "
                                     f"{list(names)} (or None for all), got {levels!r}")
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
        if images.shape[0] == 0:
            raise InputShapeError(f"{name} got an empty batch (shape {tuple(images.shape)}); pass at least one image "
                                  "(skip the call for empty batches).")
        self._check_size(images.shape[-2], images.shape[-1])
        self._check_device(images)
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
        if ref is None or images.dtype == ref.dtype or (
                ref.device.type != "meta" and torch.is_autocast_enabled(ref.device.type)):
            return
        raise InputDtypeError(
            f"{self.spec.name} has {ref.dtype} weights but got {images.dtype} images; cast with "
            f"images.to({ref.dtype}) or run under torch.autocast."
        )

    def _check_device(self, images: torch.Tensor) -> None:
        ref = next(self.parameters(), None)
        if ref is None or images.device == ref.device or "meta" not in (images.device.type, ref.device.type):
            return  # cpu/cuda mismatches get torch's own clear message; meta ones would not
        raise InputDtypeError(
            f"{self.spec.name} has weights on {ref.device} but got images on {images.device}. For shape inference "
            f"without memory, build the model on the meta device too (with torch.device('meta'): create_backbone(...)); "
            f"otherwise move the images with images.to({str(ref.device)!r}).")

    def _features(self, images: torch.Tensor, levels: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.spec.name!r}"
