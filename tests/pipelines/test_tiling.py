"""Tiles cover the image and blend back exactly for pixel-wise models, smoothly for any other."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.tiling import axis_starts, plan_tiles, run_tiled, tile_weights


def _nearest(scale: int):  # type: ignore[no-untyped-def]
    def fn(piece: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(piece, scale, axis=0), scale, axis=1)

    return fn


@pytest.mark.parametrize(
    ("length", "tile", "overlap", "multiple"),
    [(100, 32, 8, 1), (97, 40, 12, 1), (64, 64, 8, 1), (30, 64, 8, 1), (256, 64, 16, 8), (136, 128, 16, 8)],
)
def test_starts_cover_the_axis_with_at_least_the_overlap(
    length: int, tile: int, overlap: int, multiple: int
) -> None:
    starts = axis_starts(length, tile, overlap, multiple)
    size = min(length, tile)
    assert starts[0] == 0 and starts[-1] + size == length
    assert all(s % multiple == 0 for s in starts)
    for a, b in zip(starts, starts[1:], strict=False):
        assert b > a and a + size - b >= overlap  # neighbours share at least `overlap` pixels
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + size] = True
    assert covered.all()


def test_a_small_image_is_one_tile_of_its_own_size() -> None:
    tiles = plan_tiles(50, 40, 64, 8)
    assert [(t.x, t.y, t.width, t.height) for t in tiles] == [(0, 0, 50, 40)]


def test_a_grid_is_row_major_with_equal_tiles() -> None:
    tiles = plan_tiles(100, 60, 40, 10)
    assert {(t.width, t.height) for t in tiles} == {(40, 40)}
    assert [(t.column, t.row) for t in tiles[:4]] == [(0, 0), (1, 0), (2, 0), (0, 1)]
    assert max(t.x + t.width for t in tiles) == 100 and max(t.y + t.height for t in tiles) == 60


@pytest.mark.parametrize(("tile", "overlap", "multiple"), [(0, 0, 1), (16, 16, 1), (16, 20, 1), (12, 4, 8)])
def test_impossible_tilings_are_refused(tile: int, overlap: int, multiple: int) -> None:
    with pytest.raises(ValueError):
        axis_starts(64, tile, overlap, multiple)


def test_a_misaligned_length_is_refused() -> None:
    with pytest.raises(ValueError):
        axis_starts(65, 32, 8, multiple=8)


@pytest.mark.parametrize("scale", [1, 2, 4])
@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap"),
    [(70, 53, 24, 6), (64, 64, 32, 8), (33, 90, 16, 5), (64, 48, 16, 0)],
)
def test_a_pixelwise_model_tiled_equals_untiled(
    height: int, width: int, tile: int, overlap: int, scale: int
) -> None:
    image = np.random.default_rng(height * width).random((height, width, 3)).astype(np.float32)
    calls: list[tuple[int, int]] = []
    tiled = run_tiled(
        image,
        _nearest(scale),
        scale=scale,
        tile=tile,
        overlap=overlap,
        on_tile=lambda d, t: calls.append((d, t)),
    )
    untiled = _nearest(scale)(image)
    assert tiled.shape == untiled.shape == (height * scale, width * scale, 3)
    np.testing.assert_allclose(tiled, untiled, atol=1e-6, rtol=0)
    count = len(plan_tiles(width, height, tile, overlap))
    assert count > 1 and calls == [(i, count) for i in range(1, count + 1)]


def test_weights_of_neighbours_add_up_to_one_across_every_overlap() -> None:
    xs, ys = axis_starts(100, 40, 10), axis_starts(60, 40, 10)
    tiles = plan_tiles(100, 60, 40, 10)
    total = np.zeros((120, 200))
    for t in tiles:
        w = tile_weights(xs, ys, t, 2)
        assert w.min() > 0 and w.max() <= 1
        total[t.y * 2 : (t.y + t.height) * 2, t.x * 2 : (t.x + t.width) * 2] += w
    np.testing.assert_allclose(total, 1.0, atol=1e-12)


def test_disagreeing_tiles_cross_fade_instead_of_meeting_at_a_seam() -> None:
    """Each tile returns a constant (its index): across the overlap the result ramps evenly, no jump."""
    image = np.zeros((16, 64, 1), np.float32)
    counter = iter(range(10))

    def constant(piece: np.ndarray) -> np.ndarray:
        return np.full(piece.shape, float(next(counter)), np.float32)

    out = run_tiled(image, constant, scale=1, tile=40, overlap=16)
    row = out[0, :, 0]
    assert axis_starts(64, 40, 16) == [0, 24]  # overlap: columns 24..39
    np.testing.assert_array_equal(row[:24], 0.0)
    np.testing.assert_array_equal(row[40:], 1.0)
    steps = np.diff(row)
    assert steps.min() >= 0 and steps.max() <= 1 / 16 + 1e-6  # 16 even steps instead of one seam
    assert np.all(out == out[:1])


def test_a_model_of_the_wrong_scale_is_caught() -> None:
    with pytest.raises(ValueError):
        run_tiled(np.zeros((32, 32, 3), np.float32), _nearest(2), scale=4, tile=16, overlap=4)
