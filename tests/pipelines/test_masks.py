"""Mask helpers: the webui's binarise, blur, "only masked" box and paste-back, and the latent-cell mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from pipelines.masks import (
    binarise,
    blur,
    blur_kernel_size,
    composite,
    dilate,
    expand_to_ratio,
    is_empty,
    latent_aligned,
    mask_box,
    only_masked_box,
    overlay_alpha,
    paste_back,
)


def _mask(size: tuple[int, int], *boxes: tuple[int, int, int, int]) -> Image.Image:
    """An ``L`` mask (width, height) white inside each (left, top, right, bottom) box."""
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    for left, top, right, bottom in boxes:
        array[top:bottom, left:right] = 255
    return Image.fromarray(array, "L")


def test_binarise_repaints_where_at_least_half_white() -> None:
    ramp = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    out = np.asarray(binarise(Image.fromarray(ramp, "L")))
    assert set(np.unique(out)) == {0, 255}
    assert (out[:, :128] == 0).all() and (out[:, 128:] == 255).all()
    assert is_empty(Image.fromarray(np.full((8, 8), 127, np.uint8), "L"))
    assert not is_empty(Image.fromarray(np.full((8, 8), 128, np.uint8), "L"))


@pytest.mark.parametrize(("radius", "size"), [(1, 7), (4, 21), (8, 41), (64, 321)])
def test_blur_kernel_is_the_webuis(radius: int, size: int) -> None:
    # webui: kernel_size = 2 * int(2.5 * blur + 0.5) + 1, worked out by hand for each row
    assert blur_kernel_size(radius) == size


def test_blur_is_a_gaussian_of_sigma_radius() -> None:
    impulse = np.zeros((61, 61), dtype=np.uint8)
    impulse[30, 30] = 255
    out = np.asarray(blur(Image.fromarray(impulse, "L"), 1), dtype=np.float64)
    taps = np.arange(-3, 4)  # kernel 7 for sigma 1
    g = np.exp(-(taps**2) / 2.0)
    expected = 255 * np.outer(g, g) / g.sum() ** 2
    np.testing.assert_allclose(out[27:34, 27:34], expected, atol=1.0)
    out[27:34, 27:34] = 0
    assert not out.any(), "the blur reaches beyond its kernel"
    same = np.asarray(blur(Image.fromarray(impulse, "L"), 0))
    np.testing.assert_array_equal(same, impulse)


def test_overlay_alpha_covers_the_painted_area_and_fades_outside() -> None:
    mask = _mask((64, 64), (20, 20, 40, 40))
    alpha = overlay_alpha(mask, 4)
    painted = np.asarray(mask) > 0
    assert alpha.dtype == np.float32 and alpha.min() >= 0 and alpha.max() <= 1
    assert (alpha[painted] == 1.0).all()
    reach = blur_kernel_size(4) // 2  # 10 px
    far = np.ones_like(painted)
    far[20 - reach : 40 + reach, 20 - reach : 40 + reach] = False
    assert (alpha[far] == 0).all()
    band = alpha[~painted & ~far]
    assert ((band > 0) & (band < 1)).any()
    # the blend falls outside the painted area: a pixel next to it still takes most of the new image
    assert 0.5 < alpha[30, 41] < 1.0 and alpha[30, 41] > alpha[30, 45] > 0
    np.testing.assert_array_equal(overlay_alpha(mask, 0), painted.astype(np.float32))


def test_overlay_alpha_is_one_on_thin_strokes_and_corners() -> None:
    line = _mask((64, 64), (10, 30, 50, 31))  # 1 px high: blurred alone it would be about 0.1
    alpha = overlay_alpha(line, 4)
    assert (alpha[30, 10:50] == 1.0).all()
    assert alpha[29, 30] < 0.5 and alpha[34, 30] > 0


def test_overlay_alpha_of_a_grey_mask_uses_its_binary_form() -> None:
    grey = Image.fromarray(np.full((16, 16), 200, np.uint8), "L")
    assert (overlay_alpha(grey, 0) == 1).all()
    assert (overlay_alpha(Image.fromarray(np.full((16, 16), 100, np.uint8), "L"), 2) == 0).all()


def _diffusers_latent_mask(mask: Image.Image) -> np.ndarray:
    """What diffusers' inpaint pipelines do to a mask: binarise at 0.5, nearest-downsample by 8."""
    processor = VaeImageProcessor(
        vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )
    tensor = processor.preprocess(mask, height=mask.height, width=mask.width)
    small = torch.nn.functional.interpolate(tensor, size=(mask.height // 8, mask.width // 8))
    return small[0, 0].numpy() > 0.5


def test_latent_aligned_mask_keeps_a_speck_diffusers_would_drop() -> None:
    speck = _mask((64, 64), (13, 21, 15, 23))  # 2×2 pixels, away from any cell's sampled corner
    assert not _diffusers_latent_mask(speck).any()  # the reason latent_aligned exists
    aligned = np.asarray(latent_aligned(speck, 8)) > 0
    expected = np.zeros((64, 64), dtype=bool)
    expected[16:24, 8:16] = True  # the speck's cell: rows 16-23 (y 21, 22), columns 8-15 (x 13, 14)
    np.testing.assert_array_equal(aligned, expected)
    cells = _diffusers_latent_mask(latent_aligned(speck, 8))
    assert cells.sum() == 1 and cells[2, 1]


def test_latent_aligned_covers_the_mask_at_any_size() -> None:
    mask = _mask((20, 12), (17, 9, 20, 12))
    aligned = np.asarray(latent_aligned(mask, 8))
    assert aligned.shape == (12, 20)
    assert (aligned[np.asarray(mask) > 0] == 255).all()
    assert (aligned[8:, 16:] == 255).all() and not aligned[:8].any() and not aligned[:, :16].any()


def test_mask_box_grows_by_padding_and_stays_inside() -> None:
    assert mask_box(_mask((64, 64))) is None
    assert mask_box(_mask((64, 48), (10, 5, 20, 30))) == (10, 5, 20, 30)
    assert mask_box(_mask((64, 48), (10, 5, 20, 30)), 8) == (2, 0, 28, 38)
    assert mask_box(_mask((64, 48), (50, 40, 64, 48)), 32) == (18, 8, 64, 48)


@pytest.mark.parametrize(
    ("box", "target", "image", "expected"),
    [
        # 20×5 to square: the height grows by 15 about the middle (7 above, 8 below)
        ((10, 20, 30, 25), (64, 64), (64, 64), (10, 13, 30, 33)),
        # 40×10 at the bottom border to square: grown to 40 tall, shifted up to stay inside
        ((0, 54, 40, 64), (64, 64), (64, 64), (0, 24, 40, 64)),
        # 10×40 at the left border to 2:1: 80 wide does not fit in 64, so the whole width
        ((0, 0, 10, 40), (128, 64), (64, 64), (0, 0, 64, 40)),
        # already the ratio: unchanged
        ((8, 8, 40, 24), (128, 64), (64, 64), (8, 8, 40, 24)),
    ],
)
def test_expand_to_ratio_cases(
    box: tuple[int, int, int, int],
    target: tuple[int, int],
    image: tuple[int, int],
    expected: tuple[int, int, int, int],
) -> None:
    assert expand_to_ratio(box, *target, image) == expected


@st.composite
def _boxes(draw: st.DrawFn) -> tuple[tuple[int, int, int, int], tuple[int, int], tuple[int, int]]:
    width, height = draw(st.integers(8, 300)), draw(st.integers(8, 300))
    left, top = draw(st.integers(0, width - 1)), draw(st.integers(0, height - 1))
    right, bottom = draw(st.integers(left + 1, width)), draw(st.integers(top + 1, height))
    target = (draw(st.integers(1, 32)) * 8, draw(st.integers(1, 32)) * 8)
    return (left, top, right, bottom), target, (width, height)


@given(_boxes())
def test_expand_to_ratio_contains_the_box_fits_the_image_and_matches_the_ratio(
    case: tuple[tuple[int, int, int, int], tuple[int, int], tuple[int, int]],
) -> None:
    box, (tw, th), (width, height) = case
    left, top, right, bottom = expand_to_ratio(box, tw, th, (width, height))
    assert 0 <= left <= box[0] and 0 <= top <= box[1]
    assert box[2] <= right <= width and box[3] <= bottom <= height
    w, h = right - left, bottom - top
    bw, bh = box[2] - box[0], box[3] - box[1]
    if bw * th > bh * tw:  # only the height may grow
        assert (left, right) == (box[0], box[2])
        assert h == height or abs(h - bw * th / tw) <= 0.5
    else:
        assert (top, bottom) == (box[1], box[3])
        assert w == width or abs(w - bh * tw / th) <= 0.5


def test_only_masked_box_holds_the_whole_blend_and_the_padding() -> None:
    alpha = overlay_alpha(_mask((64, 64), (0, 0, 6, 4)), 2)  # touching the top-left corner
    box = only_masked_box(alpha, 3, 64, 32)
    assert box is not None
    left, top, right, bottom = box
    rows, cols = np.nonzero(alpha)
    assert (left, top) == (0, 0)
    assert right >= cols.max() + 1 + 3 and bottom >= rows.max() + 1 + 3
    assert (right - left) == 2 * (bottom - top)  # 64:32
    assert only_masked_box(np.zeros((8, 8), np.float32), 4, 8, 8) is None


def test_composite_blends_by_alpha() -> None:
    original = Image.new("RGB", (4, 1), (200, 100, 0))
    generated = Image.new("RGB", (4, 1), (0, 100, 200))
    alpha = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    out = np.asarray(composite(original, generated, alpha)).astype(int)
    np.testing.assert_array_equal(out[0, :, 0], [200, 150, 100, 0])
    np.testing.assert_array_equal(out[0, :, 2], [0, 50, 100, 200])
    assert (out[0, :, 1] == 100).all()


def test_paste_back_into_a_box_keeps_everything_outside_the_alpha() -> None:
    rng = np.random.default_rng(0)
    original = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    generated = Image.new("RGB", (64, 64), (255, 0, 0))  # the 32×32 box, generated at 64×64
    alpha = np.zeros((64, 64), np.float32)
    alpha[20:30, 20:30] = 1.0
    alpha[30:34, 20:30] = 0.5
    out = np.asarray(paste_back(original, generated, alpha, (16, 16, 48, 48))).astype(int)
    before = np.asarray(original).astype(int)
    outside = alpha == 0
    np.testing.assert_array_equal(out[outside], before[outside])
    assert (out[20:30, 20:30] == [255, 0, 0]).all()
    np.testing.assert_allclose(out[30:34, 20:30], (before[30:34, 20:30] + [255, 0, 0]) / 2, atol=0.51)


def test_paste_back_whole_image() -> None:
    original = Image.new("RGB", (16, 8), (10, 20, 30))
    generated = Image.new("RGB", (16, 8), (90, 80, 70))
    alpha = np.zeros((8, 16), np.float32)
    alpha[:, 8:] = 1
    out = np.asarray(paste_back(original, generated, alpha))
    assert (out[:, :8] == [10, 20, 30]).all() and (out[:, 8:] == [90, 80, 70]).all()


def test_dilate_grows_by_the_given_pixels() -> None:
    point = _mask((21, 21), (10, 10, 11, 11))
    grown = np.asarray(dilate(point, 3)) > 0
    yy, xx = np.mgrid[:21, :21]
    distance = np.hypot(xx - 10, yy - 10)
    assert grown[distance <= 3].all()
    assert not grown[distance > 3 * np.sqrt(2)].any()
    np.testing.assert_array_equal(np.asarray(dilate(point, 0)), np.asarray(point))
