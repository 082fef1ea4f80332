"""pipelines.delivery on real PNGs: the format chosen for a limit, sizes, parameters read back, grids."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin
from sd_parsers import ParserManager
from sd_parsers.extractors import Eagerness, _jpeg_usercomment

from pipelines.delivery import JPEG_QUALITIES, TOO_BIG, encode_for_upload, exif_user_comment, grid
from pipelines.pnginfo import format_parameters, png_bytes, read_info
from storage.errors import InvalidRequestError

SIZE = 160


def infotext(seed: int) -> str:
    params = {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7, "Seed": seed, "Size": (SIZE, SIZE)}
    return format_parameters(f"ein Kätzchen, 猫 {seed} 🐈", "blurry, low quality", params)


def noisy_image(seed: int, amplitude: int = 6) -> Image.Image:
    """A gradient plus uniform noise in [-amplitude, amplitude]: about log2(2a+1) bits/channel of entropy."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    base = np.stack([x * 255 / SIZE, y * 255 / SIZE, np.full_like(x, 40 * seed % 255)], -1)
    pixels = base + rng.integers(-amplitude, amplitude + 1, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [noisy_image(seed) for seed in range(1, 5)]


@pytest.fixture(scope="module")
def pngs(images: list[Image.Image]) -> list[bytes]:
    return [png_bytes(image, infotext(seed)) for seed, image in enumerate(images, start=1)]


def decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image


def psnr(a: Image.Image, b: Image.Image) -> float:
    diff = np.asarray(a.convert("RGB"), dtype=np.float64) - np.asarray(b.convert("RGB"), dtype=np.float64)
    return float(10 * np.log10(255**2 / np.mean(diff**2)))


def assert_parameters_kept(files: list[tuple[str, bytes]]) -> None:
    for seed, (_, data) in enumerate(files, start=1):
        info = read_info(data)
        assert info.tool == "AUTOMATIC1111"
        assert info.raw == infotext(seed)
        assert info.prompt == f"ein Kätzchen, 猫 {seed} 🐈"
        assert info.parameters["Seed"] == str(seed)


def test_originals_kept_when_they_fit(pngs: list[bytes]) -> None:
    delivery = encode_for_upload(pngs, sum(map(len, pngs)), stems=["a", "b", "c", "d"])
    assert delivery.format == "png" and delivery.note is None and delivery.jpeg_quality is None
    assert delivery.messages == [list(zip(["a.png", "b.png", "c.png", "d.png"], pngs, strict=True))]


def test_lossless_webp_when_pngs_do_not_fit(pngs: list[bytes], images: list[Image.Image]) -> None:
    raw = 3 * SIZE * SIZE * len(pngs)
    limit = sum(map(len, pngs)) - 1
    assert limit > raw // 2  # a real squeeze: more than any lossless format could ever need here
    delivery = encode_for_upload(pngs, limit)
    assert delivery.format == "webp" and len(delivery.messages) == 1
    assert [name for name, _ in delivery.files] == [f"image-{i}.webp" for i in range(1, 5)]
    assert sum(len(data) for _, data in delivery.files) <= limit
    for (_, data), original in zip(delivery.files, images, strict=True):
        decoded = decode(data)
        assert decoded.format == "WEBP"
        assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(original))
    assert_parameters_kept(delivery.files)
    assert delivery.note is not None and "lossless WebP" in delivery.note and "/history" in delivery.note


def test_jpeg_when_lossless_cannot_fit(pngs: list[bytes], images: list[Image.Image]) -> None:
    # the noise has 13 levels a channel, log2(13) / 8 = 46% of the raw size: no lossless format fits a third
    limit = 3 * SIZE * SIZE * len(pngs) // 3
    delivery = encode_for_upload(pngs, limit)
    assert delivery.format == "jpeg" and len(delivery.messages) == 1
    assert delivery.jpeg_quality in JPEG_QUALITIES
    assert sum(len(data) for _, data in delivery.files) <= limit
    for (name, data), original in zip(delivery.files, images, strict=True):
        decoded = decode(data)
        assert name.endswith(".jpg") and decoded.format == "JPEG"
        assert JpegImagePlugin.get_sampling(decoded) == 0  # 4:4:4
        assert psnr(decoded, original) > 30
    assert_parameters_kept(delivery.files)
    assert delivery.note == (
        "The PNGs were too big for this server's upload limit, so they are sent as JPEG; "
        "the full PNGs and their parameters stay in /history."
    )


