"""inpaint through the engine: the masked area changes, everything beyond the mask blur stays exactly the
original, on tiny SD 1.5 (its 9-channel variant) and SDXL (the plain model); grey, full and border masks,
"only masked"; bad masks refused; and on the shapes model a masked circle repainted as "a green square"."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation
from sqlalchemy import func, select

from models.shapes.scenes import COLOURS, MASK_DILATION, Scene, make_shape, render, shape_mask
from models.shapes.scorer import score_image
from pipelines import inpaint
from pipelines.engine import Engine, GeneratedImage
from pipelines.inputs import JobInputs
from pipelines.jobs import JobKind, JobSpec
from storage.errors import InvalidRequestError
from storage.tables import Image as ImageRow
from storage.tables import Job
from tests.pipelines.helpers import encode_png as _png

SMALL = {"width": 64, "height": 64, "steps": 4}
SHAPES = {"model": "shapes", "cfg": 3.0, "sampler": "DPM++ 2M", "steps": 20}
BLUR_REACH = 10  # the webui's kernel for mask blur 4 is 21 wide: it reaches 10 px beyond the mask


def _pattern(width: int = 64, height: int = 64) -> np.ndarray:
    """uint8 RGB: red grows to the right, green downwards, blue in waves."""
    yy, xx = np.mgrid[:height, :width]
    rgb = np.stack([xx * 255 / (width - 1), yy * 255 / (height - 1), 128 + 100 * np.sin(xx / 6.0)], axis=2)
    return np.asarray(rgb.round(), dtype=np.uint8)


def _box_mask(box: tuple[int, int, int, int], size: tuple[int, int] = (64, 64)) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), dtype=bool)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = True
    return mask


def _far_from(mask: np.ndarray, reach: int = BLUR_REACH) -> np.ndarray:
    """Pixels out of the (square) blur kernel's reach of every masked pixel."""
    return ~np.asarray(binary_dilation(mask, np.ones((2 * reach + 1, 2 * reach + 1), bool)))


def _pixels(image: GeneratedImage) -> tuple[np.ndarray, str]:
    with Image.open(io.BytesIO(image.path.read_bytes())) as png:
        png.load()
    return np.asarray(png.convert("RGB")), str(png.info["parameters"])


def _inputs(init: np.ndarray, mask: np.ndarray) -> JobInputs:
    return JobInputs(
        init=_png(init), mask=_png((mask * 255).astype(np.uint8) if mask.dtype == bool else mask)
    )


async def _count(engine: Engine, model: type) -> int:
    async with engine.db.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


