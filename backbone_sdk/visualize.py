"""Pictures of what backbone features see: PCA of patch tokens, foreground PCA, CLS attention, level norms.

>>> from backbone_sdk.visualize import visualize
>>> paths = visualize("dinov2_vits14", ["cat.jpg"], out_dir="viz")        # doctest: +SKIP

Every picture is one PNG per image and kind: the model's input (the preprocessed image, as the
model saw it) in the top-left tile, then one tile per panel, row by row (at most
:data:`MAX_COLUMNS` tiles a row, :data:`GAP` pixels apart). Kinds (:data:`KINDS`):

- ``pca``: the first three principal components of the last layer's patch tokens as RGB;
- ``pca_fg``: DINOv2's foreground recipe: the first component, thresholded, masks the foreground
  and the PCA is recomputed on foreground tokens only; background black;
- ``attention``: the CLS token's attention over the patches in the last block, one panel per head
  (plain ViTs with a CLS token);
- ``norms``: the L2 norm of every pyramid level (or of every feature level without a pyramid).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone
from .errors import InvalidOptionError, UnsupportedOperationError

__all__ = [
    "GAP",
    "KINDS",
    "MAX_COLUMNS",
    "attention_maps",
    "foreground_pca_rgb",
    "grid_shape",
    "level_norms",
    "pca_rgb",
    "supports_attention",
    "visualize",
]

log = logging.getLogger(__name__)

#: every kind of picture, in the default order
KINDS = ("pca", "pca_fg", "attention", "norms")
#: pixels between tiles (white)
GAP = 4
#: tiles in one row of a picture (the input counts as one)
MAX_COLUMNS = 8
#: images run through the model at once
_BATCH = 8
_ATTENTION_CMAP = "viridis"
_NORMS_CMAP = "magma"


# -- computations on tokens -------------------------------------------------------------------
def _principal(x: torch.Tensor, k: int) -> torch.Tensor:
    """Projections ``[N, k]`` of the rows of ``x`` ``[N, D]`` on their first ``k`` principal axes
    (float64, zero columns where fewer than ``k`` axes exist). Signs are fixed so that each
    component's largest-magnitude projection is positive: the result does not depend on the SVD's sign."""
    x = x.double()
    x = x - x.mean(dim=0, keepdim=True)
    out = x.new_zeros(x.shape[0], k)
    if x.shape[0] < 2:
        return out
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    n = min(k, int((s > s[0] * 1e-9).sum()) if s.numel() and s[0] > 0 else 0)
    if n:
        proj = x @ vh[:n].T
        peak = proj.gather(0, proj.abs().argmax(dim=0, keepdim=True))
        out[:, :n] = proj * torch.where(peak < 0, -1.0, 1.0)
    return out


def _minmax(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Scale to ``[0, 1]`` along ``dim`` (constant slices become 0)."""
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    span = hi - lo
    return torch.where(span > 1e-12, (x - lo) / span.clamp_min(1e-12), torch.zeros_like(x))


