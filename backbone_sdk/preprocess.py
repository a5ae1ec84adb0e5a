"""Turning PIL images and uint8 arrays into normalized float batches."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputDtypeError, InputShapeError
from .specs import BackboneSpec, InputSpec

__all__ = ["preprocess", "load_image"]


def load_image(path) -> "np.ndarray":
    """Read an image file as an RGB ``uint8`` array ``[H, W, 3]``: EXIF orientation applied, 16-bit
    scaled to 8, CMYK/grayscale/palette to RGB, alpha dropped, first frame of animations (see
    :mod:`backbone_sdk.imageio`). Unusable files raise :class:`~backbone_sdk.imageio.DecodeError`."""
    from .imageio import decode_image

    return decode_image(str(path)).array


def _to_chw_float(image) -> torch.Tensor:
    """Arrays and PIL images are HWC (the imaging convention); torch tensors are CHW unless HWC is obvious."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image
        image = image.convert("RGB")
    channels_first = isinstance(image, torch.Tensor)
    tensor = image if channels_first else torch.from_numpy(np.array(image))
    if tensor.dim() == 2:
        tensor, channels_first = tensor.unsqueeze(-1).expand(-1, -1, 3), False
    if tensor.dim() != 3:
        raise InputShapeError(f"expected an image [H, W, 3] or [3, H, W], got shape {tuple(tensor.shape)}")
    if channels_first and tensor.shape[0] not in (1, 3) and tensor.shape[-1] in (3, 4):
        channels_first = False
    if not channels_first:
        tensor = tensor[..., :3].permute(2, 0, 1)
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    if tensor.shape[0] != 3:
        raise InputShapeError(f"expected 3 (RGB) channels, got shape {tuple(tensor.shape)}")
    if tensor.dtype == torch.uint8:
        return tensor.float().div_(255.0)
    if tensor.is_floating_point():
        return tensor.float()
    raise InputDtypeError(f"images must be uint8 (0-255) or float (0-1), got {tensor.dtype}")


#: resized images longer than this many crop sides are cut to their central part before resizing
_ASPECT_BOUND = 4


def _bound_aspect(img: torch.Tensor, size: tuple[int, int], scale: float):
    """Cut an extreme aspect ratio to the central part the crop keeps (plus the interpolation
    filter's reach) before resizing, so that a 1x2000 image is not resized to 256x512000 pixels.
    Ordinary images are untouched (results identical to resizing the whole image)."""
    h, w = img.shape[-2:]
    keep = []
    for n, s in ((h, size[0]), (w, size[1])):
        if n * scale <= _ASPECT_BOUND * s:
            keep.append(n)
            continue
        margin = int(np.ceil(2 * max(1.0, 1.0 / scale))) + 2
        keep.append(min(n, int(np.ceil(s / scale)) + 2 * margin))
    if keep == [h, w]:
        return img, h, w
    top, left = (h - keep[0]) // 2, (w - keep[1]) // 2
    return img[:, top:top + keep[0], left:left + keep[1]], keep[0], keep[1]


def _resize_crop(img: torch.Tensor, size: tuple[int, int], mode: str, spec: InputSpec) -> torch.Tensor:
    h, w = img.shape[-2:]
    if mode == "resize":
        return F.interpolate(img[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
    if mode == "crop":
        scale = max(size[0] / h, size[1] / w) / spec.crop_pct
        img, h, w = _bound_aspect(img, size, scale)
        new = (max(size[0], round(h * scale)), max(size[1], round(w * scale)))
        img = F.interpolate(img[None], size=new, mode="bicubic", antialias=True, align_corners=False)[0]
        top, left = (new[0] - size[0]) // 2, (new[1] - size[1]) // 2
        return img[:, top:top + size[0], left:left + size[1]]
    if mode == "pad":  # keep aspect: fit inside ``size`` and pad with the mean colour
        scale = min(size[0] / h, size[1] / w)
        new = (max(1, round(h * scale)), max(1, round(w * scale)))
        img = F.interpolate(img[None], size=new, mode="bicubic", antialias=True, align_corners=False)[0]
        canvas = torch.tensor(spec.mean).view(3, 1, 1).expand(3, *size).clone()
        top, left = (size[0] - new[0]) // 2, (size[1] - new[1]) // 2
        canvas[:, top:top + new[0], left:left + new[1]] = img
        return canvas
    raise ValueError(f"unknown mode {mode!r}; use 'crop', 'resize' or 'pad'")


def preprocess(images, spec: BackboneSpec | InputSpec, size=None, mode: str = "crop") -> torch.Tensor:
    """PIL images, ``uint8`` arrays/tensors (HWC or CHW) or 0-1 floats → ``[B, 3, H, W]`` normalized.

    ``mode``: ``"crop"`` (resize the short side, center-crop, as in ImageNet evaluation),
    ``"resize"`` (stretch to ``size``) or ``"pad"`` (fit and pad with the mean colour).
    ``size`` defaults to the spec's ``image_size``.
    """
    spec = spec.input if isinstance(spec, BackboneSpec) else spec
    size = spec.image_size if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    if isinstance(images, torch.Tensor) and images.dim() == 4 or isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, Sequence):
        images = [images]
    batch = torch.stack([_resize_crop(_to_chw_float(img), size, mode, spec) for img in images])
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (batch.clamp_(0.0, 1.0) - mean) / std
