"""Bad input images for every mode, through the engine: one sentence each, nothing stored, engine serving."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from pipelines.engine import Engine
from pipelines.inputs import JobInputs
from pipelines.jobs import ControlUnit, JobKind, JobSpec
from storage.errors import InvalidRequestError
from storage.tables import Job
from tests.pipelines.test_images import _encode, _png_claiming

SCENE = _encode(Image.new("RGB", (64, 64), (20, 120, 220)))
WHITE_MASK = _encode(Image.new("L", (64, 64), 255))


def _spec(kind: JobKind, **changes: object) -> JobSpec:
    return JobSpec(prompt="a red circle", kind=kind, model="tiny-sd15", steps=2, seed=1, **changes)  # type: ignore[arg-type]


BAD_IMAGES = [
    (b"%PDF-1.4 not an image", "not an image"),
    (SCENE[:100], "damaged or cut short"),
    (_png_claiming(20000, 20000), "far too large"),
    (_encode(Image.new("RGB", (1, 1))), "only 1×1"),
    (_png_claiming(5000, 5000), "5000×5000"),
]


@pytest.mark.parametrize(("data", "fragment"), BAD_IMAGES)
@pytest.mark.parametrize("role", ["img2img init", "inpaint mask", "control image", "upscale init"])
async def test_bad_images_in_every_role(engine: Engine, role: str, data: bytes, fragment: str) -> None:
    spec, inputs = {
        "img2img init": (_spec(JobKind.img2img), JobInputs(init=data)),
        "inpaint mask": (_spec(JobKind.inpaint), JobInputs(init=SCENE, mask=data)),
        "control image": (
            _spec(JobKind.controlnet, controls=(ControlUnit("canny", model="tiny-controlnet"),)),
            JobInputs(controls=(data,)),
        ),
        "upscale init": (JobSpec(prompt="", kind=JobKind.upscale, upscaler="Lanczos"), JobInputs(init=data)),
    }[role]
    with pytest.raises(InvalidRequestError) as info:
        await engine.generate(spec, inputs=inputs)
    message = str(info.value)
    assert fragment in message and message.endswith(".") and "\n" not in message
    async with engine.db.sessions() as session:
        assert await session.scalar(select(func.count()).select_from(Job)) == 0
    assert not list(engine.files.iter_hashes())


async def test_an_unknown_control_type_is_refused(engine: Engine) -> None:
    spec = _spec(JobKind.controlnet, controls=(ControlUnit("sketchy"),))
    with pytest.raises(InvalidRequestError, match="no control type called 'sketchy'; use one of scribble"):
        await engine.generate(spec, inputs=JobInputs(controls=(SCENE,)))
    assert not list(engine.files.iter_hashes())


async def test_an_animated_gif_uses_its_first_frame_and_says_so(engine: Engine) -> None:
    frames = [Image.new("RGB", (64, 64), c) for c in ((250, 250, 250), (0, 0, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    result = await engine.generate(
        JobSpec(prompt="", kind=JobKind.upscale, upscaler="Lanczos", scale=2),
        inputs=JobInputs(init=buffer.getvalue()),
    )
    assert any("animated" in note and "first frame" in note for note in result.notes)
    with Image.open(result.images[0].path) as image:
        assert image.size == (128, 128) and np.asarray(image.convert("L")).min() > 200


async def test_the_engine_keeps_serving_after_bad_input(engine: Engine) -> None:
    with pytest.raises(InvalidRequestError):
        await engine.generate(_spec(JobKind.img2img), inputs=JobInputs(init=b"junk"))
    result = await engine.generate(_spec(JobKind.img2img, strength=0.5), inputs=JobInputs(init=SCENE))
    assert result.images and result.spec.init_image is not None
    assert engine.files.exists(result.spec.init_image)  # the input is stored once the job is accepted


@pytest.mark.parametrize("kind", [JobKind.img2img, JobKind.inpaint, JobKind.controlnet])
async def test_every_mode_takes_the_prompt_language_and_clip_skip(engine: Engine, kind: JobKind) -> None:
    """Weighted, edited prompts and clip skip 2 reach every diffusion mode (diffusers' clip skip breaks)."""
    changes: dict[str, object] = {"clip_skip": 2, "strength": 0.5}
    inputs = JobInputs(init=SCENE)
    if kind == JobKind.inpaint:
        inputs = JobInputs(init=SCENE, mask=WHITE_MASK)
    if kind == JobKind.controlnet:
        changes["controls"] = (ControlUnit("canny", model="tiny-controlnet"),)
        inputs = JobInputs(controls=(SCENE,))
    spec = JobSpec(
        prompt="a (red:1.4) [circle:square:1]", kind=kind, model="tiny-sd15", steps=4, seed=1, **changes
    )  # type: ignore[arg-type]
    result = await engine.generate(spec, inputs=inputs)
    assert len(result.images) == 1 and "Clip skip: 2" in result.images[0].parameters
