"""Read back what a (possibly blurry) shapes image shows: background, shapes' colour, kind, position, size.

Plain image analysis, built for the tiny model's blurry output:

1. Background: the median colours of the border's four quadrants decide plain or split (top/bottom or
   left/right halves) and give a per-pixel background model, the split line as blurred as the border shows.
2. Foreground: pixels far from the background model; the largest connected region is the dominant shape,
   the next one (after removing the first) the second.
3. Colour: every pixel of the region's most contrasted core votes for the palette colour that best explains
   it as a blend ``background + alpha * (colour - background)``; the majority wins (a blurred red edge on
   yellow looks orange, but it is a red blend).
4. Region: pixels at least half-way from the background to that colour (closer to the shape's colour than
   to the background's), so the halo is left out.
5. Kind, from the region's outline traced on a 4× bilinear upsample: a hole makes a ring; otherwise the
   strongest angular harmonic of the centroid-to-outline distance: 3rd a triangle, 5th a star, 4th a square
   (bulging along the diagonals) or a cross (along the axes), none a circle. Harmonics survive blur far
   better than corner counts, circularity or solidity, which all drift towards a circle's.
6. Position from the centroid (thirds of the image); size from the mean outline radius divided by that
   kind's mean radius per unit size.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

from models.shapes.scenes import COLOURS, POSITIONS, SHAPE_KINDS, SIZES, Scene, ShapeSpec, outlines

__all__ = [
    "SceneReading",
    "ShapeReading",
    "accuracy",
    "iou",
    "region_mask_for_colour",
    "score_against",
    "score_image",
]

log = logging.getLogger(__name__)

_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32)
_GRID = {cell: name for name, cell in POSITIONS.items()}
_SEPARATE = 60.0  # RGB distance above which two background samples are different colours
_FOREGROUND = 40.0  # RGB distance from the background model that makes a pixel foreground
_MAX_RESIDUAL = 60.0  # a region whose core does not fit any colour blend this well is noise
_MIN_AREA = 40  # pixels, at 64×64 (a small star covers about 160)
_LARGE_RADIUS = float(np.sqrt(SIZES["small"] * SIZES["large"]))  # between the two sizes, at 64×64
_UPSAMPLE = 4
_PURE = 0.75  # blend fraction of a region's core pixels, for region_mask_for_colour
_MIN_HOLE = 0.03  # a hole this large (relative to the outline's area) makes a ring
_MIN_HARMONIC = 0.045  # weaker angular harmonics than this: a circle


@dataclass(frozen=True, eq=False)
class ShapeReading:
    """One shape found in an image: names, centroid (x, y) in pixels, area in pixels and its bool mask."""

    colour: str
    shape: str
    position: str
    size: str
    centroid: tuple[float, float]
    area: int
    mask: np.ndarray = field(repr=False)


@dataclass(frozen=True, eq=False)
class SceneReading:
    """What an image shows: ``background`` (the first, top/left, colour; None for noise), all background
    colours, the split (``none``/``horizontal``/``vertical``), and the shapes, largest first."""

    background: str | None
    background_colours: tuple[str, ...]
    split: str
    shapes: tuple[ShapeReading, ...]


@dataclass(frozen=True, eq=False)
class _Background:
    names: tuple[str, ...]
    split: str
    model: np.ndarray  # float32 H×W×3: the background colour expected at each pixel


def _as_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """Float32 H×W×3 in 0..255 from PIL, uint8 or float (0..1, as diffusers' ``output_type="np"``) arrays."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    out = arr[..., :3].astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating) and out.size and float(out.max()) <= 1.0:
        out *= 255.0
    return out


def _nearest(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=1)))]


