"""Opening images: one conversion to 8-bit RGB for every image the trainer sees, and cheap checks.

:func:`to_rgb` is the only place an image changes mode; :func:`open_image` (manifests) and
``VLBatcher.process_images`` (anything a caller hands the batcher) both go through it, so a pair looks
the same to the policy whichever way it arrived. ``Image.convert("RGB")`` alone gets several common
files wrong, silently:

- **EXIF orientation**: phone photos store the sensor's pixels plus a rotation tag; they are turned
  upright (``ImageOps.exif_transpose``), as every viewer shows them.
- **16-bit** greyscale (PNG ``I;16``, ``I``): ``convert`` clips every value above 255, so a normal
  16-bit image comes out almost all white; values are scaled to 8 bits instead (``round(v · 255 / 65535)``).
- **Transparency** (``RGBA``, ``LA``, ``PA``, a palette or a colour key with ``transparency``):
  ``convert`` drops the alpha and shows whatever colour the transparent pixels hold; they are
  composited over white instead (``round(α·c + (1 − α)·255)``).
- Palette, bilevel, greyscale, CMYK, YCbCr, …: Pillow's own conversion.

:func:`image_problem` checks a file before training: the header (format, size) by default, the whole
decode on request. Limits: Qwen2-VL's image processor refuses an aspect ratio over 200, and an image
over :data:`MAX_PIXELS` pixels is reported as a decompression bomb, never decoded.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

MAX_ASPECT = 200
"""Longest side / shortest side allowed: Qwen2-VL's ``smart_resize`` raises above it."""

MAX_PIXELS = 89_478_485
"""Width × height above which a file is treated as a decompression bomb (Pillow's default limit)."""

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "PA", "RGBa")


class ImageProblem(OSError):
    """An image that cannot be used: unreadable, truncated, too large, or with an impossible shape.

    An ``OSError``, like Pillow's own decode errors, so callers catch both with one clause."""


def size_problem(width: int, height: int, *, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why an image of this size cannot be used (None: it can)."""
    if width < 1 or height < 1:
        return f"empty image ({width}x{height})"
    if width * height > max_pixels:
        return (f"{width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
                f"(a decompression bomb?)")
    aspect = max(width, height) / min(width, height)
    if aspect > MAX_ASPECT:
        return f"aspect ratio {aspect:.0f} ({width}x{height}) is over {MAX_ASPECT}: the image processor refuses it"
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB, upright, transparency over white (see the module docstring)."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"images must be PIL images, got {type(img).__name__}")
    if img.getexif().get(0x0112, 1) != 1:  # orientation tag: 1 is already upright
        img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT:
        # "I" is 32-bit in general; in practice it is what 16-bit PNGs opened as before Pillow 10.
        values = np.asarray(img, dtype=np.int64)
        scaled = np.clip((values * 255 + 32767) // 65535, 0, 255).astype(np.uint8)
        img = Image.fromarray(scaled, mode="L") if "transparency" not in img.info else img.convert("RGBA")
        return img.convert("RGB")
    if img.mode in _ALPHA or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.int64)
        alpha = rgba[..., 3:]
        # Exact rounding of α·c + (1 − α)·255 with α = a / 255, in integers.
        over_white = (rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
        return Image.fromarray(over_white.astype(np.uint8), mode="RGB")
    return img.convert("RGB")


def open_image(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open, check and fully decode an image as 8-bit RGB (:func:`to_rgb`).

    Raises ``OSError`` (:class:`ImageProblem` for our checks) when the file is missing, not an image,
    truncated, a decompression bomb or of an impossible shape; the size is checked from the header,
    before anything is decoded.
    """
    with _open(path) as img:
        problem = size_problem(*img.size, max_pixels=max_pixels)
        if problem is not None:
            raise ImageProblem(problem)
        img.load()
        return to_rgb(img)


def image_problem(path: str | os.PathLike, *, decode: bool = False,
                  max_pixels: int = MAX_PIXELS) -> tuple[tuple[int, int] | None, str | None]:
    """``(size, None)`` for a usable image file, ``(size or None, reason)`` otherwise; never raises.

    Reads the header only (format and size: a few KB) unless ``decode``, which decodes the whole image
    (finds truncated files; as slow as loading it).
    """
    size = None
    try:
        with _open(path) as img:
            size = img.size
            problem = size_problem(*size, max_pixels=max_pixels)
            if problem is not None or not decode:
                return size, problem
            img.load()
            to_rgb(img)
    except Exception as err:  # noqa: BLE001 - any failure is the answer, and validate must not crash
        return size, f"{type(err).__name__}: {err}" if not isinstance(err, OSError) else str(err)
    return size, None


@contextlib.contextmanager
def _open(path: str | os.PathLike):
    """``Image.open`` with Pillow's decompression-bomb refusals as :class:`ImageProblem`.

    Pillow only *warns* between its limit and twice it, and raises a non-``OSError`` beyond: both
    become one error here, raised before any pixel is decoded.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageProblem(f"decompression bomb: {err}") from None
        with img:
            yield img
