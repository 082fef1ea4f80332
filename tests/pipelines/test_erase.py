"""erase through the engine: a drawn red disc is filled from its surroundings (Telea and Navier-Stokes) with
no model loaded, only the grown mask changes, odd sizes are fitted, batches are copies; the optional
diffusion pass runs on tiny SD 1.5 / SDXL; on shapes scenes the scorer no longer finds the erased shape."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from scipy.ndimage import binary_dilation

from models.shapes.scenes import Scene, make_shape, render, shape_mask
from models.shapes.scorer import region_mask_for_colour, score_image
from pipelines.engine import Engine, GeneratedImage
from pipelines.erase import erase_dilation, fill
from pipelines.inputs import JobInputs
from pipelines.jobs import JobKind, JobSpec
from tests.pipelines.helpers import encode_png as _png

SMALL = {"width": 64, "height": 64, "steps": 4}
RED = np.array([220, 30, 30])


def _pixels(image: GeneratedImage) -> tuple[np.ndarray, str]:
    with Image.open(io.BytesIO(image.path.read_bytes())) as png:
        png.load()
    return np.asarray(png.convert("RGB")), str(png.info["parameters"])


def _red_disc(width: int = 64, height: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A red disc on a smooth two-tone background (sky blue above, sand below), and the disc's mask."""
    yy, xx = np.mgrid[:height, :width]
    t = 1 / (1 + np.exp(-(yy - height / 2) / 2.0))[..., None]  # a soft horizon
    sky = np.array([90, 150, 230]) + np.stack([xx * 0.3, xx * 0.2, -xx * 0.2], axis=2)
    sand = np.array([230, 210, 150]) - np.stack([yy * 0.3, yy * 0.3, yy * 0.1], axis=2)
    background = np.asarray((sky * (1 - t) + sand * t).round(), dtype=np.uint8)
    disc = Image.new("L", (width, height), 0)
    cx, cy, r = width * 0.45, height * 0.5, min(width, height) * 0.22
    ImageDraw.Draw(disc).ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    mask = np.asarray(disc) > 0
    image = Image.fromarray(background)
    image.paste(tuple(int(c) for c in RED), (0, 0), disc.filter(ImageFilter.GaussianBlur(0.7)))  # soft edge
    return np.asarray(image), mask


def _reddish(pixels: np.ndarray) -> np.ndarray:
    """Pixels that look red (far more red than green or blue)."""
    rgb = pixels.astype(int)
    return (rgb[..., 0] > 150) & (rgb[..., 0] - rgb[..., 1] > 80) & (rgb[..., 0] - rgb[..., 2] > 80)


def _grown(mask: np.ndarray, pixels: int) -> np.ndarray:
    return np.asarray(binary_dilation(mask, np.ones((2 * pixels + 1, 2 * pixels + 1), bool)))


@pytest.mark.parametrize(("method", "name"), [("telea", "Telea"), ("ns", "Navier-Stokes")])
async def test_erase_fills_a_red_disc_from_its_surroundings(engine: Engine, method: str, name: str) -> None:
    init, disc = _red_disc()
    assert _reddish(init).sum() >= disc.sum() * 0.9  # the test image really has a red disc
    spec = JobSpec(prompt="", kind=JobKind.erase, model="tiny-sd15", erase_method=method, seed=1, **SMALL)
    result = await engine.generate(spec, inputs=JobInputs(init=_png(init), mask=_png(disc)))
    pixels, params = _pixels(result.images[0])
    assert pixels.shape == (64, 64, 3)
    assert not _reddish(pixels).any()
    grown = _grown(disc, erase_dilation(64, 64))
    np.testing.assert_array_equal(pixels[~grown], init[~grown])  # nothing else changed
    low, high = init[~grown].min(axis=0).astype(int), init[~grown].max(axis=0).astype(int)
    filled = pixels[disc].astype(int)
    assert ((filled >= low - 10) & (filled <= high + 10)).all()  # colours from the surroundings
    # above the horizon the fill is sky, below it sand
    assert pixels[26, 28, 2] > pixels[26, 28, 0] and pixels[38, 28, 0] > pixels[38, 28, 2]
    assert f"Erase method: {name}" in params and "Denoising strength" not in params
    assert engine.cache.loaded_names() == []  # no diffusion pass: no model loaded


async def test_a_batch_without_the_diffusion_pass_is_identical_copies(engine: Engine) -> None:
    init, disc = _red_disc()
    spec = JobSpec(prompt="", kind=JobKind.erase, model="tiny-sd15", seed=10, batch=3, **SMALL)
    result = await engine.generate(spec, inputs=JobInputs(init=_png(init), mask=_png(disc)))
    assert [i.seed for i in result.images] == [10, 11, 12]
    first = _pixels(result.images[0])[0]
    for image in result.images[1:]:
        np.testing.assert_array_equal(_pixels(image)[0], first)


