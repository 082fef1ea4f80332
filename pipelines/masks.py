"""Mask helpers shared by inpaint and erase, with the webui's semantics.

A mask is an ``L`` image, white (255) = repaint. The webui's path, which these functions follow:

1. :func:`binarise` — a soft or grey mask repaints where it is at least half white.
2. :func:`overlay_alpha` — the binary mask blurred (Gaussian, sigma = "Mask blur") and doubled: every
   painted pixel takes the generated image fully, the blend fades out *outside* the painted area.
3. "Only masked": :func:`only_masked_box` — the bounding box of everything the blend touches, grown by the
   padding, then to the generation size's aspect ratio (webui ``expand_crop_region``), kept inside the image.
4. :func:`paste_back` — the generated image (scaled back into that box) over the original, through the alpha,
   so pixels outside the blend stay exactly the original's.

:func:`latent_aligned` gives the mask the diffusion pipeline sees: every latent cell any painted pixel
touches, so diffusers' nearest-neighbour downsampling never drops a small or thin painted area.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
from PIL import Image

__all__ = [
    "Box",
    "binarise",
    "blur",
    "blur_kernel_size",
    "composite",
    "dilate",
    "expand_to_ratio",
    "is_empty",
    "latent_aligned",
    "mask_box",
    "only_masked_box",
    "overlay_alpha",
    "paste_back",
]

log = logging.getLogger(__name__)

#: ``(left, top, right, bottom)``, right and bottom exclusive: PIL's crop box.
Box = tuple[int, int, int, int]

THRESHOLD = 128  # the same half-white line pipelines.inputs uses to refuse an all-black mask


def _array(mask: Image.Image) -> np.ndarray:
    return np.asarray(mask.convert("L"))


def binarise(mask: Image.Image, threshold: int = THRESHOLD) -> Image.Image:
    """White where ``mask`` is at least ``threshold``, black elsewhere (an ``L`` image of 0 and 255)."""
    return Image.fromarray(np.where(_array(mask) >= threshold, 255, 0).astype(np.uint8), "L")


def is_empty(mask: Image.Image) -> bool:
    """True when no pixel of ``mask`` is at least half white."""
    return int(_array(mask).max(initial=0)) < THRESHOLD


def blur_kernel_size(radius: int) -> int:
    """The webui's Gaussian kernel width for a mask blur of ``radius`` (sigma): odd, about 5 sigma."""
    return 2 * int(2.5 * radius + 0.5) + 1


def blur(mask: Image.Image, radius: int) -> Image.Image:
    """The webui's mask blur: a Gaussian with sigma ``radius`` (0: unchanged)."""
    if radius <= 0:
        return mask.convert("L").copy()
    size = blur_kernel_size(radius)
    blurred = cv2.GaussianBlur(_array(mask), (size, size), radius, sigmaY=radius)
    return Image.fromarray(np.asarray(blurred, dtype=np.uint8), "L")


def dilate(mask: Image.Image, pixels: int) -> Image.Image:
    """``mask`` grown by ``pixels`` in every direction (a round kernel)."""
    if pixels <= 0:
        return mask.convert("L").copy()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return Image.fromarray(np.asarray(cv2.dilate(_array(mask), kernel), dtype=np.uint8), "L")


def overlay_alpha(mask: Image.Image, blur_radius: int) -> np.ndarray:
    """How much of the generated image each pixel takes (float32 H×W in [0, 1]).

    The binary ``mask`` blurred by ``blur_radius`` and doubled, as the webui's ``mask_for_overlay`` (a
    blurred straight edge is 0.5, so doubled it is 1 on the painted side), fading to 0 within the blur's
    reach outside. Unlike the webui, every painted pixel is 1, also in corners and thin strokes, where
    the blur alone would let the original show through.
    """
    binary = binarise(mask)
    blurred = np.asarray(blur(binary, blur_radius), dtype=np.float32) / 255.0
    painted = np.asarray(binary) > 0
    alpha: np.ndarray = np.where(painted, 1.0, np.clip(blurred * 2.0, 0.0, 1.0)).astype(np.float32)
    return alpha