def test_jpeg_parameters_read_by_sd_parsers(pngs: list[bytes]) -> None:
    delivery = encode_for_upload(pngs[:1], len(pngs[0]) // 3)
    assert delivery.format == "jpeg" and delivery.note is not None and delivery.note.startswith("The PNG was")
    _jpeg_usercomment._image_id = None  # sd-parsers caches its EXIF read by id(image)
    parser = ParserManager(normalize_parameters=False)
    info = parser.parse(io.BytesIO(delivery.files[0][1]), eagerness=Eagerness.EAGER)
    assert info is not None and info.generator == "AUTOMATIC1111"
    assert info.full_prompt == "ein Kätzchen, 猫 1 🐈"
    assert info.full_negative_prompt == "blurry, low quality"


def test_highest_quality_that_fits_is_chosen(pngs: list[bytes]) -> None:
    one = pngs[:1]
    sizes = {}
    for quality in JPEG_QUALITIES:
        out = io.BytesIO()
        decode(one[0]).save(out, "JPEG", quality=quality, subsampling=0, optimize=True)
        sizes[quality] = len(out.getvalue())
    header = len(exif_user_comment(infotext(1))) + 64  # the EXIF segment and its markers, with room to spare
    # a limit between the 90 and 95 sizes: 95 cannot fit, 90 can
    limit = sizes[90] + header
    assert limit < sizes[95]
    delivery = encode_for_upload(one, limit)
    assert (delivery.format, delivery.jpeg_quality) == ("jpeg", 90)


def test_split_across_messages_when_one_message_cannot_hold_them(pngs: list[bytes]) -> None:
    floor = JPEG_QUALITIES[-1]
    out = io.BytesIO()
    decode(pngs[0]).save(out, "JPEG", quality=floor, subsampling=0)
    limit = int(len(out.getvalue()) * 1.6)  # one floor JPEG fits a message, two do not
    delivery = encode_for_upload(pngs, limit)
    assert delivery.format == "jpeg" and len(delivery.messages) == 4
    assert all(len(message) == 1 and len(message[0][1]) <= limit for message in delivery.messages)
    assert [name for name, _ in delivery.files] == [f"image-{i}.jpg" for i in range(1, 5)]
    assert delivery.note is not None and "in 4 messages" in delivery.note
    assert_parameters_kept(delivery.files)


def test_png_split_by_attachment_count(pngs: list[bytes]) -> None:
    delivery = encode_for_upload(pngs, sum(map(len, pngs)), max_files_per_message=3)
    assert delivery.format == "png"
    assert [len(message) for message in delivery.messages] == [3, 1]
    assert [data for _, data in delivery.files] == pngs
    assert delivery.note is not None and "2 messages" in delivery.note


def test_too_big_even_as_jpeg_is_reported(pngs: list[bytes]) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        encode_for_upload(pngs, 2000)
    assert str(caught.value) == TOO_BIG


def test_parameters_too_long_for_jpeg_exif_go_in_a_comment(images: list[Image.Image]) -> None:
    """EXIF must fit one 64 KiB JPEG segment: 40 000 characters take 80 000 bytes as UTF-16, not as UTF-8."""
    params = {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7, "Seed": 1, "Size": (SIZE, SIZE)}
    text = format_parameters("a long prompt, " * 2700, "", params)
    assert 40_000 < len(text) < 65_000
    png = png_bytes(images[0], text)
    delivery = encode_for_upload([png], 3 * SIZE * SIZE // 3 + len(text))  # no lossless format fits
    assert delivery.format == "jpeg"
    data = delivery.files[0][1]
    assert decode(data).info.get("comment") == text.encode()
    assert read_info(data).raw == text


def test_user_comment_is_byte_identical_to_the_webui(fixtures_dir: Path) -> None:
    """Ours encodes like a real webui JPEG: ``UNICODE\\0`` + UTF-16-BE, in big-endian EXIF."""
    with Image.open(fixtures_dir / "pnginfo" / "parsers__AUTOMATIC1111__automatic1111_cropped.jpg") as real:
        real_exif = real.getexif()
        raw = real_exif.get_ifd(0x8769)[0x9286]
    text = raw[8:].decode("utf-16-be")
    ours = Image.Exif()
    ours.load(exif_user_comment(text))
    assert ours.get_ifd(0x8769)[0x9286] == raw
    assert ours.endian == real_exif.endian == ">"


def test_rgba_and_palette_pngs_encode() -> None:
    rgba = noisy_image(7).convert("RGBA")
    rgba.putalpha(200)
    palette = noisy_image(8).quantize(64)
    pngs = [png_bytes(rgba, infotext(1)), png_bytes(palette, infotext(2))]
    webp = encode_for_upload(pngs, sum(map(len, pngs)) - 1)
    assert webp.format == "webp"
    assert decode(webp.files[0][1]).mode == "RGBA"
    decoded = decode(webp.files[1][1]).convert("RGB")
    assert np.array_equal(np.asarray(decoded), np.asarray(palette.convert("RGB")))
    jpeg = encode_for_upload(pngs, 3 * SIZE * SIZE * 2 // 4)
    assert jpeg.format == "jpeg"
    assert_parameters_kept(jpeg.files)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        encode_for_upload([], 1000)
    with pytest.raises(ValueError):
        encode_for_upload([b"x"], 0)
    with pytest.raises(ValueError):
        encode_for_upload([b"x", b"y"], 1000, stems=["one"])


# --- grid ---------------------------------------------------------------------------------------------


def solid(color: tuple[int, int, int], size: tuple[int, int] = (30, 20)) -> Image.Image:
    return Image.new("RGB", size, color)


COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


@pytest.mark.parametrize(
    ("count", "columns", "rows"), [(1, 1, 1), (2, 2, 1), (3, 2, 2), (4, 2, 2), (5, 3, 2), (9, 3, 3)]
)
def test_grid_layout(count: int, columns: int, rows: int) -> None:
    colors = [COLORS[i % len(COLORS)] for i in range(count)]
    out = grid([solid(color) for color in colors])
    assert out.size == (30 * columns, 20 * rows) and out.mode == "RGB"
    for index, color in enumerate(colors):
        row, column = divmod(index, columns)
        assert out.getpixel((column * 30 + 15, row * 20 + 10)) == color
    for index in range(count, columns * rows):  # empty cells
        row, column = divmod(index, columns)
        assert out.getpixel((column * 30 + 15, row * 20 + 10)) == (0, 0, 0)


def test_grid_three_leaves_bottom_right_empty() -> None:
    out = grid([solid(c) for c in COLORS[:3]], background=(9, 9, 9))
    assert out.size == (60, 40)
    corners = [out.getpixel(p) for p in [(0, 0), (59, 0), (0, 39), (59, 39)]]
    assert corners == [*COLORS[:3], (9, 9, 9)]


def test_grid_centres_smaller_images_and_keeps_alpha() -> None:
    small = Image.new("RGBA", (10, 10), (255, 0, 0, 128))
    out = grid([solid((0, 255, 0)), small])
    assert out.size == (60, 20) and out.mode == "RGBA"
    assert out.getpixel((45, 10)) == (255, 0, 0, 128)  # centre of the second cell
    assert out.getpixel((31, 1)) == (0, 0, 0, 0)  # outside the small image: transparent
    assert out.getpixel((0, 0)) == (0, 255, 0, 255)


def test_grid_needs_images() -> None:
    with pytest.raises(ValueError):
        grid([])
