"""Control-map preprocessors: how a control image becomes the map a ControlNet reads.

- ``scribble``: a hand drawing. Dark strokes on a light background become white strokes on black; a drawing
  that is mostly dark already is white-on-black and is kept that way. The result is thresholded to pure
  black and white (Otsu's threshold, kept between 32 and 128 so faint pencil survives and noise does not).
- ``canny``: ``cv2.Canny`` edges of the greyscale image with the unit's low/high thresholds.
- ``depth``, ``pose``, ``lineart``, ``none``: an already-made map, used as it is (RGB).

Maps keep the input's size: the ControlNet runner resizes a control image to the output size first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipelines.images import load_image
from pipelines.jobs import CONTROL_TYPES
from storage.errors import InvalidRequestError, NotFoundError, echo

__all__ = ["CONTROL_TYPES", "canny_map", "preprocess", "preprocess_file", "scribble_map"]

log = logging.getLogger(__name__)

#: Bounds of the scribble threshold on the white-on-black drawing (see the module doc).
SCRIBBLE_THRESHOLD_MIN = 32
SCRIBBLE_THRESHOLD_MAX = 128
#: A drawing whose darkest and lightest pixels are closer than this is blank: an all-black map.
_MIN_CONTRAST = 32


def _grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.uint8)


def _rgb(map_: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(map_, dtype=np.uint8), "L").convert("RGB")


def scribble_map(image: Image.Image) -> Image.Image:
    """White strokes on black (RGB, only 0 and 255) from a drawing in either polarity."""
    grey = _grey(image)
    if np.median(grey) >= 128:  # mostly light: dark strokes on paper
        grey = 255 - grey
    if int(grey.max()) - int(grey.min()) < _MIN_CONTRAST:
        return _rgb(np.zeros_like(grey))
    otsu, _ = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    threshold = min(max(int(otsu), SCRIBBLE_THRESHOLD_MIN), SCRIBBLE_THRESHOLD_MAX)
    return _rgb(np.where(grey >= threshold, 255, 0))


def canny_map(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges of the greyscale image: white one-pixel edges on black (RGB)."""
    return _rgb(cv2.Canny(_grey(image), low, high))


def _as_is(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


_SIMPLE: dict[str, Callable[[Image.Image], Image.Image]] = {
    "scribble": scribble_map,
    "depth": _as_is,
    "pose": _as_is,
    "lineart": _as_is,
    "none": _as_is,
}


def _check_thresholds(low: int, high: int) -> None:
    for value in (low, high):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequestError("The canny thresholds must be whole numbers between 1 and 255.")
    if not 1 <= low < high <= 255:
        raise InvalidRequestError(
            f"The canny thresholds must satisfy 1 ≤ low < high ≤ 255, not low {low} and high {high}."
        )


def preprocess(kind: str, image: Image.Image, *, low: int = 100, high: int = 200) -> Image.Image:
    """The control map of type ``kind`` for ``image``, as RGB at the image's size.

    Args:
        kind: One of :data:`~pipelines.jobs.CONTROL_TYPES`.
        image: The control image (any mode).
        low: Canny's lower hysteresis threshold (``canny`` only).
        high: Canny's upper hysteresis threshold (``canny`` only).

    Raises:
        InvalidRequestError: an unknown type or bad canny thresholds, in one sentence.
    """
    if kind == "canny":
        _check_thresholds(low, high)
        return canny_map(image, low, high)
    convert = _SIMPLE.get(kind)
    if convert is None:
        raise InvalidRequestError(
            f"There is no control type called {echo(kind)!r}; use one of {', '.join(CONTROL_TYPES)}."
        )
    return convert(image)


def preprocess_file(kind: str, src: Path, out: Path, low: int = 100, high: int = 200) -> Path:
    """Read ``src`` (any image the bot accepts), write its control map as PNG to ``out``; returns ``out``.

    Raises:
        InvalidRequestError: unreadable image, unknown type or bad thresholds.
        NotFoundError: ``src`` does not exist.
    """
    try:
        data = src.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(
            f"There is no file called {echo(src.name)!r}; check the name and try again."
        ) from None
    except IsADirectoryError:
        raise InvalidRequestError(f"{src.name!r} is a folder, not an image; name an image file.") from None
    image = load_image(data).image
    result = preprocess(kind, image, low=low, high=high)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.save(out, format="PNG")
    log.info("wrote the %s map of %s to %s", kind, src.name, out)
    return out