@pytest.mark.parametrize(
    ("model", "variant", "only_masked"),
    [("tiny-sd15", "tiny-sd15-inpaint", False), ("tiny-sdxl", None, True)],
)
async def test_the_diffusion_pass_repaints_only_the_erased_area(
    engine: Engine, model: str, variant: str | None, only_masked: bool
) -> None:
    init, disc = _red_disc()
    seen: list[tuple[int, int]] = []
    spec = JobSpec(
        prompt="",
        kind=JobKind.erase,
        model=model,
        erase_denoise=0.5,
        seed=20,
        batch=2,
        steps=8,
        only_masked=only_masked,
        width=64,
        height=64,
    )
    result = await engine.generate(
        spec, on_step=lambda d, t: seen.append((d, t)), inputs=JobInputs(init=_png(init), mask=_png(disc))
    )
    (first, params), (second, _) = (_pixels(i) for i in result.images)
    grown = _grown(disc, erase_dilation(64, 64))
    far = ~_grown(grown, 10)  # beyond the mask blur (4: a 21-px kernel) around the grown mask
    for pixels in (first, second):
        np.testing.assert_array_equal(pixels[far], init[far])
    assert np.abs(first[disc].astype(int) - second[disc]).mean() > 2  # the seeds differ
    assert seen[-1] == (4, 4)  # 8 steps at strength 0.5
    assert (
        "Denoising strength: 0.5" in params and "Erase method: Telea" in params and "Mask blur: 4" in params
    )
    assert (f"Inpaint model: {variant}" in params) == (variant is not None)
    assert ("Inpaint area: Only masked" in params) == only_masked


@pytest.mark.parametrize(("size", "expected"), [(None, (72, 64)), ((96, 64), (96, 64))])
async def test_an_odd_sized_image_is_fitted(
    engine: Engine, size: tuple[int, int] | None, expected: tuple[int, int]
) -> None:
    init, disc = _red_disc(90, 70)  # not a multiple of 8
    # the default model, shapes, makes 64² pixels: 90×70 becomes 72.6×56.4, so 72 by 64 (the minimum)
    spec = JobSpec(prompt="", kind=JobKind.erase, seed=1)
    if size is not None:
        spec = JobSpec(**{**spec.to_dict(), "width": size[0], "height": size[1]})
    result = await engine.generate(spec, inputs=JobInputs(init=_png(init), mask=_png(disc)))
    pixels = _pixels(result.images[0])[0]
    assert (pixels.shape[1], pixels.shape[0]) == (result.spec.width, result.spec.height) == expected
    assert not _reddish(pixels).any()


def test_fill_changes_only_the_masked_pixels() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    mask = np.zeros((40, 48), np.uint8)
    mask[10:20, 5:15] = 255
    for method in ("telea", "ns"):
        out = np.asarray(fill(Image.fromarray(image), Image.fromarray(mask), method))
        np.testing.assert_array_equal(out[mask == 0], image[mask == 0])
        assert out.shape == image.shape and not np.array_equal(out[mask > 0], image[mask > 0])


# --- on shapes scenes -----------------------------------------------------------------------------------

_SCENES = [
    Scene(
        (make_shape("circle", "red", "centre", "large"), make_shape("square", "yellow", "top left", "small")),
        ("blue",),
    ),  # fmt: skip
    Scene((make_shape("star", "red", "top left", "large"),), ("blue", "white"), "horizontal"),
    Scene((make_shape("cross", "red", "right", "large"),), ("yellow", "black"), "vertical"),
]


@pytest.mark.parametrize("scene", _SCENES, ids=["two-shapes", "star-two-tone", "cross-split"])
@pytest.mark.parametrize("method", ["telea", "ns"])
async def test_erase_removes_a_shape_by_the_scorer(engine: Engine, scene: Scene, method: str) -> None:
    image = render(scene)
    target = scene.shapes[0]
    before = score_image(image)
    assert "red" in [s.colour for s in before.shapes]  # the scorer sees it first
    mask = shape_mask(target)
    spec = JobSpec(prompt="", kind=JobKind.erase, erase_method=method, seed=1)
    result = await engine.generate(spec, inputs=JobInputs(init=_png(image), mask=_png(mask)))
    pixels = _pixels(result.images[0])[0]
    after = score_image(pixels)
    assert "red" not in [s.colour for s in after.shapes]
    assert not region_mask_for_colour(pixels, "red").any()
    assert after.background_colours == scene.background and after.split == scene.split
    for other in scene.shapes[1:]:  # the rest of the scene stays
        assert (other.colour, other.kind) in [(s.colour, s.shape) for s in after.shapes]


async def test_erase_with_a_diffusion_pass_on_the_shapes_model(engine: Engine) -> None:
    scene = Scene((make_shape("circle", "red", "centre", "large"),), ("blue",))
    image, mask = render(scene), shape_mask(scene.shapes[0])
    spec = JobSpec(
        prompt="", kind=JobKind.erase, erase_denoise=0.3, seed=2, batch=2, cfg=3.0, sampler="DPM++ 2M"
    )
    result = await engine.generate(spec, inputs=JobInputs(init=_png(image), mask=_png(mask)))
    for generated in result.images:
        pixels, params = _pixels(generated)
        assert "Inpaint model: shapes-inpaint" in params
        assert not region_mask_for_colour(pixels, "red").any()
        assert not [s for s in score_image(pixels).shapes if s.colour == "red"]
