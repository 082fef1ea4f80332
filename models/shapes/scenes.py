"""Procedural 64×64 scenes for the "shapes" model family: drawing, conditioning images and data samples.

A scene is one or two flat-coloured shapes on a plain or two-tone background. Geometry lives on a 64-unit
canvas (pixel ``i`` covers ``[i, i + 1)``), so a scene renders at any size. Shapes are drawn at 4× and
box-downsampled (anti-aliased). A two-tone background is split in half: ``split="horizontal"`` is a
horizontal dividing line (``background[0]`` on top), ``"vertical"`` a vertical one (``background[0]`` on
the left); captions name both colours, the first (top/left) one first. Shapes are upright, kept inside the
image, never the colour of the background, and two shapes never touch (2 px gap) nor share a position or a
colour. Captions vary template, word order and synonyms, and may leave out size, position or background.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import KW_ONLY, dataclass
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS", "HELD_OUT", "MASK_DILATION", "POSITIONS", "SHAPE_KINDS", "SIZES", "Scene", "SceneDataset",
    "ShapeSpec", "caption", "eval_prompts", "is_held_out", "make_shape", "outlines", "render", "sample_scene",
    "scribble", "shape_coverage", "shape_mask",
]  # fmt: skip

log = logging.getLogger(__name__)

#: The eight colours, fixed and well separated (the closest pair, orange/yellow, is 81 apart in RGB).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 30), "green": (40, 170, 60),
    "blue": (40, 80, 220), "purple": (140, 50, 180), "white": (245, 245, 245), "black": (15, 15, 15),
}  # fmt: skip
SHAPE_KINDS = ("circle", "square", "triangle", "star", "ring", "cross")
#: Position name -> (column, row) of the 3×3 grid of image thirds.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "centre": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}  # fmt: skip
#: Size name -> radius on the 64-unit canvas (half the shape's extent).
SIZES: dict[str, float] = {"small": 10.0, "large": 15.0}
#: (shape, colour) combinations kept out of training, to evaluate composition; every shape and colour
#: still appears in training with the other combinations.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("circle", "purple"), ("square", "orange"), ("triangle", "blue"),
     ("star", "green"), ("ring", "yellow"), ("cross", "red")}
)  # fmt: skip
#: Pixels the inpainting mask grows beyond the shape (covers the anti-aliased edge).
MASK_DILATION = 2
SUPERSAMPLE = 4
CANVAS = 64.0
_MARGIN = 3.5  # distance of an edge-cell shape's centre from the border, beyond its radius
_JITTER = 0.75  # uniform jitter of a shape's centre, canvas units
_STROKE = 2.0  # scribble stroke width, canvas units
_GAP = 2  # minimum gap between two shapes, pixels at 64


@dataclass(frozen=True)
class ShapeSpec:
    """One shape: kind, colour name, position and size names, centre (x, y) and radius in canvas units."""

    kind: str
    colour: str
    position: str
    size: str
    centre_xy: tuple[float, float]
    radius: float


@dataclass(frozen=True)
class Scene:
    """Shapes (drawn in order) on a background of one colour, or two split in half (see module doc)."""

    shapes: tuple[ShapeSpec, ...]
    background: tuple[str, ...]
    split: Literal["none", "horizontal", "vertical"] = "none"


# --- geometry ---------------------------------------------------------------------------------------------


def _regular(cx: float, cy: float, radii: list[float], start_deg: float = -90.0) -> np.ndarray:
    angles = np.deg2rad(start_deg) + np.arange(len(radii)) * 2 * np.pi / len(radii)
    r = np.asarray(radii)
    return np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], axis=1)


def _square(cx: float, cy: float, r: float) -> list[np.ndarray]:
    h = 0.9 * r
    return [np.array([(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)])]


def _cross(cx: float, cy: float, r: float) -> list[np.ndarray]:
    a, b = r, 0.38 * r
    quarter = np.array([(b, -a), (b, -b), (a, -b)])  # one arm's corners, then rotated by 90° three times
    turns = [quarter @ np.array([[c, s], [-s, c]]) for c, s in ((1, 0), (0, 1), (-1, 0), (0, -1))]
    return [np.vstack(turns) + (cx, cy)]


_OUTLINES: dict[str, Callable[[float, float, float], list[np.ndarray]]] = {
    "circle": lambda cx, cy, r: [_regular(cx, cy, [r] * 72)],
    "ring": lambda cx, cy, r: [_regular(cx, cy, [r] * 72), _regular(cx, cy, [0.5 * r] * 48)],
    "square": _square,
    "triangle": lambda cx, cy, r: [_regular(cx, cy, [1.1 * r] * 3)],
    "star": lambda cx, cy, r: [_regular(cx, cy, [1.1 * r, 0.495 * r] * 5)],
    "cross": _cross,
}


def outlines(spec: ShapeSpec) -> list[np.ndarray]:
    """Closed outlines of a shape as (N, 2) arrays of canvas (x, y); for a ring the second one is the hole."""
    return _OUTLINES[spec.kind](spec.centre_xy[0], spec.centre_xy[1], spec.radius)


def _hr_points(poly: np.ndarray, k: float) -> list[tuple[float, float]]:
    # PIL puts pixel i's centre at i; on the canvas it is at i + 0.5.
    return [(float(x), float(y)) for x, y in poly * k - 0.5]


def _shape_mask_hr(spec: ShapeSpec, hr_size: int) -> Image.Image:
    img = Image.new("L", (hr_size, hr_size), 0)
    draw = ImageDraw.Draw(img)
    polys = outlines(spec)
    for i, poly in enumerate(polys):
        draw.polygon(_hr_points(poly, hr_size / CANVAS), fill=255 if i == 0 else 0)
    return img


def shape_coverage(spec: ShapeSpec, size: int = 64) -> np.ndarray:
    """Fraction of each pixel the shape covers (float32 H×W in [0, 1]), as drawn by :func:`render`."""
    hr = _shape_mask_hr(spec, size * SUPERSAMPLE).resize((size, size), Image.Resampling.BOX)
    return np.asarray(hr, dtype=np.float32) / 255.0


def shape_mask(spec: ShapeSpec, size: int = 64, dilation: int = 0) -> np.ndarray:
    """Pixels at least half covered by the shape (bool H×W), optionally grown by ``dilation`` pixels."""
    mask = (shape_coverage(spec, size) >= 0.5).astype(np.uint8)
    if dilation <= 0:
        return mask.astype(bool)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilation + 1, 2 * dilation + 1))
    return np.asarray(cv2.dilate(mask, kernel), dtype=bool)


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """Draw a scene (4× supersampled, box-downsampled) as uint8 H×W×3 RGB."""
    hr = size * SUPERSAMPLE
    img = Image.new("RGB", (hr, hr), COLOURS[scene.background[0]])
    if scene.split != "none":
        box = (0, hr // 2, hr, hr) if scene.split == "horizontal" else (hr // 2, 0, hr, hr)
        img.paste(COLOURS[scene.background[1]], box)
    for spec in scene.shapes:
        img.paste(COLOURS[spec.colour], (0, 0, hr, hr), _shape_mask_hr(spec, hr))
    return np.asarray(img.resize((size, size), Image.Resampling.BOX)).copy()


# --- sampling ---------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return str(options[int(rng.integers(len(options)))])


def _axis_centre(cell: int, radius: float) -> float:
    low = radius + _MARGIN
    return (low, CANVAS / 2, CANVAS - low)[cell]


def make_shape(
    kind: str, colour: str, position: str, size: str, jitter: tuple[float, float] = (0.0, 0.0)
) -> ShapeSpec:
    """A shape placed in the middle of its position's cell (plus ``jitter`` canvas units, at most ±0.75)."""
    r = SIZES[size]
    col, row = POSITIONS[position]
    cx = _axis_centre(col, r) + float(np.clip(jitter[0], -_JITTER, _JITTER))
    cy = _axis_centre(row, r) + float(np.clip(jitter[1], -_JITTER, _JITTER))
    return ShapeSpec(kind, colour, position, size, (round(cx, 3), round(cy, 3)), r)