def latent_aligned(mask: Image.Image, factor: int = 8) -> Image.Image:
    """The mask grown to whole ``factor``×``factor`` cells: a cell is white if any of its pixels is.

    Diffusers samples one pixel per latent cell (nearest-neighbour), which can miss a small painted
    area; with this mask every latent touched by the painting is repainted.
    """
    binary = _array(binarise(mask)) > 0
    height, width = binary.shape
    rows, cols = -(-height // factor), -(-width // factor)
    padded = np.zeros((rows * factor, cols * factor), dtype=bool)
    padded[:height, :width] = binary
    cells = padded.reshape(rows, factor, cols, factor).any(axis=(1, 3))
    full = np.repeat(np.repeat(cells, factor, axis=0), factor, axis=1)[:height, :width]
    return Image.fromarray(np.where(full, 255, 0).astype(np.uint8), "L")


def mask_box(mask: np.ndarray | Image.Image, padding: int = 0) -> Box | None:
    """The box of the mask's non-zero pixels grown by ``padding``, clipped to the image; None if empty."""
    array = _array(mask) if isinstance(mask, Image.Image) else np.asarray(mask)
    rows, cols = np.nonzero(array)
    if rows.size == 0:
        return None
    height, width = array.shape[:2]
    return (
        max(int(cols.min()) - padding, 0),
        max(int(rows.min()) - padding, 0),
        min(int(cols.max()) + 1 + padding, width),
        min(int(rows.max()) + 1 + padding, height),
    )


def _grow_span(low: int, high: int, want: int, limit: int) -> tuple[int, int]:
    """``[low, high)`` grown about its middle to length ``want``, shifted to stay inside ``[0, limit)``."""
    extra = min(want, limit) - (high - low)
    if extra <= 0:
        return low, high
    low -= extra // 2
    high += extra - extra // 2
    if high > limit:
        low, high = low - (high - limit), limit
    if low < 0:
        low, high = 0, high - low
    return low, min(high, limit)


def expand_to_ratio(box: Box, width: int, height: int, image_size: tuple[int, int]) -> Box:
    """``box`` grown along one axis to the aspect ratio ``width``:``height``, inside ``image_size``.

    The webui's ``expand_crop_region``: a 128×32 masked area to be generated at 512×512 becomes 128×128.
    Where the image is too small for the ratio, the box takes the image's whole extent on that axis.
    """
    left, top, right, bottom = box
    box_w, box_h = right - left, bottom - top
    if box_w * height > box_h * width:  # wider than the target: grow the height
        top, bottom = _grow_span(top, bottom, round(box_w * height / width), image_size[1])
    else:
        left, right = _grow_span(left, right, round(box_h * width / height), image_size[0])
    return left, top, right, bottom


def only_masked_box(alpha: np.ndarray, padding: int, width: int, height: int) -> Box | None:
    """What "only masked" inpaints: all that ``alpha`` touches, plus ``padding``, at ``width``:``height``."""
    box = mask_box(alpha > 0, padding)
    if box is None:
        return None
    return expand_to_ratio(box, width, height, (alpha.shape[1], alpha.shape[0]))


def composite(original: Image.Image, generated: Image.Image, alpha: np.ndarray) -> Image.Image:
    """``generated`` where ``alpha`` is 1, ``original`` where it is 0, blended between (same sizes, RGB)."""
    base = np.asarray(original.convert("RGB"), dtype=np.float32)
    top = np.asarray(generated.convert("RGB"), dtype=np.float32)
    weight = alpha.astype(np.float32)[..., None]
    mixed = top * weight + base * (1.0 - weight)
    return Image.fromarray(mixed.round().clip(0, 255).astype(np.uint8), "RGB")


def paste_back(
    original: Image.Image, generated: Image.Image, alpha: np.ndarray, box: Box | None = None
) -> Image.Image:
    """Put ``generated`` back over ``original`` through ``alpha`` (see :func:`overlay_alpha`).

    With ``box`` ("only masked"), ``generated`` shows that region of ``original`` and is scaled back into
    it first. Wherever ``alpha`` is 0 the result is exactly ``original``.
    """
    if box is None:
        full = generated
        if full.size != original.size:
            full = full.resize(original.size, Image.Resampling.LANCZOS)
    else:
        full = original.convert("RGB").copy()
        size = (box[2] - box[0], box[3] - box[1])
        full.paste(generated.convert("RGB").resize(size, Image.Resampling.LANCZOS), box[:2])
    return composite(original, full, alpha)
