"""Input images for the modes: checked, normalised and sized before anything is stored."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipelines.inputs import JobInputs, fit_size, prepare_inputs
from pipelines.jobs import LIMITS, ControlUnit, JobKind, JobSpec
from storage.errors import InvalidRequestError


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def _scene(size: tuple[int, int] = (96, 64)) -> Image.Image:
    image = Image.new("RGB", size, (0, 0, 255))
    ImageDraw.Draw(image).ellipse((20, 10, 50, 40), fill=(255, 0, 0))
    return image


def _mask(size: tuple[int, int], box: tuple[int, int, int, int] = (20, 10, 50, 40)) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def test_img2img_size_follows_the_init_aspect_at_the_model_area() -> None:
    prepared = prepare_inputs(
        JobSpec(prompt="x", kind=JobKind.img2img), JobInputs(init=_png(_scene((300, 200)))), 64, LIMITS
    )
    assert (prepared.spec.width, prepared.spec.height) == fit_size(300, 200, 64, LIMITS)
    assert prepared.spec.width > prepared.spec.height and prepared.spec.width % 8 == 0
    assert _decode(prepared.files["init"]).size == (300, 200)  # stored as sent; runners resize


def test_explicit_size_is_kept() -> None:
    spec = JobSpec(prompt="x", kind=JobKind.img2img, width=128, height=64)
    prepared = prepare_inputs(spec, JobInputs(init=_png(_scene())), 64, LIMITS)
    assert (prepared.spec.width, prepared.spec.height) == (128, 64)


@pytest.mark.parametrize(
    ("size", "side", "expected"),
    [((512, 512), 512, (512, 512)), ((1024, 512), 512, (728, 360)), ((64, 64), 64, (64, 64))],
)
def test_fit_size(size: tuple[int, int], side: int, expected: tuple[int, int]) -> None:
    assert fit_size(*size, side, LIMITS) == expected


def test_fit_size_stays_within_the_limits() -> None:
    width, height = fit_size(10_000, 100, 1024, LIMITS)
    assert width == LIMITS.max_size and height == LIMITS.min_size


def test_mask_comes_from_transparency_when_none_is_sent() -> None:
    rgba = _scene().convert("RGBA")
    alpha = np.full((64, 96), 255, np.uint8)
    alpha[10:40, 20:50] = 0  # the hole to repaint
    rgba.putalpha(Image.fromarray(alpha))
    prepared = prepare_inputs(
        JobSpec(prompt="x", kind=JobKind.inpaint), JobInputs(init=_png(rgba)), 64, LIMITS
    )
    mask = np.asarray(_decode(prepared.files["mask"]))
    assert mask[20, 30] == 255 and mask[0, 0] == 0 and mask.sum() == 255 * 30 * 30
    assert _decode(prepared.files["init"]).mode == "RGB"
    assert any("transparent" in note for note in prepared.notes)


def test_mask_of_another_size_is_resized_and_that_is_said() -> None:
    prepared = prepare_inputs(
        JobSpec(prompt="x", kind=JobKind.inpaint),
        JobInputs(init=_png(_scene((96, 64))), mask=_png(_mask((48, 32), (10, 5, 25, 20)))),
        64,
        LIMITS,
    )
    assert _decode(prepared.files["mask"]).size == (96, 64)
    assert any("48×32" in note and "96×64" in note for note in prepared.notes)


def test_a_mask_drawn_on_a_transparent_sheet_uses_its_strokes() -> None:
    sheet = Image.new("RGBA", (96, 64), (0, 0, 0, 0))
    ImageDraw.Draw(sheet).rectangle((0, 0, 10, 10), fill=(255, 0, 0, 255))
    prepared = prepare_inputs(
        JobSpec(prompt="x", kind=JobKind.inpaint),
        JobInputs(init=_png(_scene()), mask=_png(sheet)),
        64,
        LIMITS,
    )
    mask = np.asarray(_decode(prepared.files["mask"]))
    assert mask[5, 5] == 255 and mask[30, 60] == 0


@pytest.mark.parametrize(
    ("spec", "inputs", "fragment"),
    [
        (JobSpec(prompt="x", kind=JobKind.img2img), JobInputs(), "needs an image"),
        (JobSpec(prompt="", kind=JobKind.upscale), JobInputs(), "needs an image"),
        (JobSpec(prompt="x", kind=JobKind.inpaint), JobInputs(init=_png(_scene())), "needs a mask"),
        (
            JobSpec(prompt="x", kind=JobKind.inpaint),
            JobInputs(init=_png(_scene()), mask=_png(Image.new("L", (96, 64), 0))),
            "all black",
        ),
        (
            JobSpec(prompt="", kind=JobKind.erase),
            JobInputs(init=_png(_scene()), mask=_png(Image.new("L", (96, 64), 40))),
            "nothing to erase",
        ),
        (
            JobSpec(prompt="x", kind=JobKind.img2img),
            JobInputs(init=_png(_scene()), mask=_png(_mask((96, 64)))),
            "only by the inpaint and erase modes",
        ),
        (JobSpec(prompt="x"), JobInputs(init=_png(_scene())), "takes no input image"),
        (
            JobSpec(prompt="x", kind=JobKind.controlnet, controls=(ControlUnit("scribble"),)),
            JobInputs(),
            "has no control image",
        ),
        (
            JobSpec(prompt="x", kind=JobKind.controlnet, controls=(ControlUnit("scribble"),)),
            JobInputs(controls=(_png(_scene()), _png(_scene()))),
            "2 control images for 1 ControlNet units",
        ),
        (JobSpec(prompt="x", kind=JobKind.img2img), JobInputs(init=b"GIF89a nonsense"), "not an image"),
        (JobSpec(prompt="x", kind=JobKind.img2img), JobInputs(init=_png(Image.new("RGB", (1, 1)))), "1×1"),
    ],
)
def test_bad_inputs_get_one_sentence(spec: JobSpec, inputs: JobInputs, fragment: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        prepare_inputs(spec, inputs, 64, LIMITS)
    message = str(info.value)
    assert fragment in message and message.endswith(".") and "\n" not in message


def test_upscale_records_the_input_size_unrounded() -> None:
    prepared = prepare_inputs(
        JobSpec(prompt="", kind=JobKind.upscale, scale=2), JobInputs(init=_png(_scene((61, 45)))), 64, LIMITS
    )
    assert (prepared.spec.width, prepared.spec.height) == (61, 45)
    assert prepared.spec.output_size == (122, 90)


def test_animated_control_image_keeps_its_first_frame_and_says_so() -> None:
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 255, 255), (0, 0, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    spec = JobSpec(prompt="x", kind=JobKind.controlnet, controls=(ControlUnit("scribble"),))
    prepared = prepare_inputs(spec, JobInputs(controls=(buffer.getvalue(),)), 64, LIMITS)
    assert np.asarray(_decode(prepared.files["control0"])).min() > 200  # the white first frame
    assert any(note.startswith("Control image 1:") and "animated" in note for note in prepared.notes)