def _random_shape(rng: np.random.Generator, exclude: tuple[str, ...], kind: str | None = None) -> ShapeSpec:
    colour = _pick(rng, [c for c in COLOURS if c not in exclude])
    kind = kind or _pick(rng, SHAPE_KINDS)
    position, size = _pick(rng, list(POSITIONS)), _pick(rng, list(SIZES))
    jitter = rng.uniform(-_JITTER, _JITTER, size=2)
    return make_shape(kind, colour, position, size, (float(jitter[0]), float(jitter[1])))


def _apart(a: ShapeSpec, b: ShapeSpec) -> bool:
    return a.position != b.position and not (shape_mask(a, dilation=_GAP) & shape_mask(b)).any()


def _random_background(rng: np.random.Generator, two_tone_p: float) -> tuple[tuple[str, ...], str]:
    if rng.random() >= two_tone_p:
        return (_pick(rng, list(COLOURS)),), "none"
    first = _pick(rng, list(COLOURS))
    second = _pick(rng, [c for c in COLOURS if c != first])
    return (first, second), _pick(rng, ("horizontal", "vertical"))


def sample_scene(rng: np.random.Generator, *, two_shapes_p: float = 0.3, two_tone_p: float = 0.3) -> Scene:
    """Draw a random scene: one shape, or two (with probability ``two_shapes_p``) when a second one fits.

    Args:
        rng: The random generator (the only source of randomness).
        two_shapes_p: Probability of asking for a second shape (it is dropped if 20 tries do not fit).
        two_tone_p: Probability of a two-tone background.
    """
    background, split = _random_background(rng, two_tone_p)
    first = _random_shape(rng, background)
    shapes = [first]
    if rng.random() < two_shapes_p:
        for _ in range(20):
            second = _random_shape(rng, (*background, first.colour))
            if _apart(first, second):
                shapes.append(second)
                break
        else:
            log.debug("no room for a second shape beside %s; keeping one", first)
    return Scene(tuple(shapes), background, split)  # type: ignore[arg-type]


