"""Decoding image files the way users expect, with every failure named.

Used by :func:`backbone_sdk.load_image` and by extraction. Conversions:

- EXIF orientation is applied (a photo taken in portrait is upright);
- 16-bit images (``I;16``, ``I`` modes) are scaled to 8 bits (``value / 257``), not clipped;
- CMYK, grayscale, palette and two-channel images become RGB. **Alpha policy:** transparency is
  dropped and the stored colours are kept (what ``PIL.Image.convert("RGB")`` and the timm /
  torchvision loaders do); composite the image yourself first for another background;
- animations (GIF, APNG, WebP) give their first frame;
- images above ``max_pixels`` are refused (decompression bombs) before they are decoded;
- JPEGs much larger than needed are decoded at 1/2, 1/4 or 1/8 scale (``draft``) when a
  target size is given.
"""

from __future__ import annotations

import contextlib
import io
import signal
import threading
import warnings
from typing import Callable

import attrs
import numpy as np

__all__ = ["DecodeError", "Decoded", "decode_image", "MAX_PIXELS", "FAILURE_KINDS"]

#: default pixel limit of a decoded image (PIL's own default: about 89.5 M pixels)
MAX_PIXELS = 89_478_485
#: the ``status`` values a failed decode gets
FAILURE_KINDS = ("empty", "not_an_image", "truncated", "unsupported_mode", "decompression_bomb", "unreadable",
                 "timeout")


class DecodeError(Exception):
    """An image file that cannot be used; ``kind`` is one of :data:`FAILURE_KINDS`."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@attrs.frozen
class Decoded:
    """An RGB ``uint8`` array ``[H, W, 3]`` and the size of the file's image before any draft scaling."""

    array: np.ndarray = attrs.field(repr=False)
    width: int
    height: int


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Raise ``DecodeError("timeout")`` when the block runs longer than ``seconds`` (POSIX, main thread)."""
    usable = seconds and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable or seconds is None:
        yield
        return

    def expire(signum, frame):
        raise DecodeError("timeout", f"decoding took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _to_rgb(img) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "I" and arr.max(initial=0) <= 255:
            scaled = arr
        else:
            scaled = arr / 257.0
        gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        peak = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        gray = np.clip(np.rint(arr / peak * 255), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode in ("RGB",):
        return np.asarray(img)
    if mode == "P" and "transparency" in img.info or mode in ("PA", "LA", "La"):
        img = img.convert("RGBA")
    try:
        return np.asarray(img.convert("RGB"))
    except (ValueError, OSError) as exc:
        raise DecodeError("unsupported_mode", f"image mode {mode!r} cannot be converted to RGB ({exc})") from exc


def _open(data: bytes | str, max_pixels: int):
    from PIL import Image

    if isinstance(data, bytes) and not data:
        raise DecodeError("empty", "the file is empty (0 bytes)")
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our own max_pixels check below decides
    try:
        return _open_checked(Image, source, max_pixels)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _open_checked(Image, source, max_pixels: int):
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(source)
        except Image.DecompressionBombWarning as exc:
            raise DecodeError("decompression_bomb", f"{exc}") from exc
        except Image.DecompressionBombError as exc:
            raise DecodeError("decompression_bomb", f"{exc}") from exc
        except FileNotFoundError as exc:
            raise DecodeError("unreadable", f"file not found: {exc.filename}") from exc
        except IsADirectoryError as exc:
            raise DecodeError("unreadable", f"is a directory: {exc.filename}") from exc
        except PermissionError as exc:
            raise DecodeError("unreadable", f"permission denied: {exc.filename}") from exc
        except DecodeError:
            raise  # the timeout, raised from inside PIL
        except Exception as exc:  # PIL.UnidentifiedImageError and friends
            if isinstance(source, str):
                import os

                if os.path.isfile(source) and os.path.getsize(source) == 0:
                    raise DecodeError("empty", "the file is empty (0 bytes)") from exc
            raise DecodeError("not_an_image", f"not an image PIL can read ({type(exc).__name__}: {exc})") from exc
    if img.width * img.height > max_pixels:
        img.close()
        raise DecodeError("decompression_bomb", f"{img.width}x{img.height} = {img.width * img.height} pixels exceeds "
                                                f"the limit of {max_pixels} (max_pixels)")
    return img


def decode_image(data: bytes | str, *, max_pixels: int = MAX_PIXELS, target: Callable[[int, int], tuple[int, int]]
                 | None = None, timeout: float | None = None) -> Decoded:
    """Decode ``data`` (file bytes or a path) into RGB ``uint8``; raise :class:`DecodeError` on failure.

    ``target(width, height) -> (w, h)``: the size the caller will resize to; JPEGs at least twice
    as large are decoded at a reduced scale that still covers it.
    """
    from PIL import Image, ImageOps

    with _time_limit(timeout):
        img = _open(data, max_pixels)
        try:
            width, height = img.size
            if getattr(img, "is_animated", False):
                img.seek(0)
            if target is not None and img.format == "JPEG":
                tw, th = target(width, height)
                if width >= 2 * tw and height >= 2 * th:
                    img.draft("RGB", (tw, th))
            try:
                img.load()
                oriented = ImageOps.exif_transpose(img)
            except DecodeError:
                raise
            except Image.DecompressionBombError as exc:
                raise DecodeError("decompression_bomb", str(exc)) from exc
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                raise DecodeError("truncated", f"the image data is truncated or corrupt ({type(exc).__name__}: "
                                               f"{exc})") from exc
            if oriented.size != img.size:
                width, height = height, width
            return Decoded(_to_rgb(oriented), width, height)
        finally:
            img.close()
