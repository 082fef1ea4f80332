"""Untrusted input images: each bad kind gets one sentence; odd but valid ones are normalised and said."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipelines.images import MAX_PIXELS, ResizeMode, load_image, resize_to
from storage.errors import InvalidRequestError


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1×1 PNG whose header claims another size (CRC fixed), as a bomb would."""
    data = bytearray(_encode(Image.new("RGB", (1, 1))))
    ihdr = data[12:29]
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty"),
        (b"hello, not an image", "not an image"),
        (_encode(Image.new("RGB", (64, 64), "red"))[:80], "damaged or cut short"),
        (_png_claiming(5000, 5000), "5000×5000"),  # over our limit: refused from the header alone
        (_png_claiming(20000, 20000), "far too large"),  # over Pillow's bomb limit: refused by Pillow
        (_encode(Image.new("RGB", (1, 1))), "only 1×1"),
    ],
)
def test_bad_images_get_one_sentence(data: bytes, fragment: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        load_image(data)
    assert fragment in str(info.value) and str(info.value).endswith(".")


def test_limit_is_what_the_message_says() -> None:
    assert MAX_PIXELS == 4096 * 4096
    assert load_image(_encode(Image.new("RGB", (4096, 16)))).image.size == (4096, 16)


def test_animated_gif_keeps_its_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue")]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    loaded = load_image(data)
    assert loaded.image.getpixel((8, 8))[0] > 200 and "first frame" in " ".join(loaded.notes)


def test_exif_rotation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), "white")
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    loaded = load_image(_encode(image, "JPEG", exif=exif, quality=95))
    assert loaded.image.size == (20, 40)
    assert loaded.image.getpixel((10, 2))[0] > 200 and loaded.image.getpixel((10, 2))[1] < 80  # now on top
    assert "orientation" in " ".join(loaded.notes)


def test_alpha_is_flattened_or_kept() -> None:
    image = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    flattened = load_image(_encode(image))
    assert flattened.image.mode == "RGB" and flattened.image.getpixel((0, 0)) == (255, 255, 255)
    assert flattened.had_alpha and "transparency" in " ".join(flattened.notes)
    kept = load_image(_encode(image), keep_alpha=True)
    assert kept.image.mode == "RGBA" and kept.image.getpixel((0, 0))[3] == 0


def test_palette_greyscale_16bit_and_cmyk_become_rgb() -> None:
    palette = Image.new("RGB", (16, 16), "green").convert("P")
    assert load_image(_encode(palette)).image.getpixel((0, 0))[1] > 100
    grey16 = Image.fromarray(np.full((16, 16), 65535 // 2, dtype=np.uint16))
    loaded16 = load_image(_encode(grey16))
    assert loaded16.image.mode == "RGB" and abs(loaded16.image.getpixel((0, 0))[0] - 128) <= 1
    assert "8 bits" in " ".join(loaded16.notes)
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    loaded_cmyk = load_image(_encode(cmyk, "JPEG"))
    assert loaded_cmyk.image.mode == "RGB" and loaded_cmyk.image.getpixel((8, 8))[0] > 200
    assert "CMYK" in " ".join(loaded_cmyk.notes)


def _wide_with_centre_mark() -> Image.Image:
    image = Image.new("RGB", (200, 100), "blue")
    image.paste((255, 0, 0), (90, 40, 110, 60))
    image.paste((0, 255, 0), (0, 0, 20, 100))  # green band on the far left
    return image


def test_resize_modes() -> None:
    image = _wide_with_centre_mark()
    crop = resize_to(image, 64, 64, ResizeMode.crop)
    assert crop.size == (64, 64) and crop.getpixel((32, 32)) == (255, 0, 0)
    assert crop.getpixel((1, 32))[1] < 100  # the green left band was cut away
    fit = resize_to(image, 64, 64, ResizeMode.fit)
    assert fit.size == (64, 64) and fit.getpixel((1, 32))[1] > 200  # stretched: the band is still there
    fill = resize_to(image, 64, 64, ResizeMode.fill)
    assert fill.size == (64, 64) and fill.getpixel((32, 32))[0] > 200
    assert fill.getpixel((40, 0)) == fill.getpixel((40, 15))  # top rows extend the scaled image's edge