@functools.lru_cache(maxsize=8)
def _border_index(h: int, w: int) -> dict[str, np.ndarray]:
    """Flat indices of the border frame's pixels in each quadrant (tl, tr, bl, br), half and in all."""
    b = max(1, round(2 * w / 64))
    frame = np.zeros((h, w), bool)
    frame[:b], frame[-b:], frame[:, :b], frame[:, -b:] = True, True, True, True
    ys, xs = np.mgrid[:h, :w]
    top, left = ys < h / 2, xs < w / 2
    parts = {"tl": top & left, "tr": top & ~left, "bl": ~top & left, "br": ~top & ~left,
             "t": top, "b": ~top, "l": left, "r": ~left, "all": np.ones_like(top)}  # fmt: skip
    return {k: np.flatnonzero(frame & m) for k, m in parts.items()}


def _border_groups(img: np.ndarray, keys: tuple[str, ...]) -> list[np.ndarray]:
    """Median border colour per quadrant (keys tl, tr, bl, br), per half (t, b, l, r) or overall (all)."""
    flat, index = img.reshape(-1, 3), _border_index(*img.shape[:2])
    groups = [flat[index[k]] for k in keys]
    if len({len(g) for g in groups}) == 1:  # one call for groups of equal size (quadrants of an even image)
        return list(np.median(np.stack(groups), axis=1))
    return [np.median(g, axis=0) for g in groups]


