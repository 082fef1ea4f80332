"""img2img through the engine: tiny SD 1.5 / SDXL plumbing, batches, steps, resize modes, and on the shapes
model, measured by its scorer: a low strength keeps the scene, a high one follows the prompt."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from models.shapes.scenes import Scene, caption, make_shape, render
from models.shapes.scorer import score_image
from pipelines import image_to_image
from pipelines.engine import Engine, GeneratedImage
from pipelines.image_to_image import img2img_arrays
from pipelines.images import ResizeMode, resize_to
from pipelines.inputs import JobInputs
from pipelines.jobs import JobKind, JobSpec
from storage.errors import InvalidRequestError
from storage.tables import Image as ImageRow
from storage.tables import Job
from tests.pipelines.helpers import encode_png as _png

SMALL = {"width": 64, "height": 64, "steps": 4}
SHAPES = {"model": "shapes", "cfg": 3.0, "sampler": "DPM++ 2M", "steps": 20}


def _pattern(width: int = 64, height: int = 64) -> Image.Image:
    """A smooth colour pattern, different in every corner."""
    yy, xx = np.mgrid[:height, :width]
    rgb = np.stack([xx * 255 / (width - 1), yy * 255 / (height - 1), 128 + 100 * np.sin(xx / 6.0)], axis=2)
    return Image.fromarray(rgb.round().astype(np.uint8), "RGB")


def _pixels(image: GeneratedImage) -> tuple[np.ndarray, str]:
    with Image.open(io.BytesIO(image.path.read_bytes())) as png:
        png.load()
    return np.asarray(png.convert("RGB")), str(png.info["parameters"])


async def _count(engine: Engine, model: type) -> int:
    async with engine.db.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
async def test_img2img_through_the_engine(engine: Engine, model: str) -> None:
    seen: list[tuple[int, int]] = []
    spec = JobSpec(prompt="a red circle", kind=JobKind.img2img, model=model, strength=0.5, seed=9, **SMALL)
    result = await engine.generate(
        spec, on_step=lambda d, t: seen.append((d, t)), inputs=JobInputs(init=_png(_pattern()))
    )
    assert len(result.images) == 1
    pixels, params = _pixels(result.images[0])
    assert pixels.shape == (64, 64, 3)
    assert "Denoising strength: 0.5" in params and f"Model: {model}" in params and "Seed: 9" in params
    assert "Inpaint model" not in params
    assert seen == [(1, 2), (2, 2)]  # 4 steps at strength 0.5 run int(4 * 0.5) = 2
    assert result.spec.init_image is not None and engine.files.exists(result.spec.init_image)
    with Image.open(io.BytesIO(engine.files.read_bytes(result.spec.init_image))) as stored:
        np.testing.assert_array_equal(np.asarray(stored.convert("RGB")), np.asarray(_pattern()))
    async with engine.db.sessions() as session:
        job = await session.get(Job, result.job_id)
        assert job is not None and job.status == "done" and job.kind == "img2img"
        assert job.spec["strength"] == 0.5 and job.spec["init_image"] == result.spec.init_image


@pytest.mark.parametrize("model_name", ["tiny-sd15", "tiny-sdxl"])
async def test_batch_equals_single_runs(engine: Engine, model_name: str) -> None:
    init = _pattern()
    base = JobSpec(
        prompt="a green square", kind=JobKind.img2img, model=model_name, strength=0.6, seed=40, **SMALL
    )
    inputs = JobInputs(init=_png(init))
    model = engine.cache.get(model_name)
    batch = img2img_arrays(model, engine.prepare(JobSpec(**{**base.to_dict(), "batch": 3}), inputs), init)
    singles = [
        img2img_arrays(model, engine.prepare(JobSpec(**{**base.to_dict(), "seed": s}), inputs), init)
        for s in (40, 41, 42)
    ]
    assert batch.shape == (3, 64, 64, 3)
    for i, single in enumerate(singles):
        # Equal within float32 noise: batched convolutions round differently from single ones, a few
        # pixels by up to ~1.3e-5 on CPU (a wrong seed would be off by 0.1 or more everywhere).
        difference = np.abs(batch[i] - single[0])
        assert np.percentile(difference, 99.9) < 1e-5 and difference.max() < 5e-5, difference.max()
    assert np.abs(singles[0] - singles[1]).max() > 1e-2  # the seeds matter


async def test_an_inpainting_model_does_img2img_as_a_whole_image_inpaint(engine: Engine) -> None:
    spec = JobSpec(prompt="x", kind=JobKind.img2img, model="tiny-sd15-inpaint", strength=0.8, seed=2, **SMALL)
    result = await engine.generate(spec, inputs=JobInputs(init=_png(_pattern())))
    pixels, params = _pixels(result.images[0])
    assert pixels.shape == (64, 64, 3) and "Model: tiny-sd15-inpaint" in params
    assert np.abs(pixels.astype(int) - np.asarray(_pattern()).astype(int)).mean() > 5  # repainted, not pasted


@pytest.mark.parametrize(
    ("change", "inputs", "fragment"),
    [
        ({}, JobInputs(), "needs an image"),
        ({}, JobInputs(init=_png(_pattern()), mask=_png(Image.new("L", (64, 64), 255))), "mask"),
        ({}, JobInputs(init=b"not an image"), "not an image"),
        ({"strength": 0.0}, JobInputs(init=_png(_pattern())), "Denoising strength"),
        ({"resize_mode": "stretch"}, JobInputs(init=_png(_pattern())), "resize mode"),
        ({"strength": 0.3, "steps": 2}, JobInputs(init=_png(_pattern())), "runs no step"),
    ],
)
async def test_bad_input_is_one_sentence_and_stores_nothing(
    engine: Engine, change: dict[str, object], inputs: JobInputs, fragment: str
) -> None:
    spec = JobSpec(**{**JobSpec(prompt="x", kind=JobKind.img2img, **SMALL).to_dict(), **change})
    with pytest.raises(InvalidRequestError) as caught:
        await engine.generate(spec, inputs=inputs)
    message = str(caught.value)
    assert fragment in message and message.endswith(".") and "\n" not in message and "/" not in message
    assert await _count(engine, Job) == 0 and await _count(engine, ImageRow) == 0
    assert not list(engine.files.iter_hashes())


# --- on the shapes model --------------------------------------------------------------------------------

_SCENES = [
    Scene((make_shape("circle", "red", "top left", "large"),), ("blue",)),
    Scene((make_shape("star", "yellow", "bottom right", "large"),), ("purple", "white"), "horizontal"),
]


@pytest.mark.parametrize("scene", _SCENES, ids=["red-circle", "yellow-star-two-tone"])
async def test_low_strength_keeps_the_scene(engine: Engine, scene: Scene) -> None:
    prompt = caption(scene, np.random.default_rng(1), complete=True)
    spec = JobSpec(prompt=prompt, kind=JobKind.img2img, strength=0.3, seed=11, batch=2, **SHAPES)
    result = await engine.generate(spec, inputs=JobInputs(init=_png(render(scene))))
    assert (result.spec.width, result.spec.height) == (64, 64)  # the shapes model's size, from the image
    for image in result.images:
        reading = score_image(_pixels(image)[0])
        assert reading.background_colours == scene.background and reading.split == scene.split, prompt
        assert len(reading.shapes) == 1, prompt
        shape, want = reading.shapes[0], scene.shapes[0]
        assert (shape.colour, shape.shape, shape.position) == (want.colour, want.kind, want.position), prompt


async def test_high_strength_follows_the_prompt_instead(engine: Engine) -> None:
    init = render(_SCENES[0])  # a red circle at the top left on blue
    prompt = "a large yellow square at the bottom right on a white background"
    spec = JobSpec(prompt=prompt, kind=JobKind.img2img, strength=1.0, seed=3, **SHAPES)
    result = await engine.generate(spec, inputs=JobInputs(init=_png(init)))
    reading = score_image(_pixels(result.images[0])[0])
    assert reading.background == "white"
    assert [(s.colour, s.position) for s in reading.shapes[:1]] == [("yellow", "bottom right")]


@pytest.mark.parametrize("mode", list(ResizeMode))
async def test_an_odd_sized_init_is_fitted_by_the_resize_mode(
    engine: Engine, mode: ResizeMode, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Image.Image] = []
    real = image_to_image.img2img_arrays

    def spy(model: object, spec: JobSpec, image: Image.Image, on_step: object = None) -> np.ndarray:
        seen.append(image)
        return real(model, spec, image, on_step)  # type: ignore[arg-type]

    monkeypatch.setattr(image_to_image, "img2img_arrays", spy)
    wide = _pattern(100, 60)  # not a multiple of 8, and another aspect ratio
    spec = JobSpec(
        prompt="x", kind=JobKind.img2img, model="tiny-sd15", seed=4, resize_mode=str(mode), **SMALL
    )
    result = await engine.generate(spec, inputs=JobInputs(init=_png(wide)))
    assert (result.images[0].width, result.images[0].height) == (64, 64)
    np.testing.assert_array_equal(np.asarray(seen[0]), np.asarray(resize_to(wide, 64, 64, mode)))
    others = [m for m in ResizeMode if m != mode]
    assert all(
        np.abs(np.asarray(seen[0], int) - np.asarray(resize_to(wide, 64, 64, m), int)).max() > 20
        for m in others
    )


async def test_without_a_size_the_engine_fits_the_init(engine: Engine) -> None:
    spec = JobSpec(prompt="x", kind=JobKind.img2img, model="shapes", seed=4, steps=4)
    result = await engine.generate(spec, inputs=JobInputs(init=_png(_pattern(100, 60))))
    # 100×60 at the shapes model's 64² pixels is 82.6×49.6: 80 wide in multiples of 8, 64 high (the minimum)
    assert (
        (result.images[0].width, result.images[0].height)
        == (result.spec.width, result.spec.height)
        == (80, 64)
    )
