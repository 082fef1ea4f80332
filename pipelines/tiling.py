"""Run an image model tile by tile and blend the tiles back without seams.

Large images are cut into a grid of equal, overlapping tiles (the first flush with the top-left corner, the
last flush with the bottom-right one, the rest spread evenly between). Each tile's output is weighted by a
linear ramp across every overlap it shares with a neighbour, falling to nearly zero at the tile's inner
edges, where a convolutional model sees padding instead of the image; the weighted sum is divided by the
summed weights. A model that acts pixel by pixel (identity, nearest-neighbour) therefore gives exactly
the untiled result, and any other model a smooth cross-fade instead of a seam.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["Tile", "TileFn", "TileHook", "axis_starts", "plan_tiles", "run_tiled", "tile_weights"]

#: A model on one tile: float32 H×W×C in, float32 (H·scale)×(W·scale)×C out.
TileFn = Callable[[np.ndarray], np.ndarray]
#: Called after each tile with (tiles done, tiles in all).
TileHook = Callable[[int, int], None]


@dataclass(frozen=True)
class Tile:
    """One tile, in input pixels; ``column``/``row`` index the grid."""

    x: int
    y: int
    width: int
    height: int
    column: int
    row: int


def axis_starts(length: int, tile: int, overlap: int, multiple: int = 1) -> list[int]:
    """Start offsets of equal tiles along one axis: ``[0]`` when one tile covers ``length``.

    Args:
        length: Pixels along the axis (a multiple of ``multiple``).
        tile: Tile size in pixels (rounded down to a multiple of ``multiple``).
        overlap: The least overlap between neighbours, pixels (rounded up to a multiple of ``multiple``).
        multiple: Every start and size is a multiple of this (a model's size granularity).

    Raises:
        ValueError: sizes that cannot tile (overlap not smaller than the tile, misaligned length).
    """
    if multiple < 1 or length < 1 or length % multiple:
        raise ValueError(f"length {length} must be a positive multiple of {multiple}")
    units, tile_units = length // multiple, tile // multiple
    overlap_units = -(-overlap // multiple)
    if tile_units < 1 or overlap_units < 0 or overlap_units >= tile_units:
        raise ValueError(f"tile {tile} must exceed the overlap {overlap} by at least {multiple}")
    if units <= tile_units:
        return [0]
    count = math.ceil((units - overlap_units) / (tile_units - overlap_units))
    span = units - tile_units  # where the last tile starts
    return [(i * span // (count - 1)) * multiple for i in range(count)]


def plan_tiles(width: int, height: int, tile: int, overlap: int, multiple: int = 1) -> list[Tile]:
    """The grid of tiles covering a ``width``×``height`` image, row by row (see :func:`axis_starts`)."""
    xs = axis_starts(width, tile, overlap, multiple)
    ys = axis_starts(height, tile, overlap, multiple)
    tile_w = width if len(xs) == 1 else tile // multiple * multiple
    tile_h = height if len(ys) == 1 else tile // multiple * multiple
    return [Tile(x, y, tile_w, tile_h, col, row) for row, y in enumerate(ys) for col, x in enumerate(xs)]


def _axis_ramp(starts: list[int], index: int, size: int, scale: int) -> np.ndarray:
    """Weights along one axis of tile ``index``, in output pixels: linear ramps over its overlaps."""
    out = size * scale
    weight = np.ones(out, dtype=np.float64)
    position = np.arange(out, dtype=np.float64) + 0.5
    if index > 0:
        shared = (starts[index - 1] + size - starts[index]) * scale
        if shared > 0:  # tiles cut without overlap meet edge to edge
            weight *= np.clip(position / shared, 0.0, 1.0)
    if index < len(starts) - 1:
        shared = (starts[index] + size - starts[index + 1]) * scale
        if shared > 0:
            weight *= np.clip((out - position) / shared, 0.0, 1.0)
    return weight


def tile_weights(xs: list[int], ys: list[int], tile: Tile, scale: int) -> np.ndarray:
    """The blend weight of every output pixel of ``tile``, (H·scale)×(W·scale), all above zero.

    Across each overlap of two neighbours the two ramps add up to one.
    """
    wy = _axis_ramp(ys, tile.row, tile.height, scale)
    wx = _axis_ramp(xs, tile.column, tile.width, scale)
    return np.outer(wy, wx)


def run_tiled(
    image: np.ndarray,
    fn: TileFn,
    *,
    scale: int,
    tile: int,
    overlap: int,
    multiple: int = 1,
    on_tile: TileHook | None = None,
) -> np.ndarray:
    """``fn`` over ``image`` (H×W×C), tile by tile, blended: an (H·scale)×(W·scale)×C float32 array.

    Args:
        image: The input; its sides must be multiples of ``multiple``.
        fn: The model on one tile; it must return exactly ``scale`` times the tile's size.
        scale: Output pixels per input pixel (an integer factor).
        tile: Tile side, input pixels; an image no larger than this runs in one piece.
        overlap: The least overlap of neighbouring tiles, input pixels.
        multiple: Tile sizes and offsets are multiples of this.
        on_tile: Progress, called after each tile.
    """
    height, width = image.shape[:2]
    xs = axis_starts(width, tile, overlap, multiple)
    ys = axis_starts(height, tile, overlap, multiple)
    tiles = plan_tiles(width, height, tile, overlap, multiple)
    if len(tiles) == 1:
        result = np.asarray(fn(image), dtype=np.float32)
        _check_output(result, image.shape, scale)
        if on_tile is not None:
            on_tile(1, 1)
        return result
    total: np.ndarray | None = None  # float32 accumulators: a 16-megapixel output needs 256 MB, not 512
    weights = np.zeros((height * scale, width * scale, 1), dtype=np.float32)
    for done, t in enumerate(tiles, start=1):
        piece = image[t.y : t.y + t.height, t.x : t.x + t.width]
        out = np.asarray(fn(piece), dtype=np.float32)
        _check_output(out, piece.shape, scale)
        if total is None:
            total = np.zeros((height * scale, width * scale, out.shape[2]), dtype=np.float32)
        w = tile_weights(xs, ys, t, scale).astype(np.float32)[:, :, None]
        rows = slice(t.y * scale, (t.y + t.height) * scale)
        cols = slice(t.x * scale, (t.x + t.width) * scale)
        total[rows, cols] += out * w
        weights[rows, cols] += w
        if on_tile is not None:
            on_tile(done, len(tiles))
    assert total is not None
    total /= weights
    return total


def _check_output(out: np.ndarray, shape: tuple[int, ...], scale: int) -> None:
    expected = (shape[0] * scale, shape[1] * scale)
    if out.ndim != 3 or out.shape[:2] != expected:
        raise ValueError(f"a tile of {shape[:2]} gave {out.shape}, not {expected} at scale {scale}")
