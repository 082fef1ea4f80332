"""Small helpers for the pipeline tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """``image`` (PIL or a uint8 array) as PNG bytes, as a user would upload it."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
