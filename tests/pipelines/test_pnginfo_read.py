"""pipelines.pnginfo on untrusted input: refusals, bounded work, and nothing but InvalidRequestError."""

from __future__ import annotations

import io
import json
import re
import struct
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipelines.pnginfo import ImageInfo, format_parameters, parse_parameters, png_bytes, read_info
from storage.errors import InvalidRequestError


def png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, world", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBP", b"GIF89a"],
)
def test_non_images_raise_invalid_request(data: bytes) -> None:
    with pytest.raises(InvalidRequestError):
        read_info(data)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused(fmt: str) -> None:
    out = io.BytesIO()
    Image.new("RGB", (4, 4)).save(out, format=fmt)
    with pytest.raises(InvalidRequestError, match="PNG, JPEG or WebP"):
        read_info(out.getvalue())


def test_decompression_bomb_limit_stays_on() -> None:
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
    data = b"\x89PNG\r\n\x1a\n" + ihdr + png_chunk(b"IDAT", zlib.compress(b"\0")) + png_chunk(b"IEND", b"")
    with pytest.raises(InvalidRequestError, match="too many pixels"):
        read_info(data)
    assert Image.MAX_IMAGE_PIXELS is not None


# the webui's own regex (modules/infotext_utils.py), the reference for how the settings line splits
WEBUI_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def webui_params(last_line: str) -> dict[str, str]:
    """parse_generation_parameters' loop over re_param matches, with its unquote()."""
    res = {}
    for k, v in WEBUI_RE_PARAM.findall(last_line):
        if not v:  # v[0] raises IndexError there, and the pair is skipped
            continue
        if v[0] == '"' and v[-1] == '"':
            try:
                v = json.loads(v)
            except ValueError:
                pass
        res[k] = v
    return res


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.lists(
        st.sampled_from(["Steps", "a b", ":", ": ", ",", ", ", '"', "\\", "-", "/", " ", "\t", "é", "x"])
    )
)
def test_settings_line_splits_like_the_webui_regex(parts: list[str]) -> None:
    line = "".join(parts)
    expected = webui_params(line) if len(WEBUI_RE_PARAM.findall(line)) >= 3 else {}
    assert parse_parameters("prompt\n" + line)[2] == expected


def test_settings_line_parsing_is_linear() -> None:
    # re.findall(re_param) needs minutes on this (it rescans the run from every position)
    started = time.monotonic()
    assert parse_parameters("p\n" + "a" * 400_000) == ("p\n" + "a" * 400_000, "", {})
    assert time.monotonic() - started < 5


# --- never anything but InvalidRequestError ----------------------------------------------------------


SEED_NAMES = [
    "parsers__AUTOMATIC1111__automatic1111_cropped.jpg",
    "parsers__ComfyUI__img2img_cropped.png",
    "parsers__AUTOMATIC1111__automatic1111_stealth.png",
    "bad_images__text_after_idat.png",
    "parsers__InvokeAI__invokeai_sdmeta1.png",
    "parsers__NovelAI__novelai1_cropped.png",
]
HYPOTHESIS = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture(scope="module")
def seed_files(fixtures_dir: Path) -> list[bytes]:
    """Valid files to mutate: real ones, plus our own PNG and a WebP with an EXIF UserComment."""
    files = [(fixtures_dir / "pnginfo" / name).read_bytes() for name in SEED_NAMES]
    text = format_parameters("p", "n", {"Steps": 1, "Sampler": "Euler", "Seed": 2})
    files.append(png_bytes(Image.new("RGB", (4, 4)), text))
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")
    webp = io.BytesIO()
    Image.new("RGB", (8, 8)).save(webp, format="WEBP", exif=exif)
    files.append(webp.getvalue())
    return files


def _read_or_refuse(data: bytes) -> None:
    try:
        info = read_info(data)
    except InvalidRequestError as exc:
        assert str(exc).endswith("PNG, JPEG or WebP.")
    else:
        assert isinstance(info, ImageInfo)


@HYPOTHESIS
@given(st.binary(max_size=4096))
@pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow warns about the corrupt data it skips
def test_arbitrary_bytes_never_raise_anything_else(data: bytes) -> None:
    _read_or_refuse(data)


@HYPOTHESIS
@given(
    st.integers(0, len(SEED_NAMES) + 1),
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=12),
    st.one_of(st.none(), st.floats(0, 1)),
)
@pytest.mark.filterwarnings("ignore::UserWarning:PIL")
def test_mutated_images_never_raise_anything_else(
    seed_files: list[bytes], seed: int, flips: list[tuple[float, int]], cut: float | None
) -> None:
    data = bytearray(seed_files[seed])
    for where, value in flips:
        data[int(where * len(data))] = value
    if cut is not None:
        del data[int(cut * len(data)) :]
    _read_or_refuse(bytes(data))