def _split_profile(line: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """A monotone 0→1 step along one axis, placed and blurred as the border samples ``line`` (N×3) show."""
    v = second - first
    a = np.clip((line - first) @ v / max(float(v @ v), 1e-6), 0.0, 1.0)
    n = len(a)
    centre = float(np.sum(a < 0.5))  # the step sits after the columns (rows) still nearer the first colour
    width = float(np.clip(np.sum((a > 0.2) & (a < 0.8)), 1.0, n / 8))
    return np.asarray(np.clip((np.arange(n) + 0.5 - centre) / width + 0.5, 0.0, 1.0))


def _background(img: np.ndarray) -> _Background | None:
    """Plain or split background from the border, or None when the border does not follow one (noise)."""
    tl, tr, bl, br = _border_groups(img, ("tl", "tr", "bl", "br"))
    differ = [float(np.linalg.norm(a - b)) > _SEPARATE for a, b in ((tl, tr), (bl, br), (tl, bl), (tr, br))]
    if differ == [True, True, False, False]:  # left and right halves differ
        first, second = _border_groups(img, ("l", "r"))
        edge = np.median(np.concatenate([img[:2], img[-2:]]), axis=0)  # top and bottom rows, per column
        a = _split_profile(edge, first, second)[None, :, None]
        split = "vertical"
    elif differ == [False, False, True, True]:  # top and bottom halves differ
        first, second = _border_groups(img, ("t", "b"))
        edge = np.median(np.concatenate([img[:, :2], img[:, -2:]], axis=1), axis=1)
        a = _split_profile(edge, first, second)[:, None, None]
        split = "horizontal"
    else:
        (colour,) = _border_groups(img, ("all",))
        model = np.broadcast_to(colour, img.shape).astype(np.float32)
        return _checked(img, _Background((_nearest(colour),), "none", model))
    model = np.broadcast_to(first + a * (second - first), img.shape).astype(np.float32)
    return _checked(img, _Background((_nearest(first), _nearest(second)), split, model))


def _checked(img: np.ndarray, bg: _Background) -> _Background | None:
    """The background model, unless the border does not follow it (noise, clutter)."""
    index = _border_index(*img.shape[:2])["all"]
    border = np.linalg.norm(img.reshape(-1, 3)[index] - bg.model.reshape(-1, 3)[index], axis=1)
    return bg if float(np.mean(border < _SEPARATE)) >= 0.6 else None


def _blend_fit(pixels: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit each pixel (N×3) as a blend ``bg + t * (colour - bg)`` for each palette colour (K).

    Returns alpha ``t`` (clipped to [0, 1]), the residual distance and a cost (K×N each): the residual plus a
    little for a low alpha (so a blurred red edge on yellow is a red blend, not orange), infinite for colours
    too close to the background to be a shape's colour.
    """
    v = _PALETTE[:, None, :] - bg[None]  # K×N×3
    vv = np.einsum("knc,knc->kn", v, v)
    t = np.clip(np.einsum("nc,knc->kn", pixels - bg, v) / np.maximum(vv, 1e-6), 0.0, 1.0)
    off = (pixels - bg)[None] - t[..., None] * v
    residual = np.sqrt(np.einsum("knc,knc->kn", off, off))
    contrast = np.sqrt(vv)
    cost = np.where(contrast < _SEPARATE, np.inf, residual + 0.1 * (1 - t) * contrast)
    return t, residual, cost


def _classify_colour(pixels: np.ndarray, bg: np.ndarray) -> tuple[int, float, np.ndarray]:
    """The palette colour (index) best explaining most ``pixels`` (N×3) as blends over ``bg`` (N×3).

    Each pixel votes for its lowest-cost colour. Returns the winner, the median residual of its voters and
    the voters (bool N).
    """
    _, residual, cost = _blend_fit(pixels, bg)
    votes = np.argmin(cost, axis=0)
    k = int(np.bincount(votes, minlength=len(_NAMES)).argmax())
    voters = votes == k
    return k, float(np.median(residual[k][voters])), voters


def _alpha_map(img: np.ndarray, bg: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel blend fraction towards palette colour ``k`` (H×W), 0 where the pixel is not such a blend
    (too far from the background→colour line, or much better explained by another colour); and whether
    ``k`` is each pixel's best explanation (bool H×W)."""
    t, residual, cost = _blend_fit(img.reshape(-1, 3), bg.reshape(-1, 3))
    contrast = np.linalg.norm(_PALETTE[k] - bg.reshape(-1, 3), axis=1)
    near_line = residual[k] <= np.maximum(0.35 * contrast, _FOREGROUND)
    ok = near_line & (cost[k] <= cost.min(axis=0) + _FOREGROUND / 2)
    alpha = np.where(ok, t[k], 0.0).reshape(img.shape[:2]).astype(np.float32)
    return alpha, (np.argmin(cost, axis=0) == k).reshape(img.shape[:2])


def _component_with(mask: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """The union of ``mask``'s 8-connected components that touch ``seed``."""
    _, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    keep = np.unique(labels[seed & mask])
    return np.isin(labels, keep[keep > 0])


def _outer_contour(alpha: np.ndarray) -> tuple[np.ndarray | None, bool]:
    """The region's outline on a 4× bilinear upsample of ``alpha`` (in upsampled pixels), and whether it has
    a hole (a ring)."""
    up = cv2.resize(alpha, None, fx=_UPSAMPLE, fy=_UPSAMPLE, interpolation=cv2.INTER_LINEAR)
    found, hierarchy = cv2.findContours((up >= 0.5).astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return None, False
    parent = hierarchy[0][:, 3]
    areas = [cv2.contourArea(c) for c in found]
    outer = int(max(np.flatnonzero(parent < 0), key=lambda i: areas[i]))
    hole = any(p == outer and a >= _MIN_HOLE * areas[outer] for p, a in zip(parent, areas, strict=True))
    return found[outer].reshape(-1, 2).astype(np.float64), hole


def _radial_profile(points: np.ndarray, centre: np.ndarray, n: int = 128) -> np.ndarray:
    """Distance from ``centre`` to the outline ``points`` (N×2) at ``n`` evenly spaced angles."""
    d = points - centre
    theta, r = np.arctan2(d[:, 1], d[:, 0]), np.hypot(d[:, 0], d[:, 1])
    order = np.argsort(theta)
    grid = np.linspace(-np.pi, np.pi, n, endpoint=False)
    return np.asarray(np.interp(grid, theta[order], r[order], period=2 * np.pi))


def _harmonics(profile: np.ndarray) -> tuple[np.ndarray, float]:
    """Relative amplitudes of the profile's angular harmonics 0..8, and the sign of the 4th one's phase
    (+1: bulges along the axes, a cross; -1: along the diagonals, a square)."""
    f = np.fft.rfft(profile) / len(profile)
    amp = 2 * np.abs(f[:9]) / max(float(profile.mean()), 1e-6)
    return amp, float(np.sign(f[4].real))


def _unit_mean_radius(kind: str) -> float:
    spec = ShapeSpec(kind, "red", "centre", "small", (0.0, 0.0), 1.0)
    corners = outlines(spec)[0]
    points = np.linspace(corners, np.roll(corners, -1, axis=0), 50).reshape(-1, 2)
    return float(_radial_profile(points, np.zeros(2)).mean())


#: Mean outline distance from the centroid per unit of radius, per kind (to read size whatever the kind).
_MEAN_RADIUS = {kind: _unit_mean_radius(kind) for kind in SHAPE_KINDS}


def _classify_outline(outline: np.ndarray, hole: bool) -> tuple[str, float]:
    """Shape kind, and radius estimate (canvas-independent pixels of the upsample) from an outline.

    A hole makes a ring; otherwise the strongest of the 3rd (triangle), 4th (square or cross, by phase) and
    5th (star) angular harmonics of the centroid-to-outline distance, or none (circle).
    """
    moments = cv2.moments(outline.astype(np.float32))
    centre = np.array([moments["m10"], moments["m01"]]) / max(moments["m00"], 1e-6)
    profile = _radial_profile(outline, centre)
    amp, phase4 = _harmonics(profile)
    scores = {"triangle": amp[3], "square" if phase4 < 0 else "cross": amp[4], "star": 1.6 * amp[5]}
    kind = max(scores, key=lambda k: scores[k])
    if hole or scores[kind] < _MIN_HARMONIC:
        kind = "ring" if hole else "circle"
    return kind, float(profile.mean()) / _MEAN_RADIUS[kind]


def _position(cx: float, cy: float, w: int, h: int) -> str:
    col, row = min(int(3 * cx / w), 2), min(int(3 * cy / h), 2)
    return _GRID[(col, row)]


def _dominant_component(candidates: np.ndarray) -> tuple[np.ndarray, tuple[slice, slice]] | None:
    """The largest 8-connected component of ``candidates`` (bool H×W) and its bounding box grown by 2 px,
    if it is large enough to be a shape and small enough not to be the background."""
    h, w = candidates.shape
    n, labels, stats, _ = cv2.connectedComponentsWithStats(candidates.astype(np.uint8), connectivity=8)
    if n < 2:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, bw, bh, area = stats[best]
    if not _MIN_AREA * h * w / 4096 <= area <= 0.6 * h * w:
        return None
    box = (slice(max(y - 2, 0), min(y + bh + 2, h)), slice(max(x - 2, 0), min(x + bw + 2, w)))
    return labels == best, box


def _read_region(img: np.ndarray, bg: _Background, free: np.ndarray, d: np.ndarray) -> ShapeReading | None:
    """Read the largest foreground region among the ``free`` pixels, or None if there is none (or noise)."""
    found = _dominant_component(free)
    if found is None:
        return None
    comp, box = found
    core = comp & (d >= 0.75 * np.percentile(d[comp], 95))
    k, residual, voters = _classify_colour(img[core], bg.model[core])
    if residual > _MAX_RESIDUAL or voters.mean() < 0.3:
        return None
    seed = np.zeros_like(core)
    seed[core] = voters
    alpha, _ = _alpha_map(img[box], bg.model[box], k)  # only around the component: the slow step
    grown = cv2.dilate(comp[box].astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    region = np.zeros_like(comp)
    region[box] = _component_with(alpha >= 0.5, seed[box]) & grown
    outline, hole = _outer_contour(np.where(grown, alpha, 0.0).astype(np.float32))
    if region.sum() < 4 or outline is None or len(outline) < 8:
        return None
    kind, radius = _classify_outline(outline, hole)
    ys, xs = np.nonzero(region)
    cx, cy = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
    h, w = d.shape
    size = "large" if radius / _UPSAMPLE > _LARGE_RADIUS * w / 64 else "small"
    return ShapeReading(_NAMES[k], kind, _position(cx, cy, w, h), size, (cx, cy), int(region.sum()), region)


def score_image(image: np.ndarray | Image.Image, max_shapes: int = 2) -> SceneReading:
    """Read an RGB image (PIL, uint8 H×W×3 or float in 0..1): background and up to ``max_shapes`` shapes.

    Noise, clutter or a uniform image give no shapes (and, for noise, no background).
    """
    img = _as_array(image)
    bg = _background(img)
    if bg is None:
        return SceneReading(None, (), "none", ())
    d = np.linalg.norm(img - bg.model, axis=2)
    free = d > _FOREGROUND
    shapes: list[ShapeReading] = []
    for _ in range(max_shapes):
        reading = _read_region(img, bg, free, d)
        if reading is None:
            break
        shapes.append(reading)
        free &= ~cv2.dilate(reading.mask.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    return SceneReading(bg.names[0], bg.names, bg.split, tuple(shapes))


def region_mask_for_colour(image: np.ndarray | Image.Image, colour_name: str) -> np.ndarray:
    """Pixels (bool H×W) closer to the named colour than to the background, as blends of the two, in regions
    that hold some nearly pure pixels of that colour (so the orange-looking halo of a red shape on yellow is
    not an orange region).

    Args:
        image: RGB image.
        colour_name: One of :data:`models.shapes.scenes.COLOURS`.
    """
    img = _as_array(image)
    bg = _background(img)
    model = bg.model if bg is not None else np.broadcast_to(np.median(img.reshape(-1, 3), axis=0), img.shape)
    alpha, best = _alpha_map(img, model, _NAMES.index(colour_name))
    return _component_with(alpha >= 0.5, best & (alpha >= _PURE))


def iou(mask_a: np.ndarray, mask_b: np.ndarray) -> float:
    """Intersection over union of two masks (anything non-zero counts); 1.0 when both are empty."""
    a, b = np.asarray(mask_a).astype(bool), np.asarray(mask_b).astype(bool)
    union = int(np.sum(a | b))
    return 1.0 if union == 0 else int(np.sum(a & b)) / union


def _matches(reading: ShapeReading, spec: ShapeSpec) -> dict[str, bool]:
    return {
        "colour": reading.colour == spec.colour,
        "shape": reading.shape == spec.kind,
        "position": reading.position == spec.position,
        "size": reading.size == spec.size,
    }


def score_against(reading: SceneReading, scene: Scene) -> dict[str, bool]:
    """Which attributes an image reading gets right for a scene: colour, shape, position, size (all of the
    scene's shapes, paired with the largest readings in the order that gets most right), background
    (colours and split) and count (number of shapes)."""
    keys = ("colour", "shape", "position", "size")
    found = reading.shapes[: len(scene.shapes)]
    best = dict.fromkeys(keys, False)
    if len(found) == len(scene.shapes):
        orders = [found] if len(found) < 2 else [found, found[::-1]]
        trials = [[_matches(r, s) for r, s in zip(order, scene.shapes, strict=True)] for order in orders]
        merged = [{k: all(m[k] for m in trial) for k in keys} for trial in trials]
        best = max(merged, key=lambda m: sum(m.values()))
    background = reading.background_colours == scene.background and reading.split == scene.split
    return best | {"background": background, "count": len(reading.shapes) == len(scene.shapes)}


def accuracy(readings: Sequence[SceneReading], scenes: Sequence[Scene]) -> dict[str, float]:
    """Fraction of images right per attribute (the keys of :func:`score_against`)."""
    if len(readings) != len(scenes) or not scenes:
        raise ValueError("accuracy needs as many readings as scenes, and at least one")
    results = [score_against(r, s) for r, s in zip(readings, scenes, strict=True)]
    return {k: sum(r[k] for r in results) / len(results) for k in results[0]}