def pca_rgb(patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """First three principal components of one image's patch tokens ``[N, D]`` as an RGB map
    ``[h, w, 3]`` in ``[0, 1]`` (each component min-max scaled on its own)."""
    return _minmax(_principal(patches, 3)).float().reshape(*grid, 3)


def _border(grid: tuple[int, int]) -> torch.Tensor:
    h, w = grid
    mask = torch.ones(h, w, dtype=torch.bool)
    if h > 2 and w > 2:
        mask[1:-1, 1:-1] = False
    return mask.flatten()


def foreground_pca_rgb(patches: torch.Tensor, grid: tuple[int, int], quantile: float = 0.5
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv2's foreground PCA of one image's tokens ``[N, D]``: ``(rgb [h, w, 3], mask [h, w])``.

    The first principal component is oriented so that the image border (where the background
    usually is) gets the lower values, and tokens above its ``quantile`` are the foreground; the
    PCA is recomputed on foreground tokens only (min-max scaled over them); background is black.
    """
    if not 0.0 <= quantile < 1.0:
        raise InvalidOptionError(f"foreground quantile must be in [0, 1), got {quantile!r}")
    first = _principal(patches, 1)[:, 0]
    border = _border(grid)
    if (~border).any() and first[border].mean() > first[~border].mean():
        first = -first
    mask = first > torch.quantile(first, quantile)
    if not mask.any():
        mask = first >= first.max()
    rgb = torch.zeros(patches.shape[0], 3, dtype=torch.float32)
    rgb[mask] = _minmax(_principal(patches[mask], 3)).float()
    return rgb.reshape(*grid, 3), mask.reshape(grid)


def supports_attention(backbone: Backbone) -> str | None:
    """``None`` when :func:`attention_maps` can work for ``backbone``, else the reason it cannot."""
    spec = backbone.spec
    if not spec.plain:
        return (f"{spec.name} ({spec.family}) is a hierarchical network, not a plain ViT: it has no CLS token "
                "attending over all patches. Use the 'pca' or 'norms' pictures instead.")
    if not spec.prefix_tokens.cls:
        return (f"{spec.name} ({spec.family}) has no CLS token ({spec.prefix_tokens}), so there is no CLS "
                "attention map to draw. Use the 'pca' or 'norms' pictures instead.")
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        return f"{spec.name} does not expose its transformer blocks (Backbone.blocks), so its attention cannot be read."
    return None


@contextlib.contextmanager
def _eager_attention(module: nn.Module):
    """Switch the transformers configs of ``module``'s submodules to eager attention (which returns
    the attention probabilities) for the duration of the block; restored afterwards."""
    configs = {}
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            configs[id(config)] = (config, config._attn_implementation_internal)
    try:
        for config, _ in configs.values():
            config._attn_implementation_internal = "eager"
        yield
    finally:
        for config, previous in configs.values():
            config._attn_implementation_internal = previous


def attention_maps(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """The CLS token's attention over the patch tokens in the last block: ``[B, heads, h, w]``
    (softmax probabilities, so each head's map plus its prefix-token share sums to 1).

    Works for plain ViT families built on transformers modules: the last block runs with eager
    attention and a forward hook records the probabilities its attention module returns.
    Other backbones raise :class:`~backbone_sdk.UnsupportedOperationError`.
    """
    reason = supports_attention(backbone)
    if reason:
        raise UnsupportedOperationError(reason)
    last = cast(nn.ModuleList, backbone.blocks)[-1]  # checked by supports_attention
    backbone.check_images(images)
    grid = backbone.grid(images)
    prefix = backbone.spec.prefix_tokens.count
    length = prefix + grid[0] * grid[1]
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        if captured or not isinstance(output, (tuple, list)):
            return
        for item in output:
            if isinstance(item, torch.Tensor) and item.dim() == 4 and tuple(item.shape[-2:]) == (length, length):
                captured.append(item.detach())
                return

    handles = [m.register_forward_hook(hook) for m in last.modules()]
    try:
        with _eager_attention(last), torch.no_grad():
            backbone.tokens(images, layer=-1)
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        raise UnsupportedOperationError(
            f"{backbone.spec.name}: no attention probabilities came out of its last block "
            f"({type(last).__name__}); attention maps need transformers attention modules that return them "
            "with eager attention.")
    probs = captured[0]
    return probs[:, :, 0, prefix:].float().reshape(probs.shape[0], probs.shape[1], *grid)


def level_norms(backbone: Backbone, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
    """``{level: (L2 norm over channels [B, h, w], stride)}`` of the pyramid levels (``p2..p5``) when
    the backbone has a pyramid, else of every :meth:`~backbone_sdk.Backbone.features` level."""
    if backbone.spec.pyramid is not None:
        maps, infos = backbone.pyramid(images), backbone.pyramid_info
    else:
        maps, infos = backbone.features(images), backbone.feature_info
    strides = {info.name: info.stride for info in infos}
    return {name: (torch.linalg.vector_norm(m.float(), dim=1), strides[name]) for name, m in maps.items()}


# -- drawing ----------------------------------------------------------------------------------
def grid_shape(panels: int) -> tuple[int, int]:
    """``(rows, columns)`` of tiles of a picture with ``panels`` panels besides the input tile."""
    tiles = panels + 1
    cols = min(tiles, MAX_COLUMNS)
    return -(-tiles // cols), cols


def _upsample(values: torch.Tensor, stride: int, size: tuple[int, int]) -> torch.Tensor:
    """A ``[h, w, ...]`` token map to ``size`` pixels, nearest: each token covers its ``stride`` square."""
    x = values.reshape(*values.shape[:2], -1).permute(2, 0, 1)[None].float()
    h, w = values.shape[:2]
    if h * stride >= size[0] and w * stride >= size[1]:
        x = F.interpolate(x, size=(h * stride, w * stride), mode="nearest")[..., :size[0], :size[1]]
    else:
        x = F.interpolate(x, size=size, mode="nearest")
    return x[0].permute(1, 2, 0).reshape(*size, *values.shape[2:])


def _to_uint8(rgb: torch.Tensor) -> np.ndarray:
    return (rgb.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()


def _colorize(values: torch.Tensor, cmap: str) -> torch.Tensor:
    """A ``[H, W]`` map, min-max scaled, through a matplotlib colormap: ``[H, W, 3]`` in ``[0, 1]``."""
    import matplotlib

    scaled = _minmax(values.flatten().double()).reshape(values.shape).numpy()
    return torch.from_numpy(matplotlib.colormaps[cmap](scaled)[..., :3]).float()


def _label(tile, text: str) -> None:
    from PIL import ImageDraw, ImageFont

    size = max(10, tile.height // 10)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(tile)
    box = draw.textbbox((2, 1), text, font=font)
    draw.rectangle((0, 0, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
    draw.text((2, 1), text, fill=(255, 255, 255), font=font)


def _compose(image: np.ndarray, panels: Sequence[tuple[str, np.ndarray]], tile: tuple[int, int], labels: bool):
    """The picture: ``image`` then ``panels`` (``(label, [H, W, 3] uint8)``) as tiles on a white canvas."""
    from PIL import Image

    rows, cols = grid_shape(len(panels))
    th, tw = tile
    canvas = Image.new("RGB", (cols * tw + (cols - 1) * GAP, rows * th + (rows - 1) * GAP), (255, 255, 255))
    tiles = [("input", image, Image.Resampling.BICUBIC)]
    tiles += [(name, arr, Image.Resampling.NEAREST) for name, arr in panels]
    for i, (name, arr, resample) in enumerate(tiles):
        img = Image.fromarray(arr)
        if img.size != (tw, th):
            img = img.resize((tw, th), resample)
        if labels and th >= 48 and i:
            _label(img, name)
        r, c = divmod(i, cols)
        canvas.paste(img, (c * (tw + GAP), r * (th + GAP)))
    return canvas


# -- the entry point --------------------------------------------------------------------------
def _resolve_kinds(kinds) -> tuple[str, ...]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise InvalidOptionError(f"unknown visualization kind(s) {unknown or '[]'}; choose from {list(KINDS)}")
    return tuple(dict.fromkeys(kinds))


def _load(images) -> tuple[list, list[str]]:
    """Decoded images and a file stem for each (``image{i}`` for in-memory images; repeated stems numbered)."""
    from .preprocess import load_image

    if isinstance(images, (str, os.PathLike)) or hasattr(images, "convert") or isinstance(images, np.ndarray):
        images = [images]
    loaded, stems = [], []
    for i, item in enumerate(images):
        if isinstance(item, (str, os.PathLike)):
            loaded.append(load_image(item))
            stems.append(Path(item).stem)
        else:
            loaded.append(item)
            stems.append(f"image{i}")
    if not loaded:
        raise InvalidOptionError("visualize() needs at least one image")
    counts = {s: stems.count(s) for s in stems}
    seen: dict[str, int] = {}
    for i, stem in enumerate(stems):
        if counts[stem] > 1:
            seen[stem] = seen.get(stem, 0) + 1
            stems[i] = f"{stem}-{seen[stem]}"
    return loaded, stems


def _tile_size(size: tuple[int, int], tile: int | None) -> tuple[int, int]:
    if tile is None:
        return size
    if tile < 1:
        raise InvalidOptionError(f"tile must be a positive number of pixels, got {tile!r}")
    scale = tile / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _panels(backbone: Backbone, batch: torch.Tensor, kinds: Sequence[str], fg_quantile: float) -> list[dict]:
    """For each image of ``batch``: ``{kind: [(label, [H, W, 3] uint8), ...]}``."""
    size = cast("tuple[int, int]", tuple(batch.shape[-2:]))
    out: list[dict] = [{} for _ in range(batch.shape[0])]
    if "pca" in kinds or "pca_fg" in kinds:
        tokens = backbone.tokens(batch, layer=-1)
        assert tokens.grid is not None  # one batch tensor: every image has the same grid
        stride = backbone.feature_info[-1].stride
        for b, item in enumerate(out):
            patches = tokens.patches[b].float()
            if "pca" in kinds:
                item["pca"] = [("pca", _to_uint8(_upsample(pca_rgb(patches, tokens.grid), stride, size)))]
            if "pca_fg" in kinds:
                rgb, _ = foreground_pca_rgb(patches, tokens.grid, fg_quantile)
                item["pca_fg"] = [("pca fg", _to_uint8(_upsample(rgb, stride, size)))]
    if "attention" in kinds:
        maps = attention_maps(backbone, batch)
        stride = backbone.feature_info[-1].stride
        for b, item in enumerate(out):
            item["attention"] = [(f"head {h}", _to_uint8(_colorize(_upsample(m, stride, size), _ATTENTION_CMAP)))
                                 for h, m in enumerate(maps[b])]
    if "norms" in kinds:
        norms = level_norms(backbone, batch)
        for b, item in enumerate(out):
            item["norms"] = [(name, _to_uint8(_colorize(_upsample(n[b], stride, size), _NORMS_CMAP)))
                             for name, (n, stride) in norms.items()]
    return out


def visualize(backbone: Backbone | str, images, kinds: Iterable[str] | str | None = None, out_dir="visualize", *,
              size: int | tuple[int, int] | None = None, weights=None, tile: int | None = None,
              labels: bool = True, fg_quantile: float = 0.5) -> list[Path]:
    """Write one PNG per image and kind to ``out_dir`` (``{image stem}_{kind}.png``); return the paths
    in order (for each image, its kinds in the order given).

    :param backbone: a :class:`~backbone_sdk.Backbone`, or a registered name (built with ``weights``;
        ``None`` gives random weights).
    :param images: image file paths, PIL images or ``uint8`` arrays ``[H, W, 3]`` (one or a list).
    :param kinds: any of :data:`KINDS`; default (``None``) all kinds the backbone supports. An
        explicit ``attention`` raises :class:`~backbone_sdk.UnsupportedOperationError` before
        anything is written when the backbone has no CLS attention (see :func:`supports_attention`).
    :param size: model input size (square int or ``(h, w)``; default the spec's ``image_size``);
        images are resized and center-cropped to it (:func:`backbone_sdk.preprocess`).
    :param tile: side in pixels of each tile's longer edge (default: the input size).
    :param labels: write panel names (head, level) on tiles at least 48 pixels high.
    :param fg_quantile: quantile of the first component above which ``pca_fg`` tokens are foreground.
    """
    from PIL import Image  # noqa: F401  (fail early when Pillow is missing)

    from .factory import create_backbone
    from .preprocess import preprocess

    explicit = kinds is not None
    kinds = _resolve_kinds(KINDS if kinds is None else kinds)
    if not isinstance(backbone, Backbone):
        backbone = create_backbone(backbone, weights=weights)
    elif weights is not None:
        raise InvalidOptionError("visualize(): weights= applies to a backbone name; load_weights() a Backbone yourself")
    if "attention" in kinds and (reason := supports_attention(backbone)):
        if explicit:
            raise UnsupportedOperationError(reason)
        log.info("skipping the attention pictures: %s", reason)
        kinds = tuple(k for k in kinds if k != "attention")
    if not 0.0 <= fg_quantile < 1.0:
        raise InvalidOptionError(f"fg_quantile must be in [0, 1), got {fg_quantile!r}")
    loaded, stems = _load(images)
    ref = next(backbone.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    spec = backbone.spec.input
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    was_training = backbone.training
    backbone.eval()
    try:
        for start in range(0, len(loaded), _BATCH):
            batch = preprocess(loaded[start:start + _BATCH], backbone.spec, size=size)
            with torch.inference_mode():
                panels = _panels(backbone, batch.to(device=device, dtype=dtype), kinds, fg_quantile)
            tile_size = _tile_size(cast("tuple[int, int]", tuple(batch.shape[-2:])), tile)
            for b, item in enumerate(panels):
                shown = _to_uint8((batch[b] * std + mean).permute(1, 2, 0))
                for kind in kinds:
                    path = out_dir / f"{stems[start + b]}_{kind}.png"
                    _compose(shown, item[kind], tile_size, labels).save(path, optimize=True)
                    written.append(path)
    finally:
        backbone.train(was_training)
    return written
