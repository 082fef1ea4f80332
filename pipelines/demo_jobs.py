"""The demo's jobs: every mode on the shapes model (images that follow the prompt) and the tiny models.

Input images are drawn with the shapes scene generator, so the gallery shows each mode's inputs beside
its output: a scene and its mask for inpainting, a scribble for ControlNet, a 64×64 image to upscale.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw

from models.shapes.scenes import Scene, make_shape, render, scribble, shape_mask
from pipelines.inputs import JobInputs
from pipelines.jobs import ControlUnit, JobKind, JobSpec

__all__ = ["DEMO_JOBS", "DemoJob"]


@dataclass(frozen=True)
class DemoJob:
    """A titled job; ``inputs`` draws its input files and the labelled images to show beside the output."""

    title: str
    spec: JobSpec
    inputs: Callable[[], tuple[JobInputs, list[tuple[str, bytes]]]] = field(default=lambda: (JobInputs(), []))


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


_CIRCLE = make_shape("circle", "red", "centre", "large")
_CIRCLE_SCENE = Scene((_CIRCLE,), ("blue",))
_TWO = Scene(
    (make_shape("star", "yellow", "left", "small"), make_shape("square", "white", "right", "large")),
    ("green",),
)


def _img2img() -> tuple[JobInputs, list[tuple[str, bytes]]]:
    init = _png(render(_CIRCLE_SCENE))
    return JobInputs(init=init), [("init", init)]


def _inpaint() -> tuple[JobInputs, list[tuple[str, bytes]]]:
    init = _png(render(_CIRCLE_SCENE))
    mask = _png(shape_mask(_CIRCLE, dilation=3).astype(np.uint8) * 255)
    return JobInputs(init=init, mask=mask), [("init", init), ("mask", mask)]


def _erase() -> tuple[JobInputs, list[tuple[str, bytes]]]:
    init = _png(render(_TWO))
    mask = _png(shape_mask(_TWO.shapes[1], dilation=2).astype(np.uint8) * 255)
    return JobInputs(init=init, mask=mask), [("init", init), ("mask", mask)]


def _hand_drawing() -> bytes:
    """A star drawn as a user would: dark strokes on white paper."""
    star = Scene((make_shape("star", "purple", "centre", "large"),), ("white",))
    strokes = scribble(star, np.random.default_rng(3))
    return _png((255 - strokes).astype(np.uint8))


def _controlnet() -> tuple[JobInputs, list[tuple[str, bytes]]]:
    drawing = _hand_drawing()
    return JobInputs(controls=(drawing,)), [("hand drawing", drawing)]


def _canny_source() -> bytes:
    image = Image.new("RGB", (64, 64), (200, 200, 200))
    ImageDraw.Draw(image).rectangle((14, 14, 50, 50), fill=(40, 40, 40))
    return _png(np.asarray(image))


def _two_controls() -> tuple[JobInputs, list[tuple[str, bytes]]]:
    drawing, photo = _hand_drawing(), _canny_source()
    return JobInputs(controls=(drawing, photo)), [("scribble", drawing), ("canny source", photo)]


def _upscale() -> tuple[JobInputs, list[tuple[str, bytes]]]:
    small = cv2.resize(render(_TWO), (32, 32), interpolation=cv2.INTER_AREA)
    init = _png(small)
    return JobInputs(init=init), [("32×32 input", init)]


_SHAPES: dict[str, Any] = {"model": "shapes", "cfg": 3.0, "sampler": "DPM++ 2M", "steps": 20}
_TINY: dict[str, Any] = {"width": 64, "height": 64, "steps": 8, "seed": 3}

DEMO_MODE_JOBS: tuple[DemoJob, ...] = (
    DemoJob(
        "img2img · shapes · a red circle repainted “a yellow circle on a blue background”, strength 0.6",
        JobSpec(
            prompt="a yellow circle on a blue background",
            kind=JobKind.img2img,
            strength=0.6,
            seed=4,
            **_SHAPES,
        ),
        _img2img,
    ),
    DemoJob(
        "inpaint · shapes (its 9-channel inpainting model) · the masked circle as “a green square”",
        JobSpec(prompt="a green square", kind=JobKind.inpaint, strength=1.0, seed=5, **_SHAPES),
        _inpaint,
    ),
    DemoJob(
        "erase · OpenCV Telea, no prompt · the white square is removed",
        JobSpec(prompt="", kind=JobKind.erase, model="shapes", seed=1),
        _erase,
    ),
    DemoJob(
        "ControlNet · shapes + shapes-scribble · a hand-drawn star, “a purple star”",
        JobSpec(
            prompt="a purple star on a black background",
            kind=JobKind.controlnet,
            controls=(ControlUnit("scribble"),),
            seed=6,
            **_SHAPES,
        ),
        _controlnet,
    ),
    DemoJob(
        "upscale · Lanczos ×4 of a 32×32 image (x4 latent and GAN upscalers: see the tiny models below)",
        JobSpec(prompt="", kind=JobKind.upscale, upscaler="Lanczos", scale=4, seed=1),
        _upscale,
    ),
    DemoJob(
        "hires fix · shapes · 64×64, ×1.5 latent, second pass at 0.3 (trained at 64 only: shapes may split)",
        JobSpec(
            prompt="a green square at the bottom right on a white background",
            hires_scale=1.5,
            hires_denoise=0.3,
            seed=8,
            **_SHAPES,
        ),
    ),
    DemoJob(
        "img2img · tiny SDXL (random weights: plumbing)",
        JobSpec(prompt="a red circle", kind=JobKind.img2img, model="tiny-sdxl", strength=0.7, **_TINY),
        _img2img,
    ),
    DemoJob(
        "inpaint · tiny SD 1.5 with its 9-channel variant (random weights: plumbing)",
        JobSpec(prompt="a green square", kind=JobKind.inpaint, model="tiny-sd15", **_TINY),
        _inpaint,
    ),
    DemoJob(
        "ControlNet ×2 (scribble + canny) · tiny SD 1.5 (random weights: plumbing)",
        JobSpec(
            prompt="a star",
            kind=JobKind.controlnet,
            model="tiny-sd15",
            controls=(
                ControlUnit("scribble", model="tiny-controlnet"),
                ControlUnit("canny", model="tiny-controlnet"),
            ),
            **_TINY,
        ),
        _two_controls,
    ),
    DemoJob(
        "upscale · tiny x4 latent upscaler, 32×32 → 128×128 (random weights: plumbing)",
        JobSpec(prompt="a star", kind=JobKind.upscale, upscaler="tiny-x4", scale=4, steps=5, seed=2),
        _upscale,
    ),
    DemoJob(
        "upscale · tiny ESRGAN through spandrel, ×2 (random weights: plumbing)",
        JobSpec(prompt="", kind=JobKind.upscale, upscaler="tiny-esrgan", scale=2, seed=2),
        _upscale,
    ),
)

_SHAPES_PROMPTS = (
    "a large red circle at the top left on a blue background",
    "a green square at the bottom right on a white background",
    "black background, large yellow star in the centre",
    "a purple ring on an orange background",
    "a white cross at the top on a green background",
    "a small blue triangle on a yellow background",
)

DEMO_JOBS: tuple[DemoJob, ...] = (
    *(
        DemoJob(
            f"txt2img · built-in shapes model · “{prompt}”",
            JobSpec(prompt=prompt, model="shapes", seed=10 + i, cfg=3.0, sampler="DPM++ 2M"),
        )
        for i, prompt in enumerate(_SHAPES_PROMPTS)
    ),
    *DEMO_MODE_JOBS,
    DemoJob(
        "txt2img · tiny SD 1.5 (random weights: proves the plumbing, shows noise)",
        JobSpec(
            prompt="a red circle on a blue background", model="tiny-sd15", width=128, height=128, seed=1234
        ),
    ),
    DemoJob(
        "txt2img · tiny SD 1.5, batch of 2, Euler a",
        JobSpec(
            prompt="a green square",
            negative_prompt="blurry",
            model="tiny-sd15",
            width=64,
            height=64,
            sampler="Euler a",
            seed=7,
            batch=2,
        ),
    ),
    DemoJob(
        "txt2img · tiny SDXL",
        JobSpec(prompt="a yellow star, night sky", model="tiny-sdxl", width=128, height=128, seed=42),
    ),
)
