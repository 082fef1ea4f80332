"""The shapes scorer: near-perfect on ground-truth renders, robust to blur, safe on noise, fast enough."""

from __future__ import annotations

import dataclasses
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from models.shapes.scenes import (
    COLOURS,
    SHAPE_KINDS,
    Scene,
    make_shape,
    render,
    sample_scene,
    shape_coverage,
    shape_mask,
)
from models.shapes.scorer import (
    SceneReading,
    accuracy,
    iou,
    region_mask_for_colour,
    score_against,
    score_image,
)

ATTRIBUTES = ("colour", "shape", "position", "background", "size")


def blur(image: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), 1.5)


def down_up(image: np.ndarray) -> np.ndarray:
    small = cv2.resize(image, (16, 16), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (64, 64), interpolation=cv2.INTER_LINEAR)


@pytest.fixture(scope="module")
def single_scenes() -> list[Scene]:
    rng = np.random.default_rng(2024)
    return [sample_scene(rng, two_shapes_p=0.0) for _ in range(300)]


@pytest.fixture(scope="module")
def single_images(single_scenes: list[Scene]) -> list[np.ndarray]:
    return [render(scene) for scene in single_scenes]


def _accuracy(images: list[np.ndarray], scenes: list[Scene]) -> dict[str, float]:
    return accuracy([score_image(image) for image in images], scenes)


def test_the_test_set_covers_every_kind_and_background(single_scenes: list[Scene]) -> None:
    assert {s.shapes[0].kind for s in single_scenes} == set(SHAPE_KINDS)
    assert {s.split for s in single_scenes} == {"none", "horizontal", "vertical"}
    assert {s.shapes[0].size for s in single_scenes} == {"small", "large"}


def test_ground_truth_renders_are_read_right(
    single_images: list[np.ndarray], single_scenes: list[Scene]
) -> None:
    acc = _accuracy(single_images, single_scenes)
    assert all(acc[k] >= 0.98 for k in (*ATTRIBUTES, "count")), acc


@pytest.mark.parametrize("degrade", [blur, down_up], ids=["gaussian-1.5", "down-up-4x"])
def test_blurry_renders_are_read_right(
    degrade, single_images: list[np.ndarray], single_scenes: list[Scene]
) -> None:
    acc = _accuracy([degrade(image) for image in single_images], single_scenes)
    assert all(acc[k] >= 0.90 for k in ATTRIBUTES), acc


def test_two_shape_scenes_are_read_right() -> None:
    rng = np.random.default_rng(77)
    scenes = [s for s in (sample_scene(rng, two_shapes_p=1.0) for _ in range(120)) if len(s.shapes) == 2]
    assert len(scenes) > 80
    acc = _accuracy([render(s) for s in scenes], scenes)
    assert all(v >= 0.95 for v in acc.values()), acc
    acc = _accuracy([blur(render(s)) for s in scenes], scenes)
    assert all(v >= 0.90 for v in acc.values()), acc


def test_reading_locates_the_shape(single_images: list[np.ndarray], single_scenes: list[Scene]) -> None:
    for image, scene in list(zip(single_images, single_scenes, strict=True))[:60]:
        spec = scene.shapes[0]
        shape = score_image(image).shapes[0]
        assert shape.mask.dtype == bool and shape.mask.shape == (64, 64) and shape.area == shape.mask.sum()
        assert np.hypot(*np.subtract(shape.centroid, spec.centre_xy)) < 1.0
        assert iou(shape.mask, shape_mask(spec)) >= 0.85  # pixels half covered are a toss-up
        assert not (shape.mask & (shape_coverage(spec) == 0)).any()


@pytest.mark.parametrize(
    "image",
    [
        np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8),
        np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8),
        np.full((64, 64, 3), 128, np.uint8),
        np.zeros((64, 64, 3), np.uint8),
        np.full((8, 8, 3), 255, np.uint8),
        np.random.default_rng(2).integers(0, 256, (5, 7, 3), dtype=np.uint8),
    ],
    ids=["noise", "grey-noise", "grey", "black", "tiny", "tiny-noise"],
)
def test_noise_and_uniform_images_show_no_shapes(image: np.ndarray) -> None:
    reading = score_image(image)
    assert isinstance(reading, SceneReading) and reading.shapes == ()


def test_accepts_pil_rgba_float_and_other_sizes() -> None:
    scene = Scene((make_shape("star", "green", "bottom right", "large"),), ("purple", "white"), "horizontal")
    images = (
        Image.fromarray(render(scene)),
        Image.fromarray(render(scene)).convert("RGBA"),
        render(scene, 256),
        render(scene).astype(np.float32) / 255.0,  # diffusers' output_type="np"
    )
    for image in images:
        reading = score_image(image)
        assert all(score_against(reading, scene).values()), reading
        assert reading.background == "purple" and reading.background_colours == ("purple", "white")


