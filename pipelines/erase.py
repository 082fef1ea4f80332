"""erase: remove what the mask covers and fill it from its surroundings, no prompt needed. Worker thread only.

The init image and mask are fitted to the job's size (the engine sets it from the image when the user
leaves it out), the mask is grown a few pixels so the object's soft edge goes too, and OpenCV fills it
(``cv2.inpaint``: Telea's fast marching or Navier-Stokes, by ``spec.erase_method``). Only masked pixels
change. With ``spec.erase_denoise`` > 0 the inpaint path then runs over the same mask at that strength
with the job's prompt (which may be empty), to give the flat fill texture.

Without that diffusion pass erase is deterministic and loads no model: a batch of N is N equal images.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
from PIL import Image

from pipelines.image_to_image import fitted
from pipelines.inpaint import fitted_mask, inpaint_images
from pipelines.masks import dilate
from pipelines.modes import RunContext, RunOutput

__all__ = ["METHODS", "erase_dilation", "erase_radius", "fill", "run"]

log = logging.getLogger(__name__)

METHODS = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}


def erase_dilation(width: int, height: int) -> int:
    """Pixels the mask grows by: 2 at 64 px, about 1% of the longer side above that."""
    return max(2, round(max(width, height) / 100))


def erase_radius(width: int, height: int) -> int:
    """The radius ``cv2.inpaint`` draws each filled pixel from: 3 px, or the longer side / 64 when larger."""
    return max(3, round(max(width, height) / 64))


def fill(image: Image.Image, mask: Image.Image, method: str = "telea") -> Image.Image:
    """``image`` with the white pixels of ``mask`` filled from their surroundings (all others unchanged)."""
    pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    holes = np.where(np.asarray(mask.convert("L")) >= 128, 255, 0).astype(np.uint8)
    radius = erase_radius(image.width, image.height)
    filled = cv2.inpaint(pixels, holes, radius, METHODS[method])
    return Image.fromarray(np.asarray(filled, dtype=np.uint8), "RGB")


def run(ctx: RunContext) -> RunOutput:
    """The erase runner."""
    spec = ctx.spec
    image = fitted(ctx.init_image(), spec)
    mask = dilate(fitted_mask(ctx), erase_dilation(spec.width, spec.height))
    filled = fill(image, mask, spec.erase_method)
    if spec.erase_denoise <= 0:
        return RunOutput([filled.copy() for _ in range(spec.batch)])
    result = inpaint_images(ctx, filled, mask, spec.erase_denoise)
    parameters: dict[str, object] = {"Mask blur": spec.mask_blur}
    if spec.only_masked:
        parameters.update({"Inpaint area": "Only masked", "Masked area padding": spec.masked_padding})
    return RunOutput(result.images, parameters | result.parameters)
