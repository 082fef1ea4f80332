"""A job's input images: checked and normalised before anything is stored.

Front ends pass raw bytes (:class:`JobInputs`); :func:`prepare_inputs` decodes each through
:func:`pipelines.images.load_image`, takes a mask from the image's transparency when none was sent,
resizes a mask of another size, refuses an empty mask, fills in a size the user left out, and returns
PNG bytes to store. The runners later read the stored PNGs by sha256, so a job re-runs from its spec alone.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from pipelines.images import load_image
from pipelines.jobs import JobKind, JobSpec, Limits
from storage.errors import InvalidRequestError

__all__ = ["JobInputs", "PreparedInputs", "fit_size", "prepare_inputs"]

_NEEDS_INIT = {JobKind.img2img, JobKind.inpaint, JobKind.erase, JobKind.upscale}
_TAKES_INIT = _NEEDS_INIT | {JobKind.controlnet}
_MASKED = {JobKind.inpaint, JobKind.erase}


@dataclass(frozen=True)
class JobInputs:
    """Raw uploaded files for one job; ``controls`` pairs with ``spec.controls`` in order."""

    init: bytes | None = None
    mask: bytes | None = None
    controls: tuple[bytes, ...] = ()


@dataclass
class PreparedInputs:
    """The spec with its size filled in, PNGs to store by role, and notes for the user."""

    spec: JobSpec
    files: dict[str, bytes] = field(default_factory=dict)  # "init", "mask", "control0", ...
    notes: list[str] = field(default_factory=list)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def fit_size(width: int, height: int, side: int, limits: Limits) -> tuple[int, int]:
    """An image's aspect ratio at about ``side``² pixels, in multiples of 8 within the limits."""
    scale = math.sqrt(side * side / (width * height))
    w, h = width * scale, height * scale
    big = max(w, h) / limits.max_size
    if big > 1:
        w, h = w / big, h / big
    return (
        max(limits.min_size, min(limits.max_size, round(w / 8) * 8)),
        max(limits.min_size, min(limits.max_size, round(h / 8) * 8)),
    )


def _mask_from(mask_bytes: bytes | None, init: Image.Image, notes: list[str], mode: str) -> Image.Image:
    if mask_bytes is None:
        if init.mode != "RGBA":
            raise InvalidRequestError(
                f"The {mode} mode needs a mask (white where to {'erase' if mode == 'erase' else 'repaint'}) "
                "or an image with transparent areas."
            )
        notes.append("The mask was taken from the image's transparent areas.")
        alpha = np.asarray(init.getchannel("A"))
        return Image.fromarray(np.where(alpha < 128, 255, 0).astype(np.uint8), "L")
    loaded = load_image(mask_bytes, keep_alpha=True, role="mask")
    image = loaded.image
    if image.mode == "RGBA" and np.asarray(image.getchannel("A")).min() < 128:
        # A transparent sheet with strokes drawn on it: the strokes are the mask.
        mask = image.getchannel("A")
    else:
        mask = image.convert("L")
    if mask.size != init.size:
        notes.append(
            f"The mask was {mask.width}×{mask.height}; "
            f"it was resized to the image's {init.width}×{init.height}."
        )
        mask = mask.resize(init.size, Image.Resampling.BILINEAR)
    return mask


def _check_mask(mask: Image.Image, mode: str) -> None:
    if int(np.asarray(mask).max()) < 128:
        raise InvalidRequestError(
            f"The mask is all black, so there is nothing to {'erase' if mode == 'erase' else 'repaint'}; "
            "paint the area to change in white."
        )


def _check_presence(spec: JobSpec, inputs: JobInputs) -> None:
    mode = str(spec.kind)
    if spec.kind in _NEEDS_INIT and inputs.init is None and spec.init_image is None:
        raise InvalidRequestError(f"The {mode} mode needs an image; attach one.")
    if spec.kind not in _TAKES_INIT and inputs.init is not None:
        raise InvalidRequestError(f"The {mode} mode takes no input image; choose img2img to start from one.")
    if spec.kind not in _MASKED and inputs.mask is not None:
        raise InvalidRequestError("A mask is used only by the inpaint and erase modes; choose one of them.")
    if inputs.controls and len(inputs.controls) != len(spec.controls):
        raise InvalidRequestError(
            f"There are {len(inputs.controls)} control images for {len(spec.controls)} ControlNet units."
        )
    for index, unit in enumerate(spec.controls):
        if unit.image is None and not inputs.controls:
            raise InvalidRequestError(f"ControlNet unit {index + 1} has no control image; attach one.")


def prepare_inputs(spec: JobSpec, inputs: JobInputs, default_side: int, limits: Limits) -> PreparedInputs:
    """Check and normalise ``inputs`` for ``spec``; nothing is stored here.

    Raises:
        InvalidRequestError: a missing, unreadable or unusable image, with one sentence.
    """
    _check_presence(spec, inputs)
    prepared = PreparedInputs(spec)
    notes = prepared.notes
    first: Image.Image | None = None
    if inputs.init is not None:
        role = "init image" if spec.kind == JobKind.controlnet else None  # None: "That image is ..."
        loaded = load_image(inputs.init, keep_alpha=spec.kind in _MASKED, role=role)
        notes.extend(f"Image: {n}" for n in loaded.notes if "transparency" not in n)
        init = loaded.image
        if spec.kind in _MASKED:
            mask = _mask_from(inputs.mask, init, notes, str(spec.kind))
            _check_mask(mask, str(spec.kind))
            prepared.files["mask"] = _png(mask)
            init = init.convert("RGB")
        prepared.files["init"] = _png(init)
        first = init
    for index, data in enumerate(inputs.controls):
        loaded = load_image(
            data, role=f"control image {index + 1}" if len(inputs.controls) > 1 else "control image"
        )
        notes.extend(f"Control image {index + 1}: {n}" for n in loaded.notes)
        prepared.files[f"control{index}"] = _png(loaded.image)
        first = first or loaded.image
    if first is not None:
        if spec.kind == JobKind.upscale:
            prepared.spec = replace(spec, width=first.width, height=first.height)
        elif not spec.width or not spec.height:
            width, height = fit_size(first.width, first.height, default_side, limits)
            prepared.spec = replace(spec, width=spec.width or width, height=spec.height or height)
    return prepared