def _spy_on_the_pipeline(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Image.Image, Image.Image]]:
    """Record the (image, mask) the inpaint pipeline is given; the real pipeline still runs."""
    seen: list[tuple[Image.Image, Image.Image]] = []
    real = inpaint.inpaint_arrays

    def spy(model: object, spec: JobSpec, image: Image.Image, mask: Image.Image, *args: object) -> np.ndarray:
        seen.append((image, mask))
        return real(model, spec, image, mask, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(inpaint, "inpaint_arrays", spy)
    return seen


@pytest.mark.parametrize(("model", "variant"), [("tiny-sd15", "tiny-sd15-inpaint"), ("tiny-sdxl", None)])
async def test_inpaint_through_the_engine(engine: Engine, model: str, variant: str | None) -> None:
    init, mask = _pattern(), _box_mask((16, 20, 40, 44))
    seen: list[tuple[int, int]] = []
    spec = JobSpec(
        prompt="a red circle", kind=JobKind.inpaint, model=model, seed=5, steps=8, width=64, height=64
    )
    result = await engine.generate(spec, on_step=lambda d, t: seen.append((d, t)), inputs=_inputs(init, mask))
    pixels, params = _pixels(result.images[0])
    assert pixels.shape == (64, 64, 3)
    far = _far_from(mask)
    np.testing.assert_array_equal(pixels[far], init[far])  # exactly the original beyond the blur
    assert np.abs(pixels[mask].astype(int) - init[mask]).mean() > 10  # repainted
    assert seen[-1] == (6, 6) and len(seen) == 6  # 8 steps at the default strength 0.75 run 6
    assert "Denoising strength: 0.75" in params and "Mask blur: 4" in params and f"Model: {model}," in params
    assert "Inpaint area" not in params
    entry = engine.registry.require(model)
    assert f"Model hash: {engine.registry.model_hash(entry)[:10]}" in params  # type: ignore[index]
    if variant is None:
        assert "Inpaint model" not in params and engine.cache.loaded_names() == [model]
    else:  # the paired 9-channel model inpaints; the job's own model is not even loaded
        assert f"Inpaint model: {variant}" in params and engine.cache.loaded_names() == [variant]
    assert result.spec.mask_image is not None and engine.files.exists(result.spec.mask_image)
    async with engine.db.sessions() as session:
        job = await session.get(Job, result.job_id)
        assert job is not None and job.status == "done" and job.spec["mask_image"] == result.spec.mask_image


async def test_without_mask_blur_exactly_the_masked_pixels_change(engine: Engine) -> None:
    init, mask = _pattern(), _box_mask((5, 9, 29, 30))
    spec = JobSpec(prompt="x", kind=JobKind.inpaint, model="tiny-sdxl", mask_blur=0, seed=1, **SMALL)
    pixels = _pixels((await engine.generate(spec, inputs=_inputs(init, mask))).images[0])[0]
    np.testing.assert_array_equal(pixels[~mask], init[~mask])
    changed = np.abs(pixels.astype(int) - init).max(axis=2) > 2
    assert changed[mask].mean() > 0.9


async def test_a_grey_mask_repaints_where_it_is_at_least_half_white(engine: Engine) -> None:
    init = _pattern()
    ramp = np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (64, 1))  # soft, left to right
    binary = np.where(ramp >= 128, 255, 0).astype(np.uint8)
    spec = JobSpec(prompt="x", kind=JobKind.inpaint, model="tiny-sd15", seed=2, **SMALL)
    soft = _pixels((await engine.generate(spec, inputs=_inputs(init, ramp))).images[0])[0]
    hard = _pixels((await engine.generate(spec, inputs=_inputs(init, binary))).images[0])[0]
    np.testing.assert_array_equal(soft, hard)
    far = _far_from(binary > 0)
    assert far[:, :10].all() and (soft[far] == init[far]).all()


async def test_a_mask_covering_everything_repaints_the_whole_image(engine: Engine) -> None:
    init = _pattern()
    spec = JobSpec(prompt="x", kind=JobKind.inpaint, model="tiny-sd15", seed=3, **SMALL)
    pixels = _pixels((await engine.generate(spec, inputs=_inputs(init, np.ones((64, 64), bool)))).images[0])[
        0
    ]
    difference = np.abs(pixels.astype(int) - init).mean(axis=2)
    blocks = difference.reshape(8, 8, 8, 8).mean(axis=(1, 3))
    assert (blocks > 5).all(), blocks.round()


@pytest.mark.parametrize(
    ("box", "size", "corner"),
    [
        ((0, 0, 10, 10), (64, 64), "top left"),
        ((86, 54, 96, 64), (96, 64), "bottom right"),
    ],
)
async def test_only_masked_generates_the_region_at_full_size(
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    box: tuple[int, int, int, int],
    size: tuple[int, int],
    corner: str,
) -> None:
    seen = _spy_on_the_pipeline(monkeypatch)
    init, mask = _pattern(*size), _box_mask(box, size)
    spec = JobSpec(
        prompt="x",
        kind=JobKind.inpaint,
        model="tiny-sdxl",
        only_masked=True,
        masked_padding=4,
        seed=6,
        steps=4,
    )
    result = await engine.generate(
        JobSpec(**{**spec.to_dict(), "width": size[0], "height": size[1]}), inputs=_inputs(init, mask)
    )
    pixels, params = _pixels(result.images[0])
    assert pixels.shape == (size[1], size[0], 3)
    assert "Inpaint area: Only masked" in params and "Masked area padding: 4" in params
    far = _far_from(mask)
    np.testing.assert_array_equal(pixels[far], init[far])
    assert np.abs(pixels[mask].astype(int) - init[mask]).mean() > 10
    # The pipeline saw a zoomed-in corner at the full size: red spans less than the image's range
    # (0..255 across the width) and the masked share of the frame is larger than in the image.
    image, sent_mask = seen[0]
    assert image.size == sent_mask.size == size
    red = np.asarray(image)[..., 0].astype(int)
    span = red.max() - red.min()
    assert 40 < span < 200, span
    if corner == "top left":
        assert red[:, 0].max() < 8  # the box starts at the left border
    else:
        assert red[:, -1].min() > 245  # the box ends at the right border
    assert (np.asarray(sent_mask) > 0).mean() > 2 * mask.mean()