def test_score_against_flags_each_wrong_attribute() -> None:
    scene = Scene((make_shape("triangle", "blue", "top right", "small"),), ("yellow",))
    reading = score_image(render(scene))
    assert all(score_against(reading, scene).values())
    spec = scene.shapes[0]
    wrong = {
        "colour": dataclasses.replace(spec, colour="red"),
        "shape": dataclasses.replace(spec, kind="circle"),
        "position": dataclasses.replace(spec, position="top"),
        "size": dataclasses.replace(spec, size="large"),
    }
    for key, bad in wrong.items():
        result = score_against(reading, dataclasses.replace(scene, shapes=(bad,)))
        assert [k for k, ok in result.items() if not ok] == [key]
    result = score_against(
        reading, dataclasses.replace(scene, background=("yellow", "white"), split="vertical")
    )
    assert [k for k, ok in result.items() if not ok] == ["background"]
    two = Scene((spec, make_shape("ring", "black", "bottom left", "large")), ("yellow",))
    result = score_against(reading, two)
    assert not result["count"] and not result["colour"]
    other = Scene((make_shape("square", "red", "left", "large"),), ("white",))
    acc = accuracy([reading, score_image(render(other))], [scene, scene])
    assert acc["background"] == 0.5 and acc["shape"] == 0.5
    with pytest.raises(ValueError, match="as many readings"):
        accuracy([reading], [scene, scene])


def test_iou() -> None:
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[0:4, 0:4] = True  # 16 pixels
    b[2:6, 2:6] = True  # 16 pixels, 4 shared
    assert iou(a, b) == pytest.approx(4 / 28)
    assert iou(a, a) == 1.0 and iou(a, ~a) == 0.0 and iou(np.zeros(3), np.zeros(3)) == 1.0
    assert iou(a.astype(np.uint8) * 255, a) == 1.0


def test_region_mask_for_colour() -> None:
    circle = make_shape("circle", "red", "top left", "large")
    square = make_shape("square", "orange", "bottom right", "small")
    scene = Scene((circle, square), ("yellow", "white"), "vertical")
    image = render(scene)
    assert iou(region_mask_for_colour(image, "red"), shape_mask(circle)) >= 0.95
    assert iou(region_mask_for_colour(image, "orange"), shape_mask(square)) >= 0.9
    assert not region_mask_for_colour(image, "blue").any()
    soft = blur(image)
    assert iou(region_mask_for_colour(soft, "red"), shape_mask(circle)) >= 0.85
    assert iou(region_mask_for_colour(soft, "orange"), shape_mask(square)) >= 0.7


def test_an_inpainted_shape_reads_as_the_new_one_inside_the_mask() -> None:
    """The check the inpainting tests will make, on a hand-made "inpainted" image."""
    circle = make_shape("circle", "red", "left", "large")
    star = make_shape("star", "blue", "top right", "small")
    before = render(Scene((circle, star), ("white",)))
    mask = shape_mask(circle, dilation=2)
    repainted = render(Scene((dataclasses.replace(circle, kind="square", colour="green"), star), ("white",)))
    after = np.where(mask[..., None], repainted, before)
    found = [s for s in score_image(after).shapes if s.colour == "green"]
    assert len(found) == 1 and found[0].shape == "square" and found[0].position == "left"
    assert not (found[0].mask & ~mask).any()
    assert np.array_equal(after[~mask], before[~mask])
    assert {(s.colour, s.shape) for s in score_image(after).shapes} == {("green", "square"), ("blue", "star")}


def test_colour_is_read_through_the_halo() -> None:
    """Blurred red on yellow has orange-looking edges; the shape still reads red, for each pair of colours."""
    names = list(COLOURS)
    wrong = []
    for bg in names:
        for fg in names:
            if fg != bg:
                scene = Scene((make_shape("cross", fg, "centre", "small"),), (bg,))
                shapes = score_image(down_up(render(scene))).shapes
                if not shapes or shapes[0].colour != fg:
                    wrong.append((fg, bg))
    assert wrong == []


def test_scoring_is_fast(single_images: list[np.ndarray]) -> None:
    images = single_images[:200]
    score_image(images[0])
    start = time.perf_counter()
    for image in images:
        score_image(image)
    per_image = (time.perf_counter() - start) / len(images)
    assert per_image < 0.015  # about 4 ms on 2 busy cores; generous for loaded machines
