"""Control-map preprocessors on drawn test images: scribble in both polarities, canny edges, pass-through."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipelines.jobs import CONTROL_TYPES
from pipelines.preprocess import preprocess, preprocess_file
from storage.errors import InvalidRequestError, NotFoundError

CIRCLE = (12, 14, 50, 52)
SQUARE = (20, 16, 43, 39)  # inclusive corners of a filled square


def _stroke_mask(size: int = 64, width: int = 3) -> np.ndarray:
    """Where the circle's outline is drawn (bool), drawn on its own canvas."""
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).ellipse(CIRCLE, outline=255, width=width)
    return np.asarray(canvas) == 255


def _drawing(ink: int = 0, paper: int = 255, width: int = 3) -> Image.Image:
    """A circle outline in ``ink`` on ``paper`` (RGB), as a user would draw it."""
    image = Image.new("RGB", (64, 64), (paper,) * 3)
    ImageDraw.Draw(image).ellipse(CIRCLE, outline=(ink,) * 3, width=width)
    return image


def _white(map_: Image.Image) -> np.ndarray:
    array = np.asarray(map_)
    assert map_.mode == "RGB" and array.shape == (64, 64, 3)
    assert set(np.unique(array)) <= {0, 255}, "a scribble map is pure black and white"
    assert (array == array[..., :1]).all(), "all three channels agree"
    return array[..., 0] == 255


def test_scribble_of_a_dark_drawing_is_white_strokes_on_black() -> None:
    strokes = _stroke_mask()
    assert 100 < strokes.sum() < 1500  # the drawing really has an outline, not a disc
    np.testing.assert_array_equal(_white(preprocess("scribble", _drawing())), strokes)


def test_an_already_inverted_drawing_gives_the_same_map() -> None:
    inverted = _drawing(ink=255, paper=0)
    np.testing.assert_array_equal(_white(preprocess("scribble", inverted)), _stroke_mask())
    np.testing.assert_array_equal(
        np.asarray(preprocess("scribble", inverted)), np.asarray(preprocess("scribble", _drawing()))
    )


def test_faint_pencil_strokes_on_noisy_paper_are_kept_and_the_noise_is_not() -> None:
    rng = np.random.default_rng(0)
    paper = rng.integers(235, 256, size=(64, 64), dtype=np.uint8)  # scanned paper: light grain
    strokes = _stroke_mask()
    pencil = np.where(strokes, 170, paper).astype(np.uint8)  # a light grey pencil line
    image = Image.fromarray(pencil, "L")
    np.testing.assert_array_equal(_white(preprocess("scribble", image)), strokes)


def test_a_blank_page_has_no_strokes() -> None:
    for shade in (255, 0, 128):
        assert not _white(preprocess("scribble", Image.new("RGB", (64, 64), (shade,) * 3))).any()


def _filled_square(fill: int = 255, background: int = 0) -> Image.Image:
    image = Image.new("L", (64, 64), background)
    ImageDraw.Draw(image).rectangle(SQUARE, fill=fill)
    return image.convert("RGB")


def _distance_to_border() -> np.ndarray:
    """Chebyshev distance of every pixel to the square's boundary (0 on the square's outermost pixels)."""
    ys, xs = np.mgrid[0:64, 0:64]
    left, top, right, bottom = SQUARE
    inside = np.minimum.reduce([xs - left, right - xs, ys - top, bottom - ys])
    outside = np.maximum.reduce([left - xs, xs - right, top - ys, ys - bottom])
    return np.where(inside >= 0, inside, outside)


def test_canny_of_a_filled_square_is_its_border_only() -> None:
    edges = _white(preprocess("canny", _filled_square()))
    distance = _distance_to_border()
    assert not edges[distance > 1].any(), "no edge inside or outside the square, away from its border"
    left, top, right, bottom = SQUARE
    # every side is traced along its length (corners aside) within a pixel of the boundary
    near = distance <= 1
    for line in (
        edges[top - 1 : top + 1, left + 2 : right - 1],
        edges[bottom : bottom + 2, left + 2 : right - 1],
        edges[top + 2 : bottom - 1, left - 1 : left + 1].T,
        edges[top + 2 : bottom - 1, right : right + 2].T,
    ):
        assert line.any(axis=0).all()
    assert edges.sum() <= near.sum()


def test_canny_uses_the_thresholds() -> None:
    faint = _filled_square(fill=100, background=90)  # a weak edge: below 100/200, above 5/10
    assert not _white(preprocess("canny", faint)).any()
    assert _white(preprocess("canny", faint, low=5, high=10)).any()


@pytest.mark.parametrize(("low", "high"), [(200, 100), (0, 10), (10, 256), (5, 5)])
def test_bad_canny_thresholds_are_refused(low: int, high: int) -> None:
    with pytest.raises(InvalidRequestError, match="thresholds"):
        preprocess("canny", _filled_square(), low=low, high=high)


@pytest.mark.parametrize("kind", ["depth", "pose", "lineart", "none"])
def test_ready_made_maps_pass_through_as_rgb(kind: str) -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(48, 80, 3), dtype=np.uint8)
    out = preprocess(kind, Image.fromarray(pixels))
    assert out.mode == "RGB" and out.size == (80, 48)
    np.testing.assert_array_equal(np.asarray(out), pixels)
    grey = preprocess(kind, Image.fromarray(pixels[..., 0], "L"))
    assert grey.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(grey), np.repeat(pixels[..., :1], 3, axis=2))


def test_every_control_type_has_a_preprocessor() -> None:
    for kind in CONTROL_TYPES:
        assert preprocess(kind, _drawing()).size == (64, 64)


def test_an_unknown_type_is_one_sentence_naming_the_types() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        preprocess("segmentation", _drawing())
    message = str(caught.value)
    assert "'segmentation'" in message and message.count(".") == 1 and message.endswith(".")
    for kind in CONTROL_TYPES:
        assert kind in message


def test_preprocess_file_reads_through_load_image_and_writes_a_png(tmp_path: Path) -> None:
    src = tmp_path / "drawing.png"
    rgba = _drawing().convert("RGBA")
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, :8] = 0  # a transparent strip: load_image flattens it onto white paper
    rgba.putalpha(Image.fromarray(alpha, "L"))
    rgba.save(src)
    out = preprocess_file("scribble", src, tmp_path / "maps" / "drawing.scribble.png")
    assert out == tmp_path / "maps" / "drawing.scribble.png"
    with Image.open(out) as written:
        assert written.format == "PNG"
        np.testing.assert_array_equal(_white(written.convert("RGB")), _stroke_mask())
    edges = preprocess_file("canny", src, tmp_path / "edges.png", low=50, high=150)
    with Image.open(edges) as written:
        assert np.asarray(written.convert("L")).max() == 255


def test_preprocess_file_refuses_what_is_not_an_image(tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(InvalidRequestError, match="not an image"):
        preprocess_file("scribble", text, tmp_path / "out.png")
    with pytest.raises(NotFoundError) as caught:
        preprocess_file("scribble", tmp_path / "missing.png", tmp_path / "out.png")
    assert str(tmp_path) not in str(caught.value)
    assert not (tmp_path / "out.png").exists()