def is_held_out(scene: Scene) -> bool:
    """Whether any shape of the scene is a held-out (shape, colour) combination (see :data:`HELD_OUT`)."""
    return any((s.kind, s.colour) in HELD_OUT for s in scene.shapes)


# --- conditioning images ----------------------------------------------------------------------------------


def _resample_closed(poly: np.ndarray, step: float) -> np.ndarray:
    closed = np.vstack([poly, poly[:1]])
    seg = np.hypot(*np.diff(closed, axis=0).T)
    dist = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.arange(0.0, dist[-1], step)
    return np.stack([np.interp(t, dist, closed[:, 0]), np.interp(t, dist, closed[:, 1])], axis=1)


def _jitter_stroke(poly: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    pts = _resample_closed(poly, 1.0)
    pts = np.roll(pts, int(rng.integers(len(pts))), axis=0)
    t = np.linspace(0.0, 2 * np.pi, len(pts))
    wobble = np.zeros_like(pts)
    for k in (1, 2, 3):
        amp, phase = rng.uniform(0.1, 0.35, size=2), rng.uniform(0, 2 * np.pi, size=2)
        wobble += amp * np.sin(k * t[:, None] + phase)
    pts = pts + wobble + rng.uniform(-0.6, 0.6, size=2)
    extra = int(rng.integers(-2, 4))  # a small gap or overshoot where the pen lifts
    return np.vstack([pts, pts[: max(extra, 0) + 1]]) if extra >= 0 else pts[:extra]


def scribble(scene: Scene, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A hand-drawn-like sketch of the shapes' outlines: white (255) jittered strokes on black, uint8 H×W."""
    hr = size * SUPERSAMPLE
    k = hr / CANVAS
    img = Image.new("L", (hr, hr), 0)
    draw = ImageDraw.Draw(img)
    for poly in (p for spec in scene.shapes for p in outlines(spec)):
        draw.line(_hr_points(_jitter_stroke(poly, rng), k), fill=255, width=round(_STROKE * k), joint="curve")
    small = np.asarray(img.resize((size, size), Image.Resampling.BOX))
    return np.where(small >= 128, 255, 0).astype(np.uint8)


# --- captions ---------------------------------------------------------------------------------------------

_COLOUR_WORDS = {"purple": ("purple", "violet")}
_SHAPE_WORDS = {"circle": ("circle", "disc"), "ring": ("ring", "donut"), "cross": ("cross", "plus sign")}
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "centre": ("in the centre", "in the center", "in the middle", "at the centre"),
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
} | {
    f"{v} {h}": (f"at the {v} {h}", f"in the {v} {h} corner", f"in the {u} {h}", f"{v}-{h}")
    for v, u in (("top", "upper"), ("bottom", "lower"))
    for h in ("left", "right")
}
_PREFIXES = ("", "", "", "a picture of ", "an image of ", "a drawing of ", "a simple drawing of ")


def _word(rng: np.random.Generator, table: Mapping[str, tuple[str, ...]], key: str) -> str:
    return _pick(rng, table.get(key, (key,)))


def _a(text: str) -> str:
    return ("an " if text[0] in "aeiou" else "a ") + text


def _object(spec: ShapeSpec, rng: np.random.Generator, complete: bool, single: bool) -> str:
    words = [_word(rng, _SIZE_WORDS, spec.size)] if complete or rng.random() < 0.7 else []
    text = " ".join([*words, _word(rng, _COLOUR_WORDS, spec.colour), _word(rng, _SHAPE_WORDS, spec.kind)])
    text = _pick(rng, (_a(text), _a(text), "one " + text, text))
    if not (complete or rng.random() < 0.7):
        return text
    place = _word(rng, _POSITION_WORDS, spec.position)
    if place.endswith(("left", "right")) and "-" in place:
        return f"{text} {_pick(rng, ('at the', 'in the'))} {place}"
    return f"{place}, {text}" if single and rng.random() < 0.2 else f"{text} {place}"


def _background(scene: Scene, rng: np.random.Generator, lead: bool) -> str:
    names = [_word(rng, _COLOUR_WORDS, c) for c in scene.background]
    both = " and ".join(names)
    if lead:
        return _pick(rng, (f"{both} background", _a(f"{both} background")))
    if len(names) == 2:
        return _pick(rng, (f"on {_a(both)} background", f"on a split {both} background",
                           f"on a background half {names[0]} and half {names[1]}"))  # fmt: skip
    c = names[0]
    return _pick(rng, (f"on {_a(c)} background", f"on {c}", f"against {_a(c)} background", f"on plain {c}"))


def caption(scene: Scene, rng: np.random.Generator, *, empty_p: float = 0.0, complete: bool = False) -> str:
    """A varied caption of the scene, lower case (templates, word order, synonyms, optional article).

    Each shape reads "[size] colour shape [position]"; size, position and background may be left out unless
    ``complete``. A two-tone background is named "first and second" (top/left half first).

    Args:
        scene: The scene to describe.
        rng: The random generator choosing the wording.
        empty_p: Probability of returning "" (for classifier-free guidance).
        complete: Always name every attribute (evaluation prompts).
    """
    if empty_p > 0 and rng.random() < empty_p:
        return ""
    objects = [_object(s, rng, complete, len(scene.shapes) == 1) for s in scene.shapes]
    if rng.random() < 0.5:
        objects.reverse()
    joined = _pick(rng, (" and ", ", ", " with ")).join(objects)
    prefix = _pick(rng, _PREFIXES)
    template = int(rng.integers(3)) if complete or rng.random() < 0.8 else -1
    if template == 0:
        return f"{prefix}{joined} {_background(scene, rng, lead=False)}"
    if template == 1:
        return f"{_background(scene, rng, lead=True)}, {joined}"
    if template == 2:
        return f"{prefix}{joined}, {_background(scene, rng, lead=True)}"
    return prefix + joined


# --- data -------------------------------------------------------------------------------------------------

HoldOut = Literal["exclude", "only", "include"]


def _scene_for(rng: np.random.Generator, holdout: HoldOut, two_shapes_p: float) -> Scene:
    while True:
        scene = sample_scene(rng, two_shapes_p=two_shapes_p)
        if holdout == "include" or is_held_out(scene) == (holdout == "only"):
            return scene


@dataclass(frozen=True)
class SceneDataset:
    """Deterministic, random-access scene samples: item ``i`` depends only on ``(seed, i)``.

    Each sample is a dict with ``scene`` (:class:`Scene`), ``image`` (uint8 H×W×3), ``caption``,
    ``scribble`` (uint8 H×W, white strokes on black), ``edges`` (``cv2.Canny(image, 100, 200)``), ``mask``
    (uint8 0/255: one shape grown by :data:`MASK_DILATION` px, for inpainting), ``mask_shape_index`` and
    ``low_res`` (the image at a quarter size, area-downsampled, for the x4 upscaler).

    Attributes:
        seed: Base seed.
        length: Number of samples.
        holdout: ``"exclude"`` (training: no held-out combination), ``"only"`` (only scenes with one) or
            ``"include"``.
        two_shapes_p: Probability of a two-shape scene.
        empty_caption_p: Probability of an empty caption (classifier-free guidance).
        size: Image side in pixels.
    """

    seed: int
    length: int
    _: KW_ONLY
    holdout: HoldOut = "exclude"
    two_shapes_p: float = 0.3
    empty_caption_p: float = 0.1
    size: int = 64

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(self.length))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        scene = _scene_for(rng, self.holdout, self.two_shapes_p)
        image = render(scene, self.size)
        chosen = int(rng.integers(len(scene.shapes)))
        mask = shape_mask(scene.shapes[chosen], self.size, dilation=MASK_DILATION)
        quarter = (self.size // 4, self.size // 4)
        return {
            "scene": scene,
            "image": image,
            "caption": caption(scene, rng, empty_p=self.empty_caption_p),
            "scribble": scribble(scene, rng, self.size),
            "edges": cv2.Canny(image, 100, 200),
            "mask": mask.astype(np.uint8) * 255,
            "mask_shape_index": chosen,
            "low_res": cv2.resize(image, quarter, interpolation=cv2.INTER_AREA),
        }


def eval_prompts(n: int = 100, seed: int = 0, *, holdout: HoldOut = "include") -> list[tuple[str, Scene]]:
    """Deterministic single-shape evaluation pairs (complete caption, target scene) on plain backgrounds.

    Shapes cycle through :data:`SHAPE_KINDS` so each kind gets about the same number of prompts.
    """
    rng = np.random.default_rng([seed, 7919])
    pairs: list[tuple[str, Scene]] = []
    while len(pairs) < n:
        background = (_pick(rng, list(COLOURS)),)
        shape = _random_shape(rng, background, kind=SHAPE_KINDS[len(pairs) % len(SHAPE_KINDS)])
        scene = Scene((shape,), background)
        if holdout == "include" or is_held_out(scene) == (holdout == "only"):
            pairs.append((caption(scene, rng, complete=True), scene))
    return pairs
