"""Turn the bytes of one image file (or one array) into checked 8-bit pixels, or say exactly why not.

`decode_image` never raises for bad input: it returns a `Decoded` with the pixels and notes on any
conversion (CMYK, 16-bit, palette/alpha, EXIF rotation, animation), or raises `Rejected` with the reason
(empty, not an image, truncated, decompression bomb, too small, no sound conversion). The pixels are what
training sees: uint8, (H, W) grayscale or (H, W, 3) RGB.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


class Rejected(Exception):
    """The input cannot be used; the message says why in words a user can act on."""


@dataclass
class Decoded:
    pixels: np.ndarray  # uint8, (H, W) or (H, W, 3)
    mode: str  # the original PIL mode, e.g. "CMYK", "I;16", "P"
    width: int  # original size (after EXIF rotation)
    height: int
    notes: list[str] = field(default_factory=list)  # conversions applied


def decode_image(data: bytes, min_size: int, max_pixels: int) -> Decoded:
    """Decode image file bytes into checked uint8 pixels; raises `Rejected` with the reason."""
    if not data:
        raise Rejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's own limit (2x Image.MAX_IMAGE_PIXELS) came first
        raise Rejected(f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise Rejected(f"not an image: no known image format in its first bytes {data[:8]!r}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a property of the file
        raise Rejected(f"truncated or corrupt image header ({type(exc).__name__}: {exc})") from None
    w, h = im.size
    if w * h > max_pixels:
        raise Rejected(f"decompression bomb: claims {w}x{h} = {w * h:,} pixels (limit data.max_pixels={max_pixels:,})")
    notes: list[str] = []
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        notes.append(f"animated ({frames} frames): first frame used")
    try:
        im.seek(0)
        im.load()
    except Exception as exc:  # noqa: BLE001
        raise Rejected(f"truncated or corrupt image data ({type(exc).__name__}: {exc})") from None
    mode = im.mode
    pixels = to_8bit(_apply_orientation(im, notes), notes)
    height, width = pixels.shape[:2]
    if min(width, height) < min_size:
        raise Rejected(f"too small: {width}x{height}, the smallest side must be at least data.min_size={min_size}")
    return Decoded(pixels, mode, width, height, notes)


def _apply_orientation(im: Image.Image, notes: list[str]) -> Image.Image:
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, not fatal
        return im
    if orientation in (None, 1):
        return im
    notes.append(f"EXIF orientation {orientation} applied")
    return ImageOps.exif_transpose(im)


def to_8bit(im: Image.Image, notes: list[str]) -> np.ndarray:
    """Pixels as uint8 grayscale (H, W) or RGB (H, W, 3); transparency is composited over white."""
    mode = im.mode
    if mode in ("L", "RGB"):
        return np.asarray(im, dtype=np.uint8)
    if mode == "1":
        return np.asarray(im.convert("L"), dtype=np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(im, dtype=np.int64)
        if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
            raise Rejected(f"{mode} image with values outside 0..65535: no sound conversion to 8-bit")
        notes.append(f"16-bit ({mode}) scaled to 8-bit")
        return np.round(values / 257.0).astype(np.uint8)
    if mode == "F":
        raise Rejected("32-bit float image: its value range is unknown, so there is no sound conversion to 8-bit")
    if mode == "CMYK":
        notes.append("CMYK converted to RGB")
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    if mode in ("LA", "La"):
        notes.append("grayscale+alpha composited over white")
        return np.asarray(_over_white(im.convert("LA"), "L"), dtype=np.uint8)
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        if has_alpha:
            notes.append("palette with transparency composited over white")
            return np.asarray(_over_white(im.convert("RGBA"), "RGB"), dtype=np.uint8)
        notes.append("palette converted to RGB")
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    if mode in ("RGBA", "RGBa"):
        notes.append("alpha composited over white")
        return np.asarray(_over_white(im.convert("RGBA"), "RGB"), dtype=np.uint8)
    try:
        converted = im.convert("RGB")
    except Exception as exc:  # noqa: BLE001
        raise Rejected(f"image mode {mode} has no conversion to RGB ({exc})") from None
    notes.append(f"{mode} converted to RGB")
    return np.asarray(converted, dtype=np.uint8)


def _over_white(im: Image.Image, out_mode: str) -> Image.Image:
    background = Image.new(im.mode, im.size, (255,) * len(im.mode))
    return Image.alpha_composite(background.convert("RGBA"), im.convert("RGBA")).convert(out_mode)


def array_pixels(arr: np.ndarray, min_size: int) -> Decoded:
    """One image of an arrays source, (H, W), (H, W, C) or (C, H, W) with C in 1/3/4, as checked uint8 pixels."""
    a = np.asarray(arr)
    notes: list[str] = []
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] == 4:
        notes.append("alpha channel dropped")
        a = a[..., :3]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise Rejected(f"array of shape {arr.shape} is not an image (expected H,W or H,W,C with C in 1/3/4)")
    if a.dtype == np.uint8:
        pixels = a
    elif np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1:
        notes.append(f"{a.dtype} in [0, 1] scaled to 8-bit")
        pixels = np.round(a * 255).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer) and a.min() >= 0 and a.max() <= 255:
        pixels = a.astype(np.uint8)
    else:
        raise Rejected(f"{a.dtype} values not in 0..255 (integers) or [0, 1] (floats): no sound conversion")
    h, w = pixels.shape[:2]
    if min(w, h) < min_size:
        raise Rejected(f"too small: {w}x{h}, the smallest side must be at least data.min_size={min_size}")
    mode = "L" if pixels.ndim == 2 else "RGB"
    return Decoded(np.ascontiguousarray(pixels), f"array:{arr.dtype}:{mode}", w, h, notes)
