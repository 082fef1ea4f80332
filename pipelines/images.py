"""Untrusted input images: decode safely, normalise, and fit them to a requested size.

Every image a user sends (init image, mask, control sketch) comes through :func:`load_image`: the
header is checked before any pixel is decoded (Pillow's decompression-bomb limit stays on), EXIF
orientation is applied, an animation keeps its first frame, and any mode (palette, greyscale, 16-bit,
CMYK, alpha) becomes 8-bit RGB — each change a user should know about is returned as a note.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from storage.errors import InvalidRequestError

__all__ = ["FORMATS", "MAX_PIXELS", "MIN_SIDE", "LoadedImage", "ResizeMode", "load_image", "resize_to"]

log = logging.getLogger(__name__)

MAX_PIXELS = 4096 * 4096  # what we accept; Pillow's own bomb limit guards decoding beyond it
MIN_SIDE = 8
#: The formats we decode (what Discord's image attachments are). Pillow would also open EPS (through
#: Ghostscript), TIFF, PSD and a dozen others from a file merely *named* .png: untrusted bytes never
#: reach those decoders.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_EXIF_ORIENTATION = 0x0112
#: What Pillow's decoders raise on corrupt or cut data (a GIF cut inside a frame header: IndexError).
_DAMAGED = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error)


class ResizeMode(StrEnum):
    """How an image meets a requested size (the webui's "resize mode")."""

    crop = "crop"  # scale to cover the size, cut the overflow from the middle (webui: crop and resize)
    fit = "fit"  # stretch to the size, ignoring the aspect ratio (webui: just resize)
    fill = "fill"  # scale to fit inside, extend the edges into the rest (webui: resize and fill)


@dataclass(frozen=True)
class LoadedImage:
    """A decoded 8-bit image (``RGB``, or ``RGBA`` when alpha was asked for) and what was changed."""

    image: Image.Image
    notes: list[str] = field(default_factory=list)
    had_alpha: bool = False


def _subject(role: str | None, default: str) -> str:
    """Who the sentence is about: "The mask" when the caller names the role, else "That file/image"."""
    return f"The {role}" if role else default


def _open(data: bytes, role: str | None) -> Image.Image:
    if not data:
        raise InvalidRequestError(
            f"{_subject(role, 'That file')} is empty; attach a PNG, JPEG or WebP image."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequestError(
            f"{_subject(role, 'That image')} is far too large to decode; send one under 16 megapixels."
        ) from exc
    except (UnidentifiedImageError, *_DAMAGED) as exc:
        raise InvalidRequestError(
            f"{_subject(role, 'That file')} is not an image I can read; attach a PNG, JPEG or WebP."
        ) from exc


def _check_size(width: int, height: int, role: str | None) -> None:
    subject = _subject(role, "That image")
    if width * height > MAX_PIXELS:
        raise InvalidRequestError(
            f"{subject} is {width}×{height}; send one of at most {MAX_PIXELS // 1_000_000} megapixels."
        )
    if min(width, height) < MIN_SIDE:
        raise InvalidRequestError(
            f"{subject} is only {width}×{height}; send one at least {MIN_SIDE} pixels on each side."
        )


def _to_8bit(image: Image.Image, notes: list[str]) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        notes.append("It had more than 8 bits per channel; it was reduced to 8.")
        return Image.fromarray(np.clip(array / top * 255.0, 0, 255).round().astype(np.uint8), "L")
    return image


def load_image(data: bytes, *, keep_alpha: bool = False, role: str | None = None) -> LoadedImage:
    """Decode ``data`` into an 8-bit RGB (or RGBA with ``keep_alpha``) image.

    Only :data:`FORMATS` are decoded, whatever the file is called. ``role`` ("mask", "control image")
    names the file in the sentences (default: "That image"), for requests that carry several.

    Raises:
        InvalidRequestError: not an image, truncated, a decompression bomb, too small or too large.
    """
    image = _open(data, role)
    _check_size(*image.size, role)
    notes: list[str] = []
    try:
        if getattr(image, "is_animated", False):  # not n_frames: that walks every frame of a GIF
            image.seek(0)
            notes.append("It is animated; only its first frame was used.")
        image.load()
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        image = ImageOps.exif_transpose(image)
    except _DAMAGED as exc:  # truncated or corrupt frames, pixel data or EXIF
        raise InvalidRequestError(
            f"{_subject(role, 'That image')} is damaged or cut short; send the whole file again."
        ) from exc
    if orientation != 1:
        notes.append("Its EXIF orientation was applied.")
    image = _to_8bit(image, notes)
    had_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    target = "RGBA" if keep_alpha and had_alpha else "RGB"
    if had_alpha and not keep_alpha:
        flattened = Image.new("RGBA", image.size, (255, 255, 255, 255))
        flattened.alpha_composite(image.convert("RGBA"))
        image = flattened
        notes.append("Its transparency was flattened onto white.")
    if image.mode == "CMYK":
        notes.append("It was in CMYK; it was converted to RGB.")
    return LoadedImage(image.convert(target), notes, had_alpha)


def _fill_edges(canvas: Image.Image, inner: Image.Image, left: int, top: int) -> Image.Image:
    """Paste ``inner`` and extend its outermost rows/columns into the rest of ``canvas``."""
    array = np.asarray(inner)
    pad_top, pad_left = top, left
    pad_bottom = canvas.height - top - inner.height
    pad_right = canvas.width - left - inner.width
    pad = [(pad_top, pad_bottom), (pad_left, pad_right)] + [(0, 0)] * (array.ndim - 2)
    return Image.fromarray(np.pad(array, pad, mode="edge"), inner.mode)


def resize_to(image: Image.Image, width: int, height: int, mode: ResizeMode = ResizeMode.crop) -> Image.Image:
    """``image`` at exactly ``width``×``height`` by ``mode`` (Lanczos resampling)."""
    if image.size == (width, height):
        return image.copy()
    if mode == ResizeMode.fit:
        return image.resize((width, height), Image.Resampling.LANCZOS)
    cover = mode == ResizeMode.crop
    ratio = (max if cover else min)(width / image.width, height / image.height)
    scaled_w = max(1, round(image.width * ratio))
    scaled_h = max(1, round(image.height * ratio))
    scaled = image.resize((scaled_w, scaled_h), Image.Resampling.LANCZOS)
    left, top = (scaled_w - width) // 2, (scaled_h - height) // 2
    if cover:
        return scaled.crop((left, top, left + width, top + height))
    canvas = Image.new(image.mode, (width, height))
    return _fill_edges(canvas, scaled, -left, -top)
