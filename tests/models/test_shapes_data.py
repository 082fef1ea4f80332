"""The shapes family's data: scenes, renders, captions, conditioning images, hold-out, eval prompts.

Checks are independent of the drawing code where it matters: captions are parsed back with a vocabulary
written here, shapes are located in the rendered pixels, masks and scribbles are compared with the pixels a
re-rendered single-shape scene changes.
"""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest

from models.shapes.scenes import (
    COLOURS,
    HELD_OUT,
    MASK_DILATION,
    POSITIONS,
    SHAPE_KINDS,
    Scene,
    SceneDataset,
    caption,
    eval_prompts,
    is_held_out,
    make_shape,
    render,
    sample_scene,
    scribble,
)

# The vocabulary a reader of the captions would expect (written independently of the caption code).
COLOUR_WORDS = {c: c for c in ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")}
COLOUR_WORDS["violet"] = "purple"
SHAPE_WORDS = {k: k for k in ("circle", "square", "triangle", "star", "ring", "cross")}
SHAPE_WORDS |= {"disc": "circle", "donut": "ring", "plus sign": "cross"}
SIZE_WORDS = {"small": "small", "little": "small", "large": "large", "big": "large"}
_V = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_CENTRE = r"(?:in|at) the (?:centre|center|middle)"
_SIDE = r"(?:on|at) the (left|right)(?: side)?"
_EDGE = r"(?:at|near) the (top|bottom)\b(?![ -](?:left|right))"
_CORNER = r"(top|bottom|upper|lower)[ -](left|right)"

TOKEN = re.compile(
    r"\b(?:(?P<size>" + "|".join(SIZE_WORDS) + r") )?(?P<colour>" + "|".join(COLOUR_WORDS) + r")\b"
    r"(?: (?P<shape>" + "|".join(SHAPE_WORDS) + r")\b)?"
)


def parse_caption(text: str) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    """(colour, shape, size or None) per shape phrase, and the colours not followed by a shape."""
    shapes, others = [], []
    for m in TOKEN.finditer(text):
        colour = COLOUR_WORDS[m["colour"]]
        if m["shape"]:
            shapes.append((colour, SHAPE_WORDS[m["shape"]], SIZE_WORDS[m["size"]] if m["size"] else None))
        else:
            others.append(colour)
    return shapes, others


def parse_positions(text: str) -> list[str]:
    """Every position phrase in the text, as position names, in order of appearance."""
    found: list[tuple[int, str]] = [(m.start(), "centre") for m in re.finditer(_CENTRE, text)]
    found += [(m.start(), m[1]) for m in re.finditer(_SIDE, text)]
    found += [(m.start(), m[1]) for m in re.finditer(_EDGE, text)]
    found += [(m.start(), f"{_V[m[1]]} {m[2]}") for m in re.finditer(_CORNER, text)]
    return [name for _, name in sorted(found)]


def colour_pixels(image: np.ndarray, colour: str) -> np.ndarray:
    return np.all(image == np.array(COLOURS[colour], np.uint8), axis=2)


def changed_pixels(scene: Scene, index: int) -> np.ndarray:
    """Pixels that shape ``index`` changes when drawn alone on the scene's background (any coverage)."""
    alone = render(Scene((scene.shapes[index],), scene.background, scene.split)).astype(int)
    empty = render(Scene((), scene.background, scene.split)).astype(int)
    return np.abs(alone - empty).sum(axis=2) > 0


def disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    return cv2.dilate(mask.astype(np.uint8), disk(radius)).astype(bool)


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return list(SceneDataset(seed=11, length=240, holdout="include"))


# --- determinism ------------------------------------------------------------------------------------------


def _same(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a)


def test_same_seed_same_samples_in_any_order() -> None:
    first = list(SceneDataset(seed=5, length=12))
    again = SceneDataset(seed=5, length=12)
    assert all(_same(first[i], again[i]) for i in reversed(range(12)))
    other = list(SceneDataset(seed=6, length=12))
    assert sum(_same(a, b) for a, b in zip(first, other, strict=True)) == 0
    with pytest.raises(IndexError):
        again[12]


def test_sample_layout(samples: list[dict]) -> None:
    s = samples[0]
    assert set(s) >= {"image", "caption", "scribble", "edges", "mask", "mask_shape_index", "low_res", "scene"}
    assert s["image"].shape == (64, 64, 3) and s["image"].dtype == np.uint8
    for key in ("scribble", "edges", "mask"):
        assert s[key].shape == (64, 64) and s[key].dtype == np.uint8
    assert s["low_res"].shape == (16, 16, 3) and s["low_res"].dtype == np.uint8
    assert isinstance(s["caption"], str)
    big = SceneDataset(seed=1, length=1, size=128)[0]
    assert big["image"].shape == (128, 128, 3) and big["low_res"].shape == (32, 32, 3)


def test_sample_scene_and_eval_prompts_are_deterministic() -> None:
    a = [sample_scene(np.random.default_rng(3)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert eval_prompts() == eval_prompts()
    assert eval_prompts(seed=1) != eval_prompts()


# --- scenes and renders -----------------------------------------------------------------------------------


def test_scene_rules_hold_over_many_scenes() -> None:
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, two_shapes_p=0.5, two_tone_p=0.5) for _ in range(400)]
    counts = [len(s.shapes) for s in scenes]
    assert set(counts) == {1, 2} and 0.3 < counts.count(2) / len(scenes) < 0.55
    assert {s.split for s in scenes} == {"none", "horizontal", "vertical"}
    assert {sh.kind for s in scenes for sh in s.shapes} == set(SHAPE_KINDS)
    assert {sh.position for s in scenes for sh in s.shapes} == set(POSITIONS)
    for scene in scenes:
        assert all(sh.colour not in scene.background for sh in scene.shapes)
        assert len(set(scene.background)) == len(scene.background) == (1 if scene.split == "none" else 2)
        if len(scene.shapes) == 2:
            a, b = scene.shapes
            assert a.position != b.position and a.colour != b.colour
            assert not (changed_pixels(scene, 0) & changed_pixels(scene, 1)).any()
    assert all(len(sample_scene(rng, two_shapes_p=0.0).shapes) == 1 for _ in range(50))


def test_render_draws_the_scene_where_it_says() -> None:
    rng = np.random.default_rng(1)
    for _ in range(150):
        scene = sample_scene(rng, two_tone_p=0.5)
        image = render(scene)
        bg = scene.background
        corners = [image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]]
        top_left, other = bg[0], bg[-1]
        expected = {"none": [top_left] * 4, "horizontal": [top_left, top_left, other, other],
                    "vertical": [top_left, other, top_left, other]}[scene.split]  # fmt: skip
        assert [tuple(int(v) for v in c) for c in corners] == [COLOURS[c] for c in expected]
        for spec in scene.shapes:
            ys, xs = np.nonzero(colour_pixels(image, spec.colour))
            assert len(xs) > 60, spec
            cx, cy = xs.mean() + 0.5, ys.mean() + 0.5  # centroid of the pure-colour pixels
            assert (min(int(cx // (64 / 3)), 2), min(int(cy // (64 / 3)), 2)) == POSITIONS[spec.position]
            extent = max(np.ptp(xs), np.ptp(ys)) + 1
            assert (extent < 23) if spec.size == "small" else (extent > 25), (spec, extent)
            assert xs.min() > 0 and ys.min() > 0 and xs.max() < 63 and ys.max() < 63


def test_render_kinds_differ_in_shape() -> None:
    """Each kind at the same place has its own footprint; a ring has a hole showing the background."""
    footprints = {}
    for kind in SHAPE_KINDS:
        image = render(Scene((make_shape(kind, "red", "centre", "large"),), ("white",)))
        footprints[kind] = colour_pixels(image, "red")
        if kind == "ring":
            assert tuple(image[32, 32]) == COLOURS["white"]
        else:
            assert tuple(image[32, 32]) == COLOURS["red"]
    areas = {k: int(m.sum()) for k, m in footprints.items()}
    assert len(set(areas.values())) == len(SHAPE_KINDS)
    assert areas["square"] > areas["circle"] > areas["cross"] > max(areas["triangle"], areas["star"])


# --- captions ---------------------------------------------------------------------------------------------


def test_captions_name_the_right_colours_and_shapes(samples: list[dict]) -> None:
    texts = [s["caption"] for s in samples]
    empty = sum(t == "" for t in texts)
    assert 0.03 < empty / len(texts) < 0.2  # default empty_caption_p is 0.1
    assert len(set(texts)) > 0.9 * (len(texts) - empty)
    for s in samples:
        if not s["caption"]:
            continue
        scene: Scene = s["scene"]
        shapes, others = parse_caption(s["caption"])
        assert sorted((c, k) for c, k, _ in shapes) == sorted((sh.colour, sh.kind) for sh in scene.shapes), s
        sizes = {(sh.colour, sh.kind): sh.size for sh in scene.shapes}
        assert all(size in (None, sizes[(c, k)]) for c, k, size in shapes), s["caption"]
        assert others in ([], list(scene.background)), s["caption"]  # background named fully, in order
        positions = parse_positions(s["caption"])
        assert set(positions) <= {sh.position for sh in scene.shapes}, s["caption"]


def test_captions_vary_in_wording_and_order() -> None:
    scene = Scene((make_shape("star", "yellow", "top left", "large"),), ("blue",))
    texts = {caption(scene, np.random.default_rng(i)) for i in range(200)}
    assert len(texts) > 60
    assert any(t.startswith("blue background") for t in texts)
    assert any(re.search(r"yellow star.*blue", t) for t in texts)
    assert any("upper left" in t for t in texts) and any("top left" in t for t in texts)
    assert any("big" in t for t in texts) and any("large" in t for t in texts)
    assert any(parse_positions(t) == [] for t in texts)  # position sometimes left out
    centre = Scene((make_shape("circle", "red", "centre", "small"),), ("white",))
    words = {
        w
        for i in range(200)
        for w in ("centre", "center", "middle")
        if w in caption(centre, np.random.default_rng(i))
    }
    assert words == {"centre", "center", "middle"}
    assert caption(scene, np.random.default_rng(0), empty_p=1.0) == ""


def test_eval_prompts_are_complete_single_shape_captions() -> None:
    pairs = eval_prompts()
    assert len(pairs) == 100 and len(eval_prompts(n=7)) == 7
    assert {scene.shapes[0].kind for _, scene in pairs} == set(SHAPE_KINDS)
    for text, scene in pairs:
        assert len(scene.shapes) == 1 and scene.split == "none" and len(scene.background) == 1
        spec = scene.shapes[0]
        shapes, others = parse_caption(text)
        assert shapes == [(spec.colour, spec.kind, spec.size)], text
        assert others == [scene.background[0]], text
        assert parse_positions(text) == [spec.position], text
    assert all(is_held_out(scene) for _, scene in eval_prompts(n=12, holdout="only"))


# --- hold-out ---------------------------------------------------------------------------------------------


def test_hold_out_rule() -> None:
    assert {k for k, _ in HELD_OUT} == set(SHAPE_KINDS)  # every shape keeps most colours in training
    assert all(sum(k == kind for k, _ in HELD_OUT) <= 2 for kind in SHAPE_KINDS)
    held = Scene((make_shape(*next(iter(sorted(HELD_OUT))), "left", "small"),), ("white",))
    free = Scene((make_shape("circle", "red", "left", "small"),), ("white",))
    assert ("circle", "red") not in HELD_OUT and is_held_out(held) and not is_held_out(free)
    train = SceneDataset(seed=2, length=150)
    assert not any(is_held_out(train[i]["scene"]) for i in range(len(train)))
    test = SceneDataset(seed=2, length=30, holdout="only")
    assert all(is_held_out(s["scene"]) for s in test)


# --- conditioning images ----------------------------------------------------------------------------------


def test_masks_cover_the_chosen_shape(samples: list[dict]) -> None:
    chosen = set()
    for s in samples:
        scene, index, mask = s["scene"], s["mask_shape_index"], s["mask"]
        chosen.add(index)
        assert set(np.unique(mask)) <= {0, 255}
        shape = changed_pixels(scene, index)
        covered = mask > 0
        assert not (shape & ~covered).any()  # every pixel the shape touches is masked
        assert np.mean(covered[dilate(shape, 1)]) > 0.95 and covered.sum() < 3 * shape.sum()  # a margin
        iou = (covered & dilate(shape, MASK_DILATION)).sum() / (covered | dilate(shape, MASK_DILATION)).sum()
        assert iou >= 0.8, iou
        for other in set(range(len(scene.shapes))) - {index}:
            assert not (covered & colour_pixels(s["image"], scene.shapes[other].colour)).any()
    assert chosen == {0, 1}


def _outline(scene: Scene) -> np.ndarray:
    edge = np.zeros((64, 64), bool)
    for i in range(len(scene.shapes)):
        inside = changed_pixels(scene, i).astype(np.uint8)
        edge |= cv2.morphologyEx(inside, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool)
    return edge


def test_scribbles_are_white_strokes_near_the_outlines(samples: list[dict]) -> None:
    for s in samples[:120]:
        sketch = s["scribble"] > 0
        assert set(np.unique(s["scribble"])) <= {0, 255}
        outline = _outline(s["scene"])
        near_outline = cv2.distanceTransform((~outline).astype(np.uint8), cv2.DIST_L2, 3) <= 3
        near_stroke = cv2.distanceTransform((~sketch).astype(np.uint8), cv2.DIST_L2, 3) <= 3
        assert 0.02 < sketch.mean() < 0.4
        assert np.mean(near_outline[sketch]) > 0.97  # strokes lie along the outlines...
        assert np.mean(near_stroke[outline]) > 0.9  # ...and follow all of them (holes included)


def test_scribbles_are_jittered_like_a_hand_drawing() -> None:
    scene = Scene((make_shape("square", "red", "centre", "large"),), ("white",))
    sketches = [scribble(scene, np.random.default_rng(i)) for i in range(4)]
    assert all(not np.array_equal(sketches[0], other) for other in sketches[1:])


def test_edges_follow_colour_changes(samples: list[dict]) -> None:
    for s in samples[:60]:
        edges = s["edges"] > 0
        assert set(np.unique(s["edges"])) <= {0, 255} and edges.any()
        image = s["image"].astype(int)
        step = np.zeros((64, 64), bool)
        step[:, 1:] |= np.abs(np.diff(image, axis=1)).sum(axis=2) > 30
        step[1:, :] |= np.abs(np.diff(image, axis=0)).sum(axis=2) > 30
        assert np.mean(dilate(step, 2)[edges]) > 0.98


def test_low_res_is_the_image_averaged_over_4x4_blocks(samples: list[dict]) -> None:
    for s in samples[:40]:
        blocks = s["image"].astype(float).reshape(16, 4, 16, 4, 3).mean(axis=(1, 3))
        assert np.abs(blocks - s["low_res"]).max() <= 1.0