async def test_the_mask_can_come_from_transparency(engine: Engine) -> None:
    rgba = np.dstack([_pattern(), np.full((64, 64), 255, np.uint8)])
    rgba[30:50, 10:30, 3] = 0  # a transparent hole: repaint it
    spec = JobSpec(prompt="x", kind=JobKind.inpaint, model="tiny-sdxl", seed=7, **SMALL)
    result = await engine.generate(spec, inputs=JobInputs(init=_png(Image.fromarray(rgba, "RGBA"))))
    pixels = _pixels(result.images[0])[0]
    hole = rgba[..., 3] == 0
    assert any("transparent" in note for note in result.notes)
    far = _far_from(hole)
    np.testing.assert_array_equal(pixels[far], _pattern()[far])
    assert np.abs(pixels[hole].astype(int) - _pattern()[hole]).mean() > 10


@pytest.mark.parametrize("kind", [JobKind.inpaint, JobKind.erase])
@pytest.mark.parametrize(
    ("mask", "fragment"),
    [
        (None, "needs a mask"),
        (_png(Image.new("L", (64, 64), 0)), "all black"),
        (_png(Image.new("L", (64, 64), 100)), "all black"),  # grey below half: nothing to repaint
        (b"GIF89a not really", "not an image"),
    ],
)
async def test_bad_masks_are_one_sentence_and_store_nothing(
    engine: Engine, kind: JobKind, mask: bytes | None, fragment: str
) -> None:
    spec = JobSpec(prompt="x", kind=kind, model="tiny-sd15", **SMALL)
    with pytest.raises(InvalidRequestError) as caught:
        await engine.generate(spec, inputs=JobInputs(init=_png(_pattern()), mask=mask))
    message = str(caught.value)
    assert fragment in message and message.endswith(".") and "\n" not in message and "/" not in message
    assert await _count(engine, Job) == 0 and await _count(engine, ImageRow) == 0
    assert not list(engine.files.iter_hashes())


# --- on the shapes model --------------------------------------------------------------------------------


def _circle_to_square(position: str = "top left", background: str = "blue") -> tuple[np.ndarray, np.ndarray]:
    """A red circle on ``background`` and the mask to repaint it as a square there: both outlines, grown."""
    old = make_shape("circle", "red", position, "large")
    new = make_shape("square", "green", position, "large")
    mask = shape_mask(old, dilation=MASK_DILATION) | shape_mask(new, dilation=MASK_DILATION)
    return render(Scene((old,), (background,))), mask


async def test_shapes_inpaint_turns_the_circle_towards_a_green_square(engine: Engine) -> None:
    init, mask = _circle_to_square()
    spec = JobSpec(prompt="a green square", kind=JobKind.inpaint, seed=0, batch=2, **SHAPES)  # strength 0.75
    result = await engine.generate(spec, inputs=_inputs(init, mask))
    green = np.array(COLOURS["green"], dtype=float)
    before = np.linalg.norm(init[mask] - green, axis=1).mean()
    after = []
    for image in result.images:
        pixels, params = _pixels(image)
        assert "Inpaint model: shapes-inpaint" in params and "Model: shapes," in params
        far = _far_from(mask)
        np.testing.assert_array_equal(pixels[far], init[far])
        after.append(np.linalg.norm(pixels[mask] - green, axis=1).mean())
    assert np.mean(after) < 0.85 * before, (after, before)


@pytest.mark.slow
async def test_shapes_inpaint_reads_a_green_square_in_the_mask_for_one_seed_in_four(engine: Engine) -> None:
    init, mask = _circle_to_square()
    spec = JobSpec(prompt="a green square", kind=JobKind.inpaint, seed=0, batch=4, **SHAPES)
    result = await engine.generate(spec, inputs=_inputs(init, mask))
    reads = []
    for image in result.images:
        shapes = score_image(_pixels(image)[0]).shapes
        inside = [s for s in shapes if (s.mask & mask).sum() > s.area / 2]
        reads.append((inside[0].colour, inside[0].shape) if inside else None)
    assert reads.count(("green", "square")) >= 1, reads
